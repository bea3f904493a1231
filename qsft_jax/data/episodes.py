"""The JSONL episode format, reading and structural validation.

One episode per line::

    {"turns": [{"text": "...", "action": false},
               {"text": "...", "action": true, "reward": 0.0}, ...],
     "done": true, "id": "optional", "meta": {}}

Fields. Episode: ``turns`` (required, non-empty list), ``done`` (required bool), ``id`` (optional str or
int), ``meta`` (optional object). Turn: ``text`` (required str; non-empty on action turns), ``action``
(required bool), ``reward`` (optional finite number, action turns only; missing means 0).

Every problem is reported as ``FILE:LINE: field: message`` (``Problem``); blank lines are skipped.
Checks that need a reward transform or a tokenizer live in ``rewards.py`` and ``mdp.py``; ``loading.py``
runs them all in order.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Iterable, Iterator, Sequence

from qsft_jax import storage
from qsft_jax.errors import UserError

EPISODE_FIELDS = {"turns", "done", "id", "meta"}
TURN_FIELDS = {"text", "action", "reward"}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One validation problem, printed as ``FILE:LINE: field: message``."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class DataError(UserError, ValueError):
    """The training data cannot be used as configured (missing, empty, invalid, nothing left to train on)."""


class EpisodeError(DataError):
    """Raised when an episode that must be used (training, analysis) is invalid; carries its problems.

    The message is ``header`` (when given), one ``FILE:LINE: field: message`` line per problem, then a
    line counting the ``more`` problems that were found but not listed.
    """

    def __init__(self, problems: Sequence[Problem], *, header: str = "", more: int = 0):
        self.problems = list(problems)
        self.more = more
        lines = ([header] if header else []) + [str(p) for p in self.problems]
        if more:
            lines.append(f"... and {more} more problem{'s' * (more != 1)} "
                         "(python -m qsft_jax.data validate lists every one)")
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Turn:
    text: str
    action: bool
    reward: float = 0.0  # original units; only action turns carry one


@dataclasses.dataclass(frozen=True)
class Episode:
    turns: tuple[Turn, ...]
    done: bool
    id: str | int | None = None
    meta: dict | None = None
    file: str = "<memory>"  # where it came from, for messages
    line: int = 0

    @property
    def num_actions(self) -> int:
        return sum(t.action for t in self.turns)

    def to_dict(self) -> dict:
        turns = []
        for t in self.turns:
            d: dict[str, Any] = {"text": t.text, "action": t.action}
            if t.action:
                d["reward"] = t.reward
            turns.append(d)
        out: dict[str, Any] = {"turns": turns, "done": self.done}
        if self.id is not None:
            out["id"] = self.id
        if self.meta:
            out["meta"] = self.meta
        return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_episode(obj: Any, file: str = "<memory>", line: int = 0) -> tuple[Episode | None, list[Problem]]:
    """Checks the structure of one decoded JSON value and builds an ``Episode``.

    Returns (episode, []) when valid, (None, problems) otherwise; all problems of the episode are listed.
    """
    problems: list[Problem] = []

    def bad(field: str, message: str) -> None:
        problems.append(Problem(file, line, field, message))

    if not isinstance(obj, dict):
        bad("episode", f"expected a JSON object, got {type(obj).__name__}")
        return None, problems
    for key in sorted(set(obj) - EPISODE_FIELDS):
        bad(key, f"unknown field (allowed: {', '.join(sorted(EPISODE_FIELDS))})")
    if "done" not in obj:
        bad("done", "missing field (true if the episode finished, false if it was cut off)")
    elif not isinstance(obj["done"], bool):
        bad("done", f"expected true or false, got {obj['done']!r}")
    if "id" in obj and not (isinstance(obj["id"], str) or (isinstance(obj["id"], int) and not isinstance(obj["id"], bool))):
        bad("id", f"expected a string or an integer, got {type(obj['id']).__name__}")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        bad("meta", f"expected a JSON object, got {type(obj['meta']).__name__}")
    turns: list[Turn] = []
    if "turns" not in obj:
        bad("turns", "missing field")
    elif not isinstance(obj["turns"], list):
        bad("turns", f"expected a list of turns, got {type(obj['turns']).__name__}")
    elif not obj["turns"]:
        bad("turns", "episode has no turns")
    else:
        for j, t in enumerate(obj["turns"]):
            where = f"turns[{j}]"
            if not isinstance(t, dict):
                bad(where, f"expected a JSON object, got {type(t).__name__}")
                continue
            for key in sorted(set(t) - TURN_FIELDS):
                bad(f"{where}.{key}", f"unknown field (allowed: {', '.join(sorted(TURN_FIELDS))})")
            ok = True
            if "action" not in t:
                bad(f"{where}.action", "missing field (true for the agent's turns, false for observations)")
                ok = False
            elif not isinstance(t["action"], bool):
                bad(f"{where}.action", f"expected true or false, got {t['action']!r}")
                ok = False
            if "text" not in t:
                bad(f"{where}.text", "missing field")
                ok = False
            elif not isinstance(t["text"], str):
                bad(f"{where}.text", f"expected a string, got {type(t['text']).__name__}")
                ok = False
            elif ok and t["action"] and not t["text"]:
                bad(f"{where}.text", "empty text on an action turn")
                ok = False
            reward = 0.0
            if "reward" in t:
                r = t["reward"]
                if not _is_number(r):
                    bad(f"{where}.reward", f"expected a number, got {r!r}")
                    ok = False
                elif not math.isfinite(r):
                    bad(f"{where}.reward", f"non-finite reward {r!r}")
                    ok = False
                elif isinstance(t.get("action"), bool) and not t["action"]:
                    bad(f"{where}.reward", "reward on an observation turn (action=false); rewards belong to action turns")
                    ok = False
                else:
                    reward = float(r)
            if ok:
                turns.append(Turn(t["text"], t["action"], reward))
        if not problems:
            if not any(t.action for t in turns):
                bad("turns", "episode has no action turn (nothing to train on)")
            elif obj.get("done") is False and turns[-1].action:
                bad(
                    "done",
                    "done=false but the last turn is an action: there is no next state to bootstrap from; "
                    "append the observation that followed it, or set done=true if the episode ended there",
                )
    if problems:
        return None, problems
    return Episode(tuple(turns), obj["done"], obj.get("id"), obj.get("meta"), file, line), []


def parse_line(text: str | bytes, file: str = "<memory>", line: int = 0) -> tuple[Episode | None, list[Problem]]:
    """Decodes one JSON line and checks it (see ``parse_episode``)."""
    try:
        obj = json.loads(text.rstrip())  # without the newline, so a column past the end is reported as such
    except json.JSONDecodeError as e:
        return None, [Problem(file, line, "json", f"malformed JSON: {e.msg} (column {e.colno})")]
    except UnicodeDecodeError as e:
        return None, [Problem(file, line, "json", f"not UTF-8: {e.reason}")]
    return parse_episode(obj, file, line)


def resolve_paths(paths: str | Sequence[str]) -> list[str]:
    """Expands files, globs and directories (all ``*.jsonl`` inside, recursively) into a sorted file list."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    files: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if storage.is_url(p):
            found = storage.url_files(p, ".jsonl")
            if not found:
                raise FileNotFoundError(f"{p}: no such file, directory or matching glob")
            files.extend(found)
        elif os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.jsonl"), recursive=True))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no *.jsonl files")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            found = sorted(glob.glob(p, recursive=True))
            if not found:
                raise FileNotFoundError(f"{p}: no such file, directory or matching glob")
            files.extend(f for f in found if os.path.isfile(f))
    # Keep order, drop duplicates (a file named twice would be read twice otherwise).
    return list(dict.fromkeys(files))


def iter_lines(paths: str | Sequence[str]) -> Iterator[tuple[str, int, bytes]]:
    """Yields (file, 1-based line number, raw line bytes) for every non-blank line of the resolved files.

    Lines stay bytes so that a line that is not UTF-8 is reported by ``parse_line`` with its number.
    """
    for file in resolve_paths(paths):
        with storage.path(file).open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    yield file, line_no, raw


def write_jsonl(path: str, episodes: Iterable[dict | Episode]) -> int:
    """Writes episodes (dicts in the JSONL format or ``Episode``s) one per line, to a local path or a
    URL, atomically (``storage.open_atomic``); returns the count."""
    n = 0
    with storage.open_atomic(path, "w", encoding="utf-8") as f:
        for ep in episodes:
            if isinstance(ep, Episode):
                ep = ep.to_dict()
            f.write(json.dumps(ep, ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n
