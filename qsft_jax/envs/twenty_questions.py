"""Twenty Questions with a scripted oracle over a knowledge base (qsft_jax/envs/twenty_questions_kb.py).

The paper's Twenty Questions uses a large model as the oracle; here the oracle parses a small question
language and answers from a table of 176 objects (animals, foods, household items, vehicles, musical
instruments) by 46 yes/no attributes, which keeps the game's structure: information gathering over many
turns, one terminal success, offline data.

Episode. ``reset(seed)`` draws the hidden object uniformly from the game's objects (all 176, the
evenly spaced subset ``object_subset(num_objects)``, or the objects of ``categories``). Observations:

- first: ``"Twenty Questions. Guess the object.\\n"``;
- after each question: the oracle's answer, ``"Yes.\\n"``, ``"No.\\n"`` or ``"I don't understand.\\n"``.

Questions (case, spacing and punctuation are ignored): an attribute question in one of its phrasings
(``ATTRIBUTES``: "Is it an animal?", "Does it have fur?", "Is it bigger than a breadbox?", ...), answered
from the table; or a guess "Is it a <object>?" (also "an", "the" or no article), "Yes." for the hidden
object and "No." for any other object of the knowledge base. Anything else is "I don't understand.".

Rewards: -1 per question that is not the right guess, 0 for the right guess, which ends the episode
(success). At most ``max_questions`` (default 20) questions: a game never guessed returns -20. The
exact optimal expected return over the game's objects is ``expected_optimal_return()`` (dynamic
programming over the sets of objects consistent with the answers).
"""
from __future__ import annotations

import functools
import random
import re
from typing import Iterable, Sequence

from qsft_jax.envs.base import StepResult, TextEnv
from qsft_jax.envs.twenty_questions_kb import ATTRIBUTES, OBJECTS

MAX_QUESTIONS = 20
PROMPT = "Twenty Questions. Guess the object.\n"
YES, NO, UNKNOWN = "Yes.", "No.", "I don't understand."
CATEGORIES = ("animal", "food", "household", "vehicle", "instrument")
ATTRIBUTE_KEYS = tuple(key for key, _ in ATTRIBUTES)
OBJECT_NAMES = tuple(name for name, _, _ in OBJECTS)
_GUESS = re.compile(r"^is it (?:(?:a|an|the) )?(.+)$")


def normalize_question(text: str) -> str:
    """``text`` lowercased, with every character other than a-z and 0-9 a space, spaces collapsed
    ("Is it  four-legged?" -> "is it four legged")."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@functools.cache
def object_attributes() -> dict[str, frozenset[str]]:
    """Each object's true attributes (its category included)."""
    table = {}
    for name, category, attrs in OBJECTS:
        unknown = set(attrs) - set(ATTRIBUTE_KEYS)
        if category not in CATEGORIES or unknown or name in table:
            raise ValueError(f"twenty questions knowledge base: bad row {name!r} "
                             f"({category}, {sorted(unknown)})")
        table[name] = frozenset((category, *attrs))
    return table


@functools.cache
def _phrasing_table() -> dict[str, str]:
    """Normalised phrasing -> attribute key."""
    table: dict[str, str] = {}
    for key, phrasings in ATTRIBUTES:
        for text in phrasings:
            norm = normalize_question(text)
            if table.get(norm, key) != key:
                raise ValueError(f"twenty questions: phrasing {text!r} belongs to {table[norm]!r} and {key!r}")
            table[norm] = key
    return table


@functools.cache
def _object_of_norm() -> dict[str, str]:
    return {normalize_question(name): name for name in OBJECT_NAMES}


def parse_question(text: str) -> tuple[str, str] | None:
    """``("attribute", key)``, ``("guess", object name)`` or None (not understood) for a question."""
    norm = normalize_question(text)
    key = _phrasing_table().get(norm)
    if key is not None:
        return ("attribute", key)
    match = _GUESS.match(norm)
    if match and match.group(1) in _object_of_norm():
        return ("guess", _object_of_norm()[match.group(1)])
    return None


def question_text(key: str) -> str:
    """The canonical phrasing of attribute ``key`` (the first in ``ATTRIBUTES``)."""
    return dict(ATTRIBUTES)[key][0]


def guess_text(name: str) -> str:
    """The guess question for object ``name``: "Is it a cat?", "Is it an apple?"."""
    return f"Is it {'an' if name[0] in 'aeiou' else 'a'} {name}?"


@functools.cache
def object_subset(num_objects: int) -> tuple[str, ...]:
    """``num_objects`` objects spread evenly over the knowledge base's order: object ``int(i * 176 /
    num_objects)`` for i < num_objects, so every category is represented in proportion."""
    n = len(OBJECT_NAMES)
    if isinstance(num_objects, bool) or not isinstance(num_objects, int) or not 0 < num_objects <= n:
        raise ValueError(f"twenty_questions: num_objects must be an int in [1, {n}], got {num_objects!r}")
    return tuple(OBJECT_NAMES[int(i * n / num_objects)] for i in range(num_objects))


def consistent_objects(objects: Iterable[str], history: Sequence[tuple[str, str, str]]) -> list[str]:
    """The objects of ``objects`` that agree with every (kind, key or object, answer) of ``history``."""
    table = object_attributes()
    kept = []
    for name in objects:
        ok = True
        for kind, what, answer in history:
            if kind == "attribute":
                ok = (what in table[name]) == (answer == YES)
            elif kind == "guess":
                ok = (what == name) == (answer == YES)
            if not ok:
                break
        if ok:
            kept.append(name)
    return kept


def optimal_total_questions(objects: Sequence[str], attributes: Sequence[str] = ATTRIBUTE_KEYS) -> int:
    """The least total, over the objects of ``objects`` (each hidden once), of the questions asked before
    the right guess, with attribute questions from ``attributes`` and guesses, unbounded in number.

    Dynamic programming over bitmasks of the consistent set S: T({o}) = 0 (guess o: reward 0); for
    |S| >= 2, T(S) = min(min over guesses o in S of |S| - 1 + T(S - {o}), min over attributes that
    split S into S_yes, S_no of |S| + T(S_yes) + T(S_no)). The optimal expected return with a uniform
    hidden object is -T / len(objects), exact for the 20-question game when the optimal strategy needs
    at most 20 questions (always for 20 objects or fewer: guessing one object at a time needs at most
    len(objects)). Cost: up to 2^len(objects) states; meant for small sets (16 objects: seconds).
    """
    table = object_attributes()
    n = len(objects)
    masks = []
    for key in attributes:
        m = 0
        for i, name in enumerate(objects):
            if key in table[name]:
                m |= 1 << i
        masks.append(m)
    masks = sorted(set(masks))
    singles = [1 << i for i in range(n)]

    @functools.cache
    def total(s: int) -> int:
        size = s.bit_count()
        if size <= 1:
            return 0
        best = None
        for bit in singles:
            if s & bit:
                cost = size - 1 + total(s & ~bit)
                if best is None or cost < best:
                    best = cost
        for m in masks:
            yes = s & m
            if yes and yes != s:
                cost = size + total(yes) + total(s & ~m)
                if cost < best:
                    best = cost
        return best

    return total((1 << n) - 1)


class TwentyQuestionsEnv(TextEnv):
    """Twenty Questions against the scripted oracle; see the module docstring for texts and rewards."""

    name = "twenty_questions"

    def __init__(self, num_objects: int = 0, categories: Sequence[str] | None = None,
                 objects: Sequence[str] | None = None, max_questions: int = MAX_QUESTIONS):
        """The hidden objects: ``objects`` (names from the knowledge base), or ``object_subset(num_objects)``
        when ``num_objects`` > 0, or every object of ``categories`` (default: all 176). Give one of the
        three. ``max_questions``: questions per game (the return is at least -max_questions)."""
        super().__init__()
        if sum(x is not None and x != 0 for x in (objects, categories, num_objects)) > 1:
            raise ValueError("twenty_questions: give at most one of objects, categories, num_objects")
        if objects is not None:
            unknown = [o for o in objects if o not in object_attributes()]
            if not objects or unknown:
                raise ValueError(f"twenty_questions: objects must be knowledge-base names; "
                                 f"unknown: {unknown[:5]}")
            self.objects = tuple(objects)
        elif num_objects:
            self.objects = object_subset(num_objects)
        elif categories is not None:
            wrong = [c for c in categories if c not in CATEGORIES]
            if not categories or wrong:
                raise ValueError(f"twenty_questions: categories must be among {CATEGORIES}; "
                                 f"got {list(categories)}")
            self.objects = tuple(name for name, category, _ in OBJECTS if category in categories)
        else:
            self.objects = OBJECT_NAMES
        if isinstance(max_questions, bool) or not isinstance(max_questions, int) or max_questions < 1:
            raise ValueError(f"twenty_questions: max_questions must be a positive int, got {max_questions!r}")
        self.max_questions = self.max_turns = max_questions
        self.return_bounds = (-float(max_questions), 0.0)
        self.secret = ""
        # (kind, attribute key or object name, answer) of each understood question; for behaviour policies
        self.history: list[tuple[str, str, str]] = []

    def answer(self, question: str) -> str:
        """The oracle's answer to ``question`` about the hidden object (no turn is taken)."""
        parsed = parse_question(question)
        if parsed is None:
            return UNKNOWN
        kind, what = parsed
        truth = what in object_attributes()[self.secret] if kind == "attribute" else what == self.secret
        return YES if truth else NO

    def consistent(self) -> list[str]:
        """The game's objects consistent with the answers so far."""
        return consistent_objects(self.objects, self.history)

    def expected_optimal_return(self) -> float:
        """The optimal expected return over the game's objects (``optimal_total_questions``)."""
        return -optimal_total_questions(self.objects) / len(self.objects)

    def _reset(self, seed: int) -> str:
        self.secret = random.Random(seed).choice(self.objects)
        self.history = []
        return PROMPT

    def _step(self, action: str) -> StepResult:
        parsed = parse_question(action)
        answer = self.answer(action)
        if parsed is not None:
            self.history.append((*parsed, answer))
        if parsed is not None and parsed[0] == "guess" and answer == YES:
            return StepResult(answer + "\n", 0.0, True, {"success": True})
        return StepResult(answer + "\n", -1.0, self.turn >= self.max_questions, {"success": False})
