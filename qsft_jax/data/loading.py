"""The data config, the one per-episode path (parse -> validate -> transform rewards -> tokenise -> fit to
length -> arrays) shared by the validator, ``load_episodes`` and the grain pipeline, and the summary.

Data config fields (``DataConfig``; a dict or ``ml_collections.ConfigDict`` with these keys works too):

- ``path``: JSONL file, glob, directory, or a list of them (source = "jsonl");
- ``source``: "jsonl" or "tfds"; for tfds: ``tfds_name`` (a prepared dataset under ``tfds_data_dir``:
  ``NAME``, ``NAME/CONFIG`` or ``NAME/CONFIG/VERSION``, or the prepared directory itself; build it first
  with ``python -m qsft_jax.data build data/NAME --data_dir=DIR``), ``tfds_data_dir``, ``split`` (default
  "train");
- ``max_length`` (L, row length, BOS included), ``overlong``: "truncate" | "drop" (what happens to an
  episode longer than L; the trainer's start-up summary counts both and names the first dropped lines,
  ``python -m qsft_jax.data validate`` names every dropped line);
- ``unknown_chars``: "error" (default) | "unk": what a character the tokenizer can only encode as its
  unknown token is (a ``CharTokenizer``'s characters outside its alphabet, e.g. non-ASCII with the
  default alphabet; BPE tokenizers cover every string). "error" reports ``FILE:LINE: turns[i].text``
  with the characters; "unk" encodes them as the unk token and the summary counts those episodes;
- ``pack``: first-fit several episodes per row (True) or one episode per row (False); ``pack_window``:
  episodes considered together by first-fit (larger = fuller rows, more memory);
- ``reward_transform``: see ``rewards.RewardTransform`` (a spec string or a dict); an affine transform
  with low != 0 adds a constant per action turn, so it can reorder returns of episodes of different
  lengths (logged once as a warning; see rewards.py);
- ``gamma`` (across turns), ``gamma_token`` (inside an utterance);
- ``observation_template``, ``action_template``: format strings with ``{text}``;
- ``format``: "plain" (each turn's text encoded on its own behind one BOS) or "chat" (the episode as a
  conversation of user / assistant messages rendered by a chat template: ``qsft_jax/data/chat.py``);
  ``system_prompt`` (chat: a system message first when non-empty); ``chat_template`` (chat: "" = the
  tokenizer's own, else a Jinja template string or "file:PATH");
- ``shuffle_seed``; ``num_epochs`` (None = repeat forever); ``num_workers`` (grain worker processes, 0 =
  in-process); ``read_threads`` (grain reader threads per process: 0 for in-memory JSONL, where threads
  only contend for the GIL; a few for array_record files on slow disks).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from qsft_jax.data import episodes as episodes_lib
from qsft_jax.data import mdp
from qsft_jax.data.episodes import DataError, Episode, EpisodeError, Problem
from qsft_jax.data.rewards import RETURN_TOLERANCE, AffineLengthWarning, RewardTransform, transform_rewards


UNKNOWN_CHARS_MODES = ("error", "unk")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | tuple[str, ...] = ""
    source: str = "jsonl"
    tfds_name: str = ""
    tfds_data_dir: str = ""
    split: str = "train"
    max_length: int = 256
    overlong: str = "truncate"
    pack: bool = True
    pack_window: int = 64
    reward_transform: RewardTransform = dataclasses.field(default_factory=RewardTransform)
    gamma: float = 1.0
    gamma_token: float = 1.0
    observation_template: str = "{text}"
    action_template: str = "{text}"
    format: str = "plain"
    system_prompt: str = ""
    chat_template: str = ""
    unknown_chars: str = "error"
    shuffle_seed: int = 0
    num_epochs: int | None = 1
    num_workers: int = 0
    read_threads: int = 0

    def __post_init__(self):
        """Checks every field; a bad one raises ``DataError`` ("data.FIELD: ...")."""
        try:
            object.__setattr__(self, "reward_transform", RewardTransform.from_config(self.reward_transform))
            self.mdp  # validates max_length, gamma, templates, overlong
            if self.reward_transform.kind == "affine":
                self.reward_transform.horizon(self.gamma)  # affine with gamma = 1 needs max_turns
        except (ValueError, TypeError) as e:
            raise DataError(f"data.{e}") from None
        if isinstance(self.path, list):
            object.__setattr__(self, "path", tuple(self.path))
        if self.source not in ("jsonl", "tfds"):
            raise DataError(f"data.source: expected 'jsonl' or 'tfds', got {self.source!r}")
        if self.unknown_chars not in UNKNOWN_CHARS_MODES:
            raise DataError(f"data.unknown_chars: expected one of {UNKNOWN_CHARS_MODES}, got {self.unknown_chars!r}")
        if self.pack_window < 1:
            raise DataError(f"data.pack_window: must be >= 1, got {self.pack_window}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"data.num_epochs: must be >= 1 or None, got {self.num_epochs}")

    @property
    def mdp(self) -> mdp.MDPConfig:
        return mdp.MDPConfig(
            max_length=self.max_length,
            gamma=self.gamma,
            gamma_token=self.gamma_token,
            overlong=self.overlong,
            observation_template=self.observation_template,
            action_template=self.action_template,
            format=self.format,
            system_prompt=self.system_prompt,
            chat_template=self.chat_template,
        )

    @classmethod
    def from_config(cls, config: Any = None, **overrides) -> "DataConfig":
        """From a DataConfig, a dict or a ConfigDict (unknown keys are an error), plus keyword overrides."""
        if config is None:
            fields = {}
        elif isinstance(config, cls):
            fields = dataclasses.asdict(config)
            fields["reward_transform"] = config.reward_transform
        else:
            if hasattr(config, "to_dict"):
                config = config.to_dict()
            if not isinstance(config, Mapping):
                raise TypeError(f"data config: expected a mapping, got {type(config).__name__}")
            fields = dict(config)
        fields.update(overrides)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = set(fields) - set(known)
        if unknown:
            raise DataError(f"data config: unknown fields {sorted(unknown)} (config.data.FIELD); known: "
                            f"{', '.join(sorted(known))}")
        return cls(**fields)


@dataclasses.dataclass
class Outcome:
    """What happened to one episode. status: kept | truncated | dropped | invalid."""

    status: str
    arrays: dict[str, np.ndarray] | None = None  # per-episode arrays [n] when kept or truncated
    episode: Episode | None = None
    problems: list[Problem] = dataclasses.field(default_factory=list)
    reason: str = ""  # why it was dropped
    unknown_chars: bool = False  # kept with characters encoded as unk (data.unknown_chars = "unk")


@dataclasses.dataclass(frozen=True)
class Dropped:
    """Where a dropped episode was and why, printed as ``FILE:LINE: dropped: reason``."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: dropped: {self.reason}"


@dataclasses.dataclass
class Summary:
    """Counts of what happened to the episodes read, and where the first ``max_locations`` dropped
    episodes were (None: all of them; bounded, so a summary of any file size fits in memory)."""

    read: int = 0
    kept: int = 0  # including truncated ones
    truncated: int = 0
    invalid: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> count
    unknown_chars: int = 0  # kept episodes holding characters encoded as unk
    max_locations: int | None = 5
    dropped_at: list[Dropped] = dataclasses.field(default_factory=list)

    def add(self, outcome: Outcome, file: str = "<memory>", line: int = 0) -> None:
        self.read += 1
        if outcome.status in ("kept", "truncated"):
            self.kept += 1
            self.truncated += outcome.status == "truncated"
            self.unknown_chars += outcome.unknown_chars
        elif outcome.status == "dropped":
            self.dropped[outcome.reason] += 1
            if self.max_locations is None or len(self.dropped_at) < self.max_locations:
                self.dropped_at.append(Dropped(file, line, outcome.reason))
        else:
            self.invalid += 1

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def format(self) -> str:
        lines = [
            f"episodes read: {self.read}",
            f"kept: {self.kept} (of which truncated: {self.truncated})",
            f"dropped: {self.num_dropped}",
        ]
        lines += [f"  {n} {reason}" for reason, n in sorted(self.dropped.items())]
        lines.append(f"invalid: {self.invalid}")
        if self.unknown_chars:
            lines.append(f"kept with characters encoded as unk: {self.unknown_chars}")
        return "\n".join(lines)

    def scalars(self) -> dict[str, float]:
        """The counts as TensorBoard scalars under ``data/``."""
        read = max(self.read, 1)
        return {
            "data/episodes": float(self.read),
            "data/kept": float(self.kept),
            "data/truncated": float(self.truncated),
            "data/dropped": float(self.num_dropped),
            "data/truncated_fraction": self.truncated / read,
            "data/dropped_fraction": self.num_dropped / read,
            "data/unknown_chars": float(self.unknown_chars),
        }


class EpisodeProcessor:
    """Runs one record through every check and, with a tokenizer, into arrays.

    Without a tokenizer only the format and reward checks run (no length checks, no arrays).
    """

    def __init__(self, config: DataConfig, tokenizer=None):
        self.config = config
        self.mdp_config = config.mdp
        self.tokenizer = tokenizer
        if tokenizer is not None:
            mdp.check_format(tokenizer, self.mdp_config)
        self.length_warning = AffineLengthWarning(config.reward_transform)

    def __call__(self, record: bytes | str | dict | Episode, file: str = "<memory>", line: int = 0) -> Outcome:
        if isinstance(record, Episode):
            episode, problems = record, []
        elif isinstance(record, dict):
            episode, problems = episodes_lib.parse_episode(record, file, line)
        else:
            episode, problems = episodes_lib.parse_line(record, file, line)
        if problems:
            return Outcome("invalid", problems=problems)
        turn_rewards, problems = transform_rewards(episode, self.config.reward_transform, self.config.gamma)
        if problems:
            return Outcome("invalid", episode=episode, problems=problems)
        self.length_warning.see(episode)
        if self.tokenizer is None:
            return Outcome("kept", episode=episode)
        tokenized, problems = mdp.tokenize_episode(episode, turn_rewards, self.tokenizer, self.mdp_config)
        if tokenized is not None and self.config.unknown_chars == "error":
            problems = mdp.unknown_character_problems(episode, tokenized.tokens, self.tokenizer, self.mdp_config)
        if problems:
            return Outcome("invalid", episode=episode, problems=problems)
        fitted, status = mdp.fit_to_length(tokenized, self.mdp_config.max_length, self.mdp_config.overlong)
        if fitted is None:
            return Outcome("dropped", episode=episode, reason=status)
        unknown = mdp.holds_unknown(fitted.tokens, self.tokenizer)
        arrays = mdp.episode_arrays(fitted, self.mdp_config.gamma, self.mdp_config.gamma_token)
        rtg = arrays["returns_to_go"]
        bad = np.flatnonzero((rtg < -RETURN_TOLERANCE) | (rtg > 1 + RETURN_TOLERANCE))
        if len(bad):  # only reachable with negative rewards and gamma_token < 1 (turn-level check passed)
            i = bad[0]
            return Outcome(
                "invalid",
                episode=episode,
                problems=[Problem(file, line, "turns", f"token-level return-to-go {rtg[i]:g} at token {i} "
                                  f"(action turn {arrays['turn_index'][i]}) outside [0, 1] with gamma_token="
                                  f"{self.mdp_config.gamma_token:g}")],
            )
        return Outcome(status, arrays=arrays, episode=episode, unknown_chars=unknown)


def validate_paths(paths: str | Sequence[str], config: DataConfig, tokenizer=None) -> tuple[list[Problem], Summary]:
    """Checks every episode of the files; returns all problems and the summary (which lists every
    dropped episode in ``dropped_at``). Never raises on bad data."""
    processor = EpisodeProcessor(config, tokenizer)
    problems: list[Problem] = []
    summary = Summary(max_locations=None)
    for file, line, raw in episodes_lib.iter_lines(paths):
        outcome = processor(raw, file, line)
        summary.add(outcome, file, line)
        problems.extend(outcome.problems)
    return problems, summary


@dataclasses.dataclass
class LoadedEpisodes:
    episodes: list[Episode]  # kept episodes, in file order
    arrays: list[dict[str, np.ndarray]]  # their per-episode arrays [n] (empty without a tokenizer)
    summary: Summary


def load_episodes(paths: str | Sequence[str], config: DataConfig | Mapping | None = None, tokenizer=None) -> LoadedEpisodes:
    """Reads, validates and (with a tokenizer) tokenises episodes. Raises ``EpisodeError`` listing every
    problem when any episode is invalid; dropped episodes are counted in the summary."""
    config = DataConfig.from_config(config)
    processor = EpisodeProcessor(config, tokenizer)
    kept, arrays, problems, summary = [], [], [], Summary()
    for file, line, raw in episodes_lib.iter_lines(paths):
        outcome = processor(raw, file, line)
        summary.add(outcome, file, line)
        problems.extend(outcome.problems)
        if outcome.status in ("kept", "truncated"):
            kept.append(outcome.episode)
            if outcome.arrays is not None:
                arrays.append(outcome.arrays)
    if problems:
        raise EpisodeError(problems)
    return LoadedEpisodes(kept, arrays, summary)


def episodes_to_batch(
    episodes: Iterable[dict | Episode], config: DataConfig | Mapping, tokenizer, *, pack: bool | None = None
) -> dict[str, np.ndarray]:
    """In-memory episodes (dicts in the JSONL format) -> one batch dict of [B, L] arrays (for analysis and
    tests). Raises ``EpisodeError`` on invalid episodes and ``DataError`` when one is dropped."""
    config = DataConfig.from_config(config)
    processor = EpisodeProcessor(config, tokenizer)
    per_episode, problems = [], []
    for i, ep in enumerate(episodes):
        outcome = processor(ep, "<episodes>", i + 1)
        problems.extend(outcome.problems)
        if outcome.status == "dropped":
            raise DataError(f"<episodes>:{i + 1}: episode dropped: {outcome.reason}")
        if outcome.arrays is not None:
            per_episode.append(outcome.arrays)
    if problems:
        raise EpisodeError(problems)
    pack = config.pack if pack is None else pack
    L, pad = config.max_length, tokenizer.pad_id
    rows = mdp.pack_episodes(per_episode, L, pad) if pack else [mdp.pad_episode(a, L, pad) for a in per_episode]
    return mdp.stack_rows(rows)
