"""Chess: legality, rewards and results checked through python-chess, and real Stockfish games.

Every test here drives Debian's Stockfish (the opponent is part of the environment); CI installs it
with apt. The tests are skipped only when /usr/games/stockfish is missing.
"""
import os
import random

import chess
import pytest

from qsft_jax.envs.base import EnvError, play_batch
from qsft_jax.envs.chess_env import STOCKFISH_PATH, ChessEnv

pytestmark = pytest.mark.skipif(
    not os.path.exists(STOCKFISH_PATH), reason=f"Stockfish is not installed at {STOCKFISH_PATH} (apt-get install stockfish)"
)

# White to play Qxf7# (the scholar's mate); python-chess confirms it below.
SCHOLARS_MATE_IN_ONE = "r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR w KQkq - 4 4"


def test_illegal_and_unparseable_moves_get_minus_one_and_end_by_default():
    with ChessEnv() as env:
        first = env.reset(0)
        assert first == "Chess. You play white. Moves in UCI.\n" + chess.STARTING_FEN + "\n"
        result = env.step("e2e5\n")  # well-formed, illegal
        assert (result.reward, result.done, result.info["success"], result.info["illegal"]) == (-1.0, True, False, True)
        env.reset(0)
        assert env.step("hello\n").reward == -1.0
        with pytest.raises(EnvError):
            env.step("e2e4\n")
        assert env.return_bounds == (-1.0, 1.0)


def test_penalty_mode_keeps_the_position_and_lets_the_agent_move_again():
    with ChessEnv(illegal="penalty", max_turns=10) as env:
        env.reset(0)
        result = env.step("e1e2\n")
        assert (result.reward, result.done) == (-1.0, False)
        assert result.observation == "illegal\n" + chess.STARTING_FEN + "\n"
        assert env.board.fen() == chess.STARTING_FEN
        assert env.step("e2e4\n").reward == 0.0
        assert env.return_bounds == (-10.0, 1.0)


def test_a_checkmating_move_gets_plus_one():
    board = chess.Board(SCHOLARS_MATE_IN_ONE)
    board.push_uci("h5f7")
    assert board.is_checkmate()
    with ChessEnv(start_fen=SCHOLARS_MATE_IN_ONE) as env:
        env.reset(0)
        result = env.step("h5f7\n")
        assert (result.reward, result.done, result.info["success"]) == (1.0, True, True)
        assert result.observation == board.fen() + "\nresult 1-0\n"


def test_a_legal_move_gets_zero_and_the_opponent_replies_legally():
    with ChessEnv(start_fen=SCHOLARS_MATE_IN_ONE) as env:
        env.reset(0)
        result = env.step("h5h4\n")  # misses the mate
        assert (result.reward, result.done) == (0.0, False)
        replay = chess.Board(SCHOLARS_MATE_IN_ONE)
        replay.push_uci("h5h4")
        reply = env.board.peek()
        assert replay.is_legal(reply)
        replay.push(reply)
        assert result.observation == replay.fen() + "\n" and replay.turn == chess.WHITE


def _play_random_game(env, seed, max_plies=400):
    """The agent plays uniformly random legal moves (seeded); returns (first observation, results)."""
    rng = random.Random(seed)
    first = env.reset(seed)
    results = []
    while not env.done:
        move = rng.choice(list(env.board.legal_moves))
        results.append((move.uci(), env.step(move.uci() + "\n")))
        assert len(results) < max_plies
    return first, results


def test_a_real_stockfish_game_replayed_through_python_chess():
    with ChessEnv(observation="moves", max_turns=200, opponent_nodes=200) as env:
        first, results = _play_random_game(env, seed=3)
        assert first == "Chess. You play white. Moves in UCI.\n"
        board = chess.Board()
        for i, (move, result) in enumerate(results):
            board.push_uci(move)  # raises if the agent's move were illegal
            last = i == len(results) - 1
            assert result.reward == (1.0 if last and board.is_checkmate() else 0.0)
            if not last or board.outcome(claim_draw=True) is None:
                reply = result.observation.splitlines()[0]
                board.push_uci(reply)  # the opponent's reply, legal by construction of push_uci
        outcome = board.outcome(claim_draw=True)
        assert outcome is not None and results[-1][1].done
        assert results[-1][1].observation.endswith(f"result {outcome.result()}\n")
        assert results[-1][1].info["success"] == (outcome.winner == chess.WHITE and board.is_checkmate())
        # a random mover against Stockfish loses (or draws): the agent never gets +1 here
        assert sum(r.reward for _, r in results) == 0.0


def test_games_are_deterministic_for_a_seed():
    with ChessEnv(opponent_random=0.2) as env:
        a = _play_random_game(env, seed=11)
        b = _play_random_game(env, seed=11)
        c = _play_random_game(env, seed=12)
    assert [(m, r.observation) for m, r in a[1]] == [(m, r.observation) for m, r in b[1]]
    assert [(m, r.observation) for m, r in a[1]] != [(m, r.observation) for m, r in c[1]]


def test_agent_as_black_sees_the_opponent_first_move():
    with ChessEnv(agent_color="black", observation="moves") as env:
        first = env.reset(0)
        prompt, opening = first.splitlines()
        assert prompt == "Chess. You play black. Moves in UCI." and chess.Board().is_legal(chess.Move.from_uci(opening))
        assert env.board.turn == chess.BLACK


def test_turn_cap_truncates_and_is_recorded_as_not_done():
    with ChessEnv(max_turns=3) as env:
        (episode,) = play_batch([env], [0], lambda histories: [list(env.board.legal_moves)[0].uci() + "\n"])
    assert episode["done"] is False and episode["meta"]["truncated"] is True
    assert [t["action"] for t in episode["turns"]] == [False, True, False, True, False, True, False]
    final_board = chess.Board(episode["turns"][-1]["text"].strip())  # ends with the position to move in
    assert final_board.turn == chess.WHITE and final_board.fullmove_number == 4


def test_options_are_validated_and_close_is_idempotent():
    for kwargs, message in [
        ({"observation": "pgn"}, "observation must be"),
        ({"illegal": "ignore"}, "illegal must be"),
        ({"opponent_skill": 25}, "Skill Level"),
        ({"opponent_elo": 1000}, "UCI_Elo"),
        ({"start_fen": "8/8/8/8/8/8/8/8 w - - 0 1"}, "valid position"),
    ]:
        with pytest.raises(ValueError, match=message):
            ChessEnv(**kwargs)
    with pytest.raises(FileNotFoundError, match="apt-get install stockfish"):
        ChessEnv(engine_path="/nonexistent/stockfish")
    env = ChessEnv(opponent_skill=5)
    env.reset(0)
    assert env.step("e2e4\n").reward == 0.0
    env.close()
    env.close()
