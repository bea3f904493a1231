"""Chess against Stockfish as a text environment (python-chess for the rules).

(Named ``chess_env`` so that it never shadows the ``chess`` package.)

The agent plays white by default (``agent_color="black"`` for black) against Debian's Stockfish 15.1
at ``/usr/games/stockfish``, driven through ``chess.engine.SimpleEngine.popen_uci`` with one thread.
Opponent strength:

- ``opponent_nodes`` (default 200): nodes searched per move; small is weak and fast (about a millisecond).
- ``opponent_random`` (default 0.0): probability of a uniformly random legal move instead, drawn from
  the episode's seed.
- ``start_fen``: start every game from this position instead of the initial one (the opponent
  moves first when it is its turn there).
- ``opponent_skill`` (0-20) and ``opponent_elo`` (>= 1350, sets UCI_LimitStrength): Stockfish's own
  weakening. Stockfish seeds that weakening from the clock, so games are then *not* reproducible from
  the seed; with neither set (the default) a game is a deterministic function of the seed and the
  agent's moves (one thread, a fixed search-node budget, a fresh ``ucinewgame`` per episode).

Actions: one move in UCI notation (``e2e4``, ``e7e8q``). Rewards (the paper's setting): +1 for a
checkmating move, 0 for any other legal move, -1 for an illegal or unparseable one. By
``illegal="end"`` (default) an illegal move ends the episode (return in [-1, 1]); by
``illegal="penalty"`` it costs -1 and the agent moves again from the same position (return in
[-max_turns, 1]). A game lost, drawn (stalemate, insufficient material, 75-move rule, and the claimable
threefold repetition / 50-move rule, which end the game at once) ends the episode with success false.
After ``max_turns`` agent moves (default 100) an unfinished game is cut: ``info["truncated"]`` is true,
so the recorded episode has ``done = false`` and ends with the position (see base.py).

Observations (``observation=``):

- ``"fen"`` (default): the FEN of the position in which the agent moves, one line; the first
  observation is ``"Chess. You play white. Moves in UCI.\\n"`` followed by that line.
- ``"moves"``: the game as a move list, spread over the turns: the first observation is the prompt
  (plus the opponent's first move when the agent is black), each later observation is the opponent's
  reply in UCI (``"e7e5\\n"``); the agent's own moves are its actions, so the episode text is the whole
  move list.

When the game ends, the observation is the usual one followed by ``"result 1-0\\n"`` (or ``0-1``,
``1/2-1/2``); after an illegal move in penalty mode it is ``"illegal\\n"`` followed by the usual one
(empty in "moves" mode).
"""
from __future__ import annotations

import os
import random

import chess
import chess.engine

from qsft_jax.envs.base import StepResult, TextEnv

STOCKFISH_PATH = "/usr/games/stockfish"
OBSERVATIONS = ("fen", "moves")
ILLEGAL_RULES = ("end", "penalty")


def open_stockfish(
    path: str = STOCKFISH_PATH, skill: int | None = None, elo: int | None = None, hash_mb: int = 16
) -> chess.engine.SimpleEngine:
    """Start Stockfish with one thread (reproducible searches) and the given weakening, if any.

    Raises ``FileNotFoundError`` with the install hint when the binary is missing and ``ValueError``
    for a skill outside 0-20 or an Elo below Stockfish's floor of 1350.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Stockfish not found at {path}: apt-get install stockfish")
    if skill is not None and not (isinstance(skill, int) and 0 <= skill <= 20):
        raise ValueError(f"Stockfish Skill Level must be an int in 0..20, got {skill!r}")
    if elo is not None and not (isinstance(elo, int) and 1350 <= elo <= 2850):
        raise ValueError(f"Stockfish UCI_Elo must be an int in 1350..2850, got {elo!r}")
    engine = chess.engine.SimpleEngine.popen_uci(path)
    options: dict = {"Threads": 1, "Hash": hash_mb}
    if skill is not None:
        options["Skill Level"] = skill
    if elo is not None:
        options["UCI_LimitStrength"] = True
        options["UCI_Elo"] = elo
    engine.configure(options)
    return engine


def engine_move(
    engine: chess.engine.SimpleEngine, board: chess.Board, nodes: int, game: object, rng: random.Random, random_prob: float
) -> chess.Move:
    """A move for the side to play: uniformly random legal with probability ``random_prob`` (from
    ``rng``), otherwise the engine's choice after ``nodes`` nodes. ``game`` identifies the game, so that
    python-chess sends ``ucinewgame`` (clearing the engine's hash) when it changes."""
    if random_prob > 0 and rng.random() < random_prob:
        return rng.choice(list(board.legal_moves))
    result = engine.play(board, chess.engine.Limit(nodes=nodes), game=game)
    if result.move is None:
        raise RuntimeError(f"Stockfish returned no move in {board.fen()}")
    return result.move


class ChessEnv(TextEnv):
    """Chess against Stockfish; see the module docstring for texts, rewards and options."""

    name = "chess"

    def __init__(
        self,
        observation: str = "fen",
        agent_color: str = "white",
        illegal: str = "end",
        max_turns: int = 100,
        opponent_nodes: int = 200,
        opponent_random: float = 0.0,
        opponent_skill: int | None = None,
        opponent_elo: int | None = None,
        engine_path: str = STOCKFISH_PATH,
        start_fen: str | None = None,
    ):
        super().__init__()
        if observation not in OBSERVATIONS:
            raise ValueError(f"chess: observation must be one of {OBSERVATIONS}, got {observation!r}")
        if agent_color not in ("white", "black"):
            raise ValueError(f"chess: agent_color must be 'white' or 'black', got {agent_color!r}")
        if illegal not in ILLEGAL_RULES:
            raise ValueError(f"chess: illegal must be one of {ILLEGAL_RULES}, got {illegal!r}")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"chess: max_turns must be a positive int, got {max_turns!r}")
        if not isinstance(opponent_nodes, int) or opponent_nodes < 1:
            raise ValueError(f"chess: opponent_nodes must be a positive int, got {opponent_nodes!r}")
        if not 0.0 <= opponent_random <= 1.0:
            raise ValueError(f"chess: opponent_random must be a probability, got {opponent_random!r}")
        if start_fen is not None:
            board = chess.Board(start_fen)  # raises ValueError on a malformed FEN
            if not board.is_valid() or board.is_game_over(claim_draw=True):
                raise ValueError(f"chess: start_fen must be a valid position with the game going on: {start_fen!r}")
        self.start_fen = start_fen
        self.observation_mode = observation
        self.agent_color = chess.WHITE if agent_color == "white" else chess.BLACK
        self.illegal = illegal
        self.max_turns = max_turns
        self.return_bounds = (-1.0, 1.0) if illegal == "end" else (-float(max_turns), 1.0)
        self.opponent_nodes = opponent_nodes
        self.opponent_random = float(opponent_random)
        self.engine = open_stockfish(engine_path, skill=opponent_skill, elo=opponent_elo)
        self.board = chess.Board()
        self._rng = random.Random(0)
        self._game_token: object = object()
        self.prompt = f"Chess. You play {agent_color}. Moves in UCI.\n"

    def close(self) -> None:
        """Quit the Stockfish process (safe to call twice)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.quit()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the engine's event loop may already be gone
            pass

    def _state_text(self, opponent_move: chess.Move | None) -> str:
        if self.observation_mode == "fen":
            return self.board.fen() + "\n"
        return opponent_move.uci() + "\n" if opponent_move is not None else ""

    def _opponent_moves(self) -> chess.Move:
        if self.engine is None:
            raise RuntimeError("chess: the environment was closed")
        move = engine_move(self.engine, self.board, self.opponent_nodes, self._game_token, self._rng, self.opponent_random)
        self.board.push(move)
        return move

    def _reset(self, seed: int) -> str:
        self.board = chess.Board(self.start_fen) if self.start_fen else chess.Board()
        self._rng = random.Random(seed)
        self._game_token = object()  # a new game for python-chess: ucinewgame, hash cleared
        opponent_move = self._opponent_moves() if self.board.turn != self.agent_color else None
        if self._game_over_result() is not None:
            raise ValueError(f"chess: the game from start_fen ended with the opponent's first move {opponent_move}")
        return self.prompt + self._state_text(opponent_move)

    def _game_over_result(self) -> str | None:
        outcome = self.board.outcome(claim_draw=True)
        return None if outcome is None else outcome.result()

    def _step(self, action: str) -> StepResult:
        try:
            move = chess.Move.from_uci(action)
        except ValueError:
            move = None
        if move is None or not self.board.is_legal(move):
            if self.illegal == "end":
                return StepResult("illegal\n", -1.0, True, {"success": False, "illegal": True})
            return self._after_agent_move(-1.0, "illegal\n" + self._state_text(None), {"illegal": True})
        self.board.push(move)
        result = self._game_over_result()
        if result is not None:
            won = self.board.is_checkmate()  # the side to move is mated: the agent just mated it
            reward = 1.0 if won else 0.0
            return StepResult(self._state_text(None) + f"result {result}\n", reward, True, {"success": won})
        opponent_move = self._opponent_moves()
        result = self._game_over_result()
        if result is not None:
            return StepResult(self._state_text(opponent_move) + f"result {result}\n", 0.0, True, {"success": False})
        return self._after_agent_move(0.0, self._state_text(opponent_move), {})

    def _after_agent_move(self, reward: float, observation: str, info: dict) -> StepResult:
        """The step result when the game goes on: cut (truncated) at ``max_turns``."""
        if self.turn >= self.max_turns:
            return StepResult(observation, reward, True, {**info, "success": False, "truncated": True})
        return StepResult(observation, reward, False, info)
