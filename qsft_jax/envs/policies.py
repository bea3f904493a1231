"""Behaviour policies that generate the bundled datasets.

A policy acts with privileged access to the environment object (the maze's BFS distances, the Wordle
feedback history, the chess board) and with a ``random.Random`` owned by the generator, so a dataset
is a deterministic function of its seed. Interface: ``begin_episode(env, rng)`` once after each reset
(per-episode choices, e.g. a strength), ``act(env, rng) -> action text`` (ending with the stop
string), ``close()``.

Two kinds per task (docs/algorithm.md section 7):

- "paper": like the paper's datasets; uniform noise, so the most frequent action in a state is
  usually a good one.
- "trap" (maze, wordle, twenty_questions) and "biased" (wordle): the most frequent action is wrong in some
  states while the data still covers the right ones, so greedy behaviour cloning cannot be optimal and
  reweighting by value (stitching the minority of good moves) is what improves on the data.
"""
from __future__ import annotations

import functools
import random

from qsft_jax.envs.chess_env import ChessEnv, engine_move, open_stockfish
from qsft_jax.envs.maze import MOVES, Cell, MazeEnv, bfs_distances
from qsft_jax.envs.twenty_questions import (ATTRIBUTE_KEYS, TwentyQuestionsEnv, guess_text, object_attributes,
                                            question_text)
from qsft_jax.envs.wordle import INVALID_FEEDBACK, WordleEnv, allowed_words, feedback


class BehaviourPolicy:
    """Base class; see the module docstring."""

    task: str = ""
    name: str = ""

    def begin_episode(self, env, rng: random.Random) -> None:
        """Called after each reset; the default keeps no per-episode state."""

    def act(self, env, rng: random.Random) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release external resources (a chess engine); a no-op by default."""

    def _check_env(self, env, env_type: type) -> None:
        if not isinstance(env, env_type):
            raise TypeError(f"{type(self).__name__} acts in a {env_type.__name__}, got {type(env).__name__}")


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------- maze
class MazePaperPolicy(BehaviourPolicy):
    """Per move: with probability ``optimal_prob`` (default 0.2) a shortest-path move (uniform among
    them), otherwise a uniformly random move of the four. The setting of the paper-like maze in docs/results.md."""

    task, name = "maze", "paper"

    def __init__(self, optimal_prob: float = 0.2):
        self.optimal_prob = _check_probability("optimal_prob", optimal_prob)

    def _noisy_optimal_move(self, env: MazeEnv, rng: random.Random) -> str:
        best = env.shortest_path_moves(env.position)
        if best and rng.random() < self.optimal_prob:
            return rng.choice(best)
        return rng.choice(MOVES)

    def act(self, env: MazeEnv, rng: random.Random) -> str:
        self._check_env(env, MazeEnv)
        return env.action_texts[self._noisy_optimal_move(env, rng)] + env.action_stop

    def move_probabilities(self, env: MazeEnv, cell: Cell) -> dict[str, float]:
        """The probability of each move of ``MOVES`` at ``cell`` (what ``act`` draws from there; it
        depends on the cell only). Exact dynamic programming over the policy (``maze_values``) reads it."""
        best = env.shortest_path_moves(cell)
        probs = {m: (1.0 - self.optimal_prob if best else 1.0) / len(MOVES) for m in MOVES}
        for m in best:
            probs[m] += self.optimal_prob / len(best)
        return probs


def default_trap_moves(env: MazeEnv) -> dict[Cell, str]:
    """Trap cells and their trap moves for a layout: every junction (a cell with three or more free
    neighbours, G excluded) that has a move into a free cell farther from G; the trap move is the one
    leading farthest from G (ties: the first in ``MOVES``). In the default layout these send the
    agent into the dead ends and the long way round the loop."""
    traps = {}
    for cell in sorted(env.free - {env.goal}):
        neighbours = {m: env.next_cell(cell, m) for m in MOVES}
        free_moves = [m for m in MOVES if neighbours[m] != cell]
        if len(free_moves) < 3:
            continue
        farther = [m for m in free_moves if env.distances[neighbours[m]] > env.distances[cell]]
        if farther:
            traps[cell] = max(farther, key=lambda m: (env.distances[neighbours[m]], -MOVES.index(m)))
    return traps


class MazeTrapPolicy(MazePaperPolicy):
    """A behaviour whose most frequent move at the trap cells is wrong.

    At a trap cell (``default_trap_moves`` unless ``traps`` maps "r,c" to a move): the trap move with
    probability ``trap_prob`` (default 0.5), otherwise as elsewhere. Elsewhere: a shortest-path move with
    probability ``optimal_prob`` (default 0.8), otherwise a uniformly random move. With the defaults the
    trap move has frequency 0.525 at a trap cell against at most 0.425 for a shortest-path move, so
    greedy BC walks into the trap (and, at a dead end, back out and in again) while the successful
    episodes come from the minority of shortest-path moves.
    """

    task, name = "maze", "trap"

    def __init__(self, trap_prob: float = 0.5, optimal_prob: float = 0.8, traps: dict | None = None):
        super().__init__(optimal_prob)
        self.trap_prob = _check_probability("trap_prob", trap_prob)
        self.traps_option = traps
        self._traps: dict[Cell, str] | None = None
        self._traps_env: MazeEnv | None = None

    def trap_moves(self, env: MazeEnv) -> dict[Cell, str]:
        """The trap cells of ``env`` with their trap moves (computed once per environment)."""
        if self._traps_env is not env:
            if self.traps_option is None:
                traps = default_trap_moves(env)
            else:
                traps = {}
                for key, move in self.traps_option.items():
                    cell = tuple(int(x) for x in key.split(",")) if isinstance(key, str) else tuple(key)
                    if cell not in env.free or move not in MOVES:
                        raise ValueError(f"maze trap {key!r}: {move!r} must be a move of {MOVES} at a free cell")
                    traps[cell] = move
            self._traps, self._traps_env = traps, env
        return self._traps

    def act(self, env: MazeEnv, rng: random.Random) -> str:
        self._check_env(env, MazeEnv)
        trap = self.trap_moves(env).get(env.position)
        if trap is not None and rng.random() < self.trap_prob:
            return env.action_texts[trap] + env.action_stop
        return env.action_texts[self._noisy_optimal_move(env, rng)] + env.action_stop

    def move_probabilities(self, env: MazeEnv, cell: Cell) -> dict[str, float]:
        probs = super().move_probabilities(env, cell)
        trap = self.trap_moves(env).get(cell)
        if trap is None:
            return probs
        probs = {m: (1.0 - self.trap_prob) * p for m, p in probs.items()}
        probs[trap] += self.trap_prob
        return probs


class MazeDetourPolicy(MazePaperPolicy):
    """A behaviour that plans as if the cells ``avoid`` were walls: it knows a longer route than the
    shortest and keeps to it, while its random moves still cross the avoided cells.

    Per move: with probability ``optimal_prob`` (default 0.8) a move on a shortest path to G of the
    layout with the ``avoid`` cells ("r,c" strings or (r, c) pairs) walled up (uniform among them; in
    an avoided cell itself, a shortest-path move of the real layout), with probability
    ``shortcut_prob`` (default 0) a move on a shortest path of the real layout, otherwise a uniformly
    random move. With ``shortcut_prob`` > 0 the short route is in the data as a frequent move in every
    cell before the avoided one, each followed, more often than not, by the policy turning back. Where the shortest route runs through an avoided cell, the data hold that route only as
    random moves followed by good play from the cells past the avoided one (which the policy walks
    straight to G): the good parts of different episodes must be stitched to find it, while the
    policy's own continuation from the cells before it (back to the long route) makes the first move
    of the short route look poor to its Monte Carlo returns (the stitching task,
    configs/maze_stitch_cpu.py).
    """

    task, name = "maze", "detour"

    def __init__(self, avoid: tuple = (), optimal_prob: float = 0.8, shortcut_prob: float = 0.0):
        super().__init__(optimal_prob)
        self.shortcut_prob = _check_probability("shortcut_prob", shortcut_prob)
        if self.optimal_prob + self.shortcut_prob > 1.0:
            raise ValueError(f"maze detour: optimal_prob {optimal_prob} + shortcut_prob {shortcut_prob} "
                             "must be at most 1")
        self.avoid_option = avoid
        self._planned: tuple[MazeEnv, dict[Cell, int]] | None = None

    def planned_distances(self, env: MazeEnv) -> dict[Cell, int]:
        """Distances to G with the avoided cells walled up (computed once per environment); a cell that
        can only reach G through an avoided cell keeps its real distance."""
        if self._planned is None or self._planned[0] is not env:
            avoid = set()
            for key in self.avoid_option:
                cell = tuple(int(x) for x in (key.split(",") if isinstance(key, str) else key))
                if cell not in env.free or cell == env.goal:
                    raise ValueError(f"maze detour: avoid {key!r} must be a free cell other than G")
                avoid.add(cell)
            planned = bfs_distances(env.free - avoid, env.goal)
            self._planned = (env, {c: planned.get(c, env.distances[c]) for c in env.free - avoid})
        return self._planned[1]

    def planned_moves(self, env: MazeEnv, cell: Cell) -> list[str]:
        """The moves the policy plans at ``cell`` (empty at G)."""
        planned = self.planned_distances(env)
        if cell not in planned:  # an avoided cell: the real shortest path
            return env.shortest_path_moves(cell)
        d = planned[cell]
        return [m for m in MOVES if d > 0 and planned.get(env.next_cell(cell, m), d) == d - 1]

    def act(self, env: MazeEnv, rng: random.Random) -> str:
        self._check_env(env, MazeEnv)
        best = self.planned_moves(env, env.position)
        if not best:
            return env.action_texts[rng.choice(MOVES)] + env.action_stop
        u = rng.random()
        if u < self.optimal_prob:
            move = rng.choice(best)
        elif u < self.optimal_prob + self.shortcut_prob:
            move = rng.choice(env.shortest_path_moves(env.position))
        else:
            move = rng.choice(MOVES)
        return env.action_texts[move] + env.action_stop

    def move_probabilities(self, env: MazeEnv, cell: Cell) -> dict[str, float]:
        best = self.planned_moves(env, cell)
        if not best:
            return {m: 1.0 / len(MOVES) for m in MOVES}
        rest = 1.0 - self.optimal_prob - self.shortcut_prob
        probs = {m: rest / len(MOVES) for m in MOVES}
        for m in best:
            probs[m] += self.optimal_prob / len(best)
        shortest = env.shortest_path_moves(cell)
        for m in shortest:
            probs[m] += self.shortcut_prob / len(shortest)
        return probs


# -------------------------------------------------------------------------------------------- wordle
class _WordleCandidates(BehaviourPolicy):
    """Keeps the answer-list words consistent with the episode's feedback so far, incrementally."""

    task = "wordle"

    def begin_episode(self, env: WordleEnv, rng: random.Random) -> None:
        self._check_env(env, WordleEnv)
        self._candidates = list(env.answers)
        self._seen = 0

    def candidates(self, env: WordleEnv) -> list[str]:
        """Answer words consistent with every valid (guess, feedback) of ``env.history``."""
        for guess, pattern in env.history[self._seen :]:
            if pattern != INVALID_FEEDBACK:
                self._candidates = [w for w in self._candidates if feedback(guess, w) == pattern]
        self._seen = len(env.history)
        return self._candidates


class WordlePaperPolicy(_WordleCandidates):
    """Per guess: with probability ``consistent_prob`` a uniformly random answer word consistent with
    all feedback so far, otherwise a uniformly random allowed word. The default 0.535 puts the mean
    return at the paper's dataset (-4.12): measured -4.115 (standard error 0.010, success rate 0.763)
    over 20000 episodes, ``python -m qsft_jax.envs.generate --task wordle --episodes 20000 --seed 7
    --out W.jsonl``; 0.50 gave -4.22 and 0.55 gave -4.08 (4000 episodes each)."""

    name = "paper"

    def __init__(self, consistent_prob: float = 0.535):
        self.consistent_prob = _check_probability("consistent_prob", consistent_prob)

    def act(self, env: WordleEnv, rng: random.Random) -> str:
        if rng.random() < self.consistent_prob:
            return rng.choice(self.candidates(env)) + env.action_stop
        return rng.choice(allowed_words()) + env.action_stop


class WordleBiasedPolicy(_WordleCandidates):
    """A systematically poor behaviour whose consistent guesses are still in the data.

    First guess: the fixed poor word ``opening`` (default "immix", not an answer) with probability
    ``bias_prob`` (default 0.5). Later guesses: a repeat of the previous guess (no new information, a
    wasted -1) with probability ``bias_prob``. Otherwise a uniformly random answer word consistent with
    the feedback so far. The fixed opening and the repeat are each the single most frequent action of
    their situations, so greedy BC opens with "immix" and then repeats it to the end (return -6),
    while the data's consistent guesses solve most games.
    """

    name = "biased"

    def __init__(self, bias_prob: float = 0.5, opening: str = "immix"):
        self.bias_prob = _check_probability("bias_prob", bias_prob)
        if opening not in allowed_words():
            raise ValueError(f"wordle biased policy: opening {opening!r} is not an allowed word")
        self.opening = opening

    def act(self, env: WordleEnv, rng: random.Random) -> str:
        if rng.random() < self.bias_prob:
            return (env.history[-1][0] if env.history else self.opening) + env.action_stop
        return rng.choice(self.candidates(env)) + env.action_stop


@functools.cache
def most_informative_guess(answers: tuple[str, ...]) -> str:
    """The answer word whose feedback splits ``answers`` into the most patterns (ties: alphabetically
    first); a good fixed opening for a small answer list ("arose" for ``answer_subset(64)``). Cached per
    answer list (it costs len(answers)^2 feedback calls)."""
    return min(answers, key=lambda g: (-len({feedback(g, a) for a in answers}), g))


class WordleTrapPolicy(_WordleCandidates):
    """A behaviour whose most frequent guess ends the game: the Wordle counterpart of the maze trap.

    Every guess: the invalid string ``trap`` (default "xxxxx") with probability ``trap_prob`` (default
    0.4). Otherwise, at the first guess, the fixed opening ``opening`` (default: the answer that splits
    the answer list into the most feedback patterns, ``most_informative_guess``) with probability
    ``opening_prob`` (default 0.5), else a uniformly random answer consistent with the feedback so far.
    Played with ``invalid="end"`` (required) the trap ends the game as a loss (return -6), so it is worth
    nothing, yet it is the single most frequent guess wherever two or more answers remain: greedy BC
    opens with it, while the data still holds the opening (30% of first guesses) and consistent guesses
    (60% of later ones) that solve the game.
    """

    name = "trap"

    def __init__(self, trap_prob: float = 0.4, opening_prob: float = 0.5, trap: str = "xxxxx",
                 opening: str | None = None):
        self.trap_prob = _check_probability("trap_prob", trap_prob)
        self.opening_prob = _check_probability("opening_prob", opening_prob)
        if trap in allowed_words():
            raise ValueError(f"wordle trap policy: trap {trap!r} is an allowed word; it must be invalid")
        if opening is not None and opening not in allowed_words():
            raise ValueError(f"wordle trap policy: opening {opening!r} is not an allowed word")
        self.trap, self.opening_option = trap, opening

    def begin_episode(self, env: WordleEnv, rng: random.Random) -> None:
        super().begin_episode(env, rng)
        if env.invalid != "end":
            raise ValueError("wordle trap policy: needs the environment's invalid='end' (its trap must end the game)")

    def opening(self, env: WordleEnv) -> str:
        """The fixed first guess for ``env``'s answer list."""
        return self.opening_option or most_informative_guess(env.answers)

    def act(self, env: WordleEnv, rng: random.Random) -> str:
        if rng.random() < self.trap_prob:
            return self.trap + env.action_stop
        if not env.history and rng.random() < self.opening_prob:
            return self.opening(env) + env.action_stop
        return rng.choice(self.candidates(env)) + env.action_stop


# ---------------------------------------------------------------------------------- twenty questions
def informative_question(candidates: list[str]) -> str:
    """The informative action for the consistent set ``candidates`` (non-empty, in the game's order): a
    guess of the first candidate when at most three remain (guessing costs 0.5 questions on average with
    two left and 1 with three, against 1 and 4/3 for a question first), else the canonical attribute
    question that splits them most evenly (ties: the first in ``ATTRIBUTES``), else (no attribute
    separates them) a guess of the first. Optimal on the 16-object game (-3.5, the exact optimum)."""
    table = object_attributes()
    n = len(candidates)
    if n > 3:
        best_key, best_gap = None, n
        for key in ATTRIBUTE_KEYS:
            yes = sum(key in table[name] for name in candidates)
            if 0 < yes < n and abs(n - 2 * yes) < best_gap:
                best_key, best_gap = key, abs(n - 2 * yes)
        if best_key is not None:
            return question_text(best_key)
    return guess_text(candidates[0])


def redundant_question(objects: tuple[str, ...]) -> str:
    """The trap policy's default redundant question for a game over ``objects``: the canonical phrasing of
    the attribute that tells least about them (the fewest objects on the minority side; ties: the first in
    ``ATTRIBUTES``) among those phrased "Is it <word>?" with no article ("Is it red?" for
    ``object_subset(16)``, where no object is red).

    Why that form: the model reads characters. Every guess and most attribute questions begin "Is it ",
    and a token's value in Q-SFT's data is the behaviour's average over the actions that share its prefix
    (docs/algorithm.md section 4, turn mode), so a redundant question that shared more than that prefix
    with the guesses ("Is it a fish?") would pool its value with theirs and no extraction could separate
    them. "Is it r" departs from the guesses ("Is it a") and from the informative question at one
    character, where the values differ most."""
    table = object_attributes()
    keys = [k for k in ATTRIBUTE_KEYS
            if question_text(k).startswith("Is it ") and not question_text(k).startswith(("Is it a ", "Is it an "))]
    key = min(keys, key=lambda k: (min(sum(k in table[o] for o in objects), sum(k not in table[o] for o in objects)),
                                   ATTRIBUTE_KEYS.index(k)))
    return question_text(key)


class TwentyQuestionsPaperPolicy(BehaviourPolicy):
    """Per question: with probability ``informative_prob`` (default 0.5) the informative action
    (``informative_question`` on the objects consistent with the answers so far), otherwise a uniformly
    random question among every attribute's canonical phrasing and every guess of the game's objects:
    uniform noise, so the most frequent action in a state is the informative one."""

    task, name = "twenty_questions", "paper"

    def __init__(self, informative_prob: float = 0.5):
        self.informative_prob = _check_probability("informative_prob", informative_prob)

    def act(self, env: TwentyQuestionsEnv, rng: random.Random) -> str:
        self._check_env(env, TwentyQuestionsEnv)
        if rng.random() < self.informative_prob:
            return informative_question(env.consistent()) + env.action_stop
        k = rng.randrange(len(ATTRIBUTE_KEYS) + len(env.objects))
        if k < len(ATTRIBUTE_KEYS):
            return question_text(ATTRIBUTE_KEYS[k]) + env.action_stop
        return guess_text(env.objects[k - len(ATTRIBUTE_KEYS)]) + env.action_stop


class TwentyQuestionsTrapPolicy(BehaviourPolicy):
    """A behaviour whose most frequent question is redundant: the Twenty Questions counterpart of the
    maze and Wordle traps.

    Per question: the fixed redundant question ``trap`` (default ``redundant_question``: "Is it red?" for
    the 16-object game, whose answer is "No." for every object, so it never tells anything) with
    probability ``trap_prob`` (default 0.5); else a premature guess, a uniformly random object still
    consistent with the answers, with probability ``guess_prob`` (default 0.1); else the informative
    action (``informative_question``, 0.4). The states where the most frequent action is wrong: every state
    with two or more objects left, the first question included, where the redundant question (0.5) is more
    frequent than the informative action (at most 0.4 + 0.1 / n) and than each other guess (0.1 / n).
    Greedy BC therefore asks "Is it red?" at the first question and, the state being unchanged, again
    until the 20 questions run out (return -20); with one object left the right guess ties with it. The
    redundant question only delays (its value is gamma times the state's), so the extraction can prefer
    the informative question only if pi * Q is larger for it (docs/results.md, the Wordle arithmetic):
    0.4 * V against 0.5 * gamma * V, true for gamma = 0.7 and more so for the behaviour's own values.
    """

    task, name = "twenty_questions", "trap"

    def __init__(self, trap_prob: float = 0.5, guess_prob: float = 0.1, trap: str | None = None):
        self.trap_prob = _check_probability("trap_prob", trap_prob)
        self.guess_prob = _check_probability("guess_prob", guess_prob)
        if self.trap_prob + self.guess_prob > 1.0:
            raise ValueError(f"twenty questions trap policy: trap_prob + guess_prob must be <= 1, got "
                             f"{self.trap_prob} + {self.guess_prob}")
        self.trap_option = trap

    def trap_question(self, env: TwentyQuestionsEnv) -> str:
        """The redundant question asked in ``env``'s game."""
        return self.trap_option or redundant_question(env.objects)

    def act(self, env: TwentyQuestionsEnv, rng: random.Random) -> str:
        self._check_env(env, TwentyQuestionsEnv)
        u = rng.random()
        if u < self.trap_prob:
            return self.trap_question(env) + env.action_stop
        candidates = env.consistent()
        if u < self.trap_prob + self.guess_prob:
            return guess_text(rng.choice(candidates)) + env.action_stop
        return informative_question(candidates) + env.action_stop


# --------------------------------------------------------------------------------------------- chess
class ChessPaperPolicy(BehaviourPolicy):
    """Stockfish at a strength drawn per game, against the environment's fixed-strength opponent.

    Per game: a node budget from ``nodes_choices`` and a random-move probability from
    ``random_choices`` (uniformly, from the generator's seed); per move: a uniformly random legal move
    with that probability, else Stockfish's move after that many nodes. Searches are deterministic (see
    chess_env), so the dataset is reproducible from its seed, unlike Stockfish's Skill Level.
    Against the default opponent (200 nodes): mean return 0.20 (success 0.20), about 43 agent moves
    per game, 4.8 episodes/s on a loaded 2-core machine (``python -m qsft_jax.envs.generate --task
    chess --episodes 100 --seed 0 --out C.jsonl``).
    """

    task, name = "chess", "paper"

    def __init__(
        self,
        nodes_choices: tuple[int, ...] = (50, 200, 800),
        random_choices: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5),
        engine_path: str | None = None,
    ):
        if not nodes_choices or any(not isinstance(n, int) or n < 1 for n in nodes_choices):
            raise ValueError(f"nodes_choices must be positive ints, got {nodes_choices!r}")
        self.nodes_choices = tuple(nodes_choices)
        self.random_choices = tuple(_check_probability("random_choices", p) for p in random_choices)
        if not self.random_choices:
            raise ValueError("random_choices must not be empty")
        self.engine = open_stockfish(engine_path) if engine_path else open_stockfish()
        self.nodes, self.random_prob = self.nodes_choices[0], self.random_choices[0]
        self._game: object = object()

    def begin_episode(self, env: ChessEnv, rng: random.Random) -> None:
        self._check_env(env, ChessEnv)
        self.nodes = rng.choice(self.nodes_choices)
        self.random_prob = rng.choice(self.random_choices)
        self._game = object()

    def act(self, env: ChessEnv, rng: random.Random) -> str:
        if self.engine is None:
            raise RuntimeError("chess policy: closed")
        move = engine_move(self.engine, env.board, self.nodes, self._game, rng, self.random_prob)
        return move.uci() + env.action_stop

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.quit()


POLICIES: dict[tuple[str, str], type[BehaviourPolicy]] = {
    (cls.task, cls.name): cls
    for cls in (MazePaperPolicy, MazeTrapPolicy, MazeDetourPolicy, WordlePaperPolicy, WordleBiasedPolicy,
                WordleTrapPolicy, TwentyQuestionsPaperPolicy, TwentyQuestionsTrapPolicy, ChessPaperPolicy)
}
