"""The trainer's check of its training data before the first step: every episode, streamed.

``preflight(config, tokenizer)`` runs every record of the configured source (JSONL files or a
prepared TFDS split) through ``EpisodeProcessor``, the per-episode path the input pipeline runs, with
the run's tokenizer and data config, so every problem the pipeline would meet mid-run is found
before anything is trained or checkpointed, and a resumed run cannot crash at a bad line either. It
reads one record at a time and keeps only counts and the first few problems and dropped lines, so
its memory does not grow with the data.

Outcomes:

- invalid episodes: ``EpisodeError`` (a ``UserError``) whose message is a header line, the first
  ``max_problems`` problems as ``FILE:LINE: field: message``, then the count of the rest;
- no file, no episode, or no episode left after the length checks: ``DataError`` naming the field;
- otherwise the ``Summary``, printed as one line (how many of how many episodes were truncated and
  dropped for ``data.max_length``, the first dropped episodes' ``FILE:LINE``, the episodes holding
  characters encoded as unk, and as a warning the turn boundaries BPE may join,
  ``mdp.boundary_problems``, with the first one's ``FILE:LINE: turns[j].text``) and, given
  ``tensorboard_dir``, written there as scalars under ``data/`` at step 0.
"""
from __future__ import annotations

from typing import Iterator

from qsft_jax import progress
from qsft_jax.data import episodes as episodes_lib
from qsft_jax.data.episodes import DataError, EpisodeError, Problem
from qsft_jax.data.loading import DataConfig, EpisodeProcessor, Summary

MAX_PROBLEMS = 20  # problems listed in the error; the rest are counted
MAX_DROPPED_SHOWN = 5  # dropped episodes named in the summary line


def source_name(config: DataConfig) -> str:
    """The data source as the messages name it: the JSONL path(s) or ``NAME[SPLIT]``."""
    if config.source == "tfds":
        return f"{config.tfds_name}[{config.split}]"
    return config.path if isinstance(config.path, str) else ", ".join(config.path)


def iter_records(config: DataConfig) -> Iterator[tuple[str, int, bytes | str]]:
    """(file or source name, 1-based line or record number, raw record) for every record, one at a time.

    Raises ``DataError`` when the source does not exist.
    """
    if config.source == "jsonl":
        if not config.path:
            raise DataError("data.path: empty; give a JSONL file, glob or directory")
        try:
            files = episodes_lib.resolve_paths(config.path if isinstance(config.path, str) else list(config.path))
        except FileNotFoundError as e:
            raise DataError(f"data.path: {e}; give an existing JSONL file, glob or directory") from None
        return episodes_lib.iter_lines(files)
    from qsft_jax.data.pipeline import RecordSource
    from qsft_jax.data.tfds_builders import load_data_source

    try:
        source = load_data_source(config.tfds_name, data_dir=config.tfds_data_dir, split=config.split)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"data.tfds_name: {e}") from None
    records = RecordSource(source, name=source_name(config))
    return (records[i] for i in range(len(records)))


def summary_line(summary: Summary, config: DataConfig) -> str:
    """The one-line start-up summary of a check that passed."""
    line = (f"data ({source_name(config)}): {summary.truncated} of {summary.read} episodes truncated, "
            f"{summary.num_dropped} dropped for data.max_length={config.max_length} "
            f"(data.overlong={config.overlong!r}); {summary.kept} kept")
    if summary.dropped_at:
        shown = ", ".join(f"{d.file}:{d.line}" for d in summary.dropped_at)
        rest = summary.num_dropped - len(summary.dropped_at)
        line += f"; dropped: {shown}" + (f" and {rest} more" if rest > 0 else "")
    if summary.unknown_chars:
        line += (f"; {summary.unknown_chars} hold characters outside the tokenizer's alphabet, encoded "
                 "as unk (data.unknown_chars='unk')")
    if summary.boundary_warnings:
        first = summary.boundaries_at[0]
        line += (f"; warning: {summary.boundary_warnings} turn boundaries in {summary.boundary_episodes} "
                 f"episodes may be joined by BPE in the whole text, where each turn is encoded on its own "
                 f"(first: {first.file}:{first.line}: {first.field}; python -m qsft_jax.data validate "
                 "lists every one)")
    return line


def write_scalars(summary: Summary, tensorboard_dir: str) -> None:
    """The summary's counts as TensorBoard scalars under ``data/`` at step 0."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(tensorboard_dir) as writer:
        for name, value in summary.scalars().items():
            writer.add_scalar(name, value, 0)


def preflight(
    config: DataConfig,
    tokenizer,
    *,
    max_problems: int = MAX_PROBLEMS,
    tensorboard_dir: str | None = None,
    echo: bool = True,
) -> Summary:
    """Checks every training episode as the input pipeline will process it; returns the summary.

    Raises ``EpisodeError`` listing the first ``max_problems`` problems (and counting the rest) when
    any episode is invalid, ``DataError`` when the source is missing or empty or no episode is left to
    train on. echo: print the one-line summary, and the count and rate of the episodes checked while it
    runs (`qsft_jax.progress`); tensorboard_dir: write its scalars there.
    """
    config = DataConfig.from_config(config)
    processor = EpisodeProcessor(config, tokenizer)
    summary = Summary(max_locations=MAX_DROPPED_SHOWN)
    problems: list[Problem] = []
    more = 0
    records = progress.track(iter_records(config), None, f"data check ({source_name(config)})",
                             "episodes", enabled=echo)
    for file, line, raw in records:
        outcome = processor(raw, file, line)
        summary.add(outcome, file, line)
        room = max_problems - len(problems)
        problems.extend(outcome.problems[:room])
        more += max(len(outcome.problems) - max(room, 0), 0)
    if problems:
        raise EpisodeError(
            problems,
            header=(f"data ({source_name(config)}): {summary.invalid} of {summary.read} episodes are "
                    f"invalid ({len(problems) + more} problems); no step was run. Fix or remove "
                    "these lines, then run again:"),
            more=more)
    if summary.read == 0:
        raise DataError(f"data.path: {source_name(config)} holds no episodes (every line is blank)")
    if summary.kept == 0:
        raise DataError(
            f"data.max_length: no episode is left to train on: {summary_line(summary, config)}. "
            "Raise data.max_length, or set data.overlong='truncate' to keep the turns that fit")
    if echo:
        print(summary_line(summary, config), flush=True)
    if tensorboard_dir:
        write_scalars(summary, tensorboard_dir)
    return summary
