"""The grain input pipeline: source -> shard by process -> shuffle (reshuffled each epoch) -> repeat ->
validate + transform + tokenise -> pack (first-fit) or pad -> batch of [b, L] numpy arrays.

Order of the stages and why:

1. ``source[process_index::process_count]``: each host reads a disjoint, fixed slice of the records;
   together the slices cover the data.
2. ``shuffle(seed)`` then ``repeat(num_epochs)``: grain reseeds the shuffle per epoch, deterministically.
3. ``map(EpisodeProcessor)``: every record runs through ``loading.EpisodeProcessor``; invalid records
   raise ``EpisodeError`` (validate files before training), over-long ones are truncated or dropped as
   configured and counted on ``PipelineStats``.
4. ``PackIterDataset``: episodes are read in windows of ``pack_window`` and packed first-fit into rows
   (or padded one per row). Its checkpoint state is the upstream state at the window's start plus the
   number of rows already emitted; restoring re-reads that window and skips those rows, so a restored
   iterator yields exactly the batches an uninterrupted one would.
5. ``batch(batch_size_per_process, drop_remainder=True)`` with ``mdp.stack_rows``.

6. Optionally (``num_workers > 0``) grain's ``mp_prefetch`` runs stages 1-5 in worker processes, each on
   its own slice, and interleaves their batches: deterministic and resumable for a fixed num_workers, but a
   different order than in-process, and changing num_workers changes the order.

Multi-host: shards hold len // process_count or one more records and pack differently, so with a finite
``num_epochs`` hosts can run out after different numbers of batches; a trainer that steps all hosts
together should use ``num_epochs=None`` (repeat forever) and stop by step count.

JSONL sources are read into memory (raw lines); for data sets larger than memory, prepare a TFDS
array_record dataset (``tfds_builders.py``) and set ``source="tfds"``.

Checkpointing: ``iterator_state(it)`` returns a JSON-serialisable dict (``it.get_state()``) that the
trainer stores, ``restore_iterator(it, state)`` calls ``it.set_state``. With an orbax
``CheckpointManager(..., item_names=(..., "data"))``, grain's own handler writes one JSON file per process:
``mgr.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it)))`` and
``mgr.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(fresh_it)))``
(tested in tests/test_data_pipeline.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Sequence

import grain
import numpy as np

from qsft_jax.data import episodes as episodes_lib
from qsft_jax.data import mdp
from qsft_jax.data.loading import DataConfig, EpisodeProcessor, select_top_returns
from qsft_jax.data.episodes import EpisodeError

log = logging.getLogger(__name__)


class JsonlSource:
    """Random-access source over the lines of JSONL files, held in memory.

    Records are (file, line number, raw line bytes) so error messages keep their location.
    """

    def __init__(self, paths: str | Sequence[str]):
        self._records = list(episodes_lib.iter_lines(paths))
        if not self._records:
            raise ValueError(f"{paths}: no episodes (all files empty)")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[str, int, bytes]:
        return self._records[index]


class RecordSource:
    """Wraps a data source of episode JSON strings (a TFDS ``as_data_source()`` split whose records are
    dicts with an ``episode`` field, or any sequence of str/bytes) as (name, record index + 1, raw)."""

    def __init__(self, source, name: str, field: str = "episode"):
        self._source, self._name, self._field = source, name, field

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[str, int, bytes | str]:
        record = self._source[index]
        if isinstance(record, dict):
            record = record[self._field]
        return self._name, int(index) + 1, record


class SubsetSource:
    """The records of ``source`` at ``indices`` (int [K], ascending), as a random-access source: what
    filtered BC trains on (``top_return_source``). Sharding, shuffling and packing apply to it as to any
    source."""

    def __init__(self, source, indices: Sequence[int]):
        self._source, self._indices = source, np.asarray(indices, np.int64)
        if len(self._indices) and not 0 <= int(self._indices.min()) <= int(self._indices.max()) < len(source):
            raise ValueError(f"subset indices outside [0, {len(source)})")

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._source[int(self._indices[index])]


def top_return_source(config: DataConfig, tokenizer, top_fraction: float, source=None):
    """(SubsetSource, ``loading.ReturnSelection``): the records of the config's source (or ``source``)
    whose episode's first-action return is at or above the (1 - top_fraction) quantile of all returns
    the pipeline would train on, ties kept (``loading.select_top_returns``; one pass over the source).
    Deterministic, so every process selects the same records before taking its shard."""
    source = make_source(config) if source is None else source
    selection = select_top_returns((source[i] for i in range(len(source))), config, tokenizer, top_fraction)
    return SubsetSource(source, selection.indices), selection


@dataclasses.dataclass
class PipelineStats:
    """Counts of this process's pipeline since it started (not checkpointed; for logging)."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0


class _ProcessRecord:
    """grain map: (file, line, raw) -> per-episode arrays, or None when dropped."""

    def __init__(self, config: DataConfig, tokenizer, stats: PipelineStats):
        self._processor = EpisodeProcessor(config, tokenizer)
        self._stats = stats

    def __call__(self, record):
        file, line, raw = record
        outcome = self._processor(raw, file, line)
        if outcome.status == "invalid":
            raise EpisodeError(outcome.problems)
        if outcome.status == "dropped":
            self._stats.dropped += 1
            if self._stats.dropped <= 10:
                log.warning("%s:%d: episode dropped: %s", file, line, outcome.reason)
            return None
        self._stats.kept += 1
        self._stats.truncated += outcome.status == "truncated"
        return outcome.arrays


class PackIterDataset(grain.IterDataset):
    """Per-episode arrays -> [L] rows, packed first-fit within windows of ``window`` episodes, or padded."""

    def __init__(self, parent: grain.IterDataset, *, window: int, max_length: int, pad_id: int, pack: bool):
        super().__init__(parent)
        self._window, self._max_length, self._pad_id, self._pack = window, max_length, pad_id, pack

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._window, self._max_length, self._pad_id, self._pack)


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, window: int, max_length: int, pad_id: int, pack: bool):
        super().__init__(parent)
        self._window, self._max_length, self._pad_id, self._pack = window, max_length, pad_id, pack
        self._window_start_state = parent.get_state()
        self._rows: list[dict[str, np.ndarray]] = []
        self._emitted = 0  # rows of the current window already returned

    def _fill(self) -> None:
        """Reads the next window from the parent and packs it."""
        self._window_start_state = self._parent.get_state()
        self._emitted = 0
        episodes = []
        for _ in range(self._window):
            try:
                arrays = next(self._parent)
            except StopIteration:
                break
            if arrays is not None:
                episodes.append(arrays)
        if self._pack:
            self._rows = mdp.pack_episodes(episodes, self._max_length, self._pad_id)
        else:
            self._rows = [mdp.pad_episode(a, self._max_length, self._pad_id) for a in episodes]

    def __next__(self) -> dict[str, np.ndarray]:
        while self._emitted >= len(self._rows):
            self._fill()
            if not self._rows:
                raise StopIteration
        row = self._rows[self._emitted]
        self._emitted += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"window_start": self._window_start_state, "rows_emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["window_start"])
        self._rows, self._emitted = [], 0
        rows_emitted = int(state["rows_emitted"])
        if rows_emitted:
            self._fill()
            if rows_emitted > len(self._rows):
                raise ValueError(f"iterator state says {rows_emitted} rows were emitted, the window holds {len(self._rows)}")
            self._emitted = rows_emitted
        else:
            self._window_start_state = state["window_start"]


def make_source(config: DataConfig):
    """The random-access record source named by the config (JSONL files or a prepared TFDS dataset)."""
    if config.source == "jsonl":
        if not config.path:
            raise ValueError("data.path: empty; give a JSONL file, glob or directory")
        return JsonlSource(config.path if isinstance(config.path, str) else list(config.path))
    from qsft_jax.data.tfds_builders import load_data_source

    source = load_data_source(config.tfds_name, data_dir=config.tfds_data_dir, split=config.split)
    return RecordSource(source, name=f"{config.tfds_name}[{config.split}]")


def make_dataset(
    config: DataConfig,
    tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    batch_size_per_process: int,
    seed: int | None = None,
    source=None,
    stats: PipelineStats | None = None,
) -> grain.IterDataset:
    """The pipeline as a grain IterDataset of batch dicts [b, L] (see the module docstring).

    ``seed`` overrides ``config.shuffle_seed``; ``source`` overrides the config's source (a sequence of
    (name, line, raw) records).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if batch_size_per_process < 1:
        raise ValueError(f"batch_size_per_process must be >= 1, got {batch_size_per_process}")
    source = make_source(config) if source is None else source
    if len(source) < process_count:
        raise ValueError(f"{len(source)} records cannot be sharded over {process_count} processes")
    seed = config.shuffle_seed if seed is None else seed
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat(config.num_epochs)
    ds = ds.map(_ProcessRecord(config, tokenizer, stats if stats is not None else PipelineStats()))
    it_ds = PackIterDataset(
        # None = dropped episode; the packer skips it.
        ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads), allow_nones=True),
        window=config.pack_window,
        max_length=config.max_length,
        pad_id=tokenizer.pad_id,
        pack=config.pack,
    )
    it_ds = it_ds.batch(batch_size_per_process, drop_remainder=True, batch_fn=mdp.stack_rows)
    if config.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return it_ds


def make_train_iterator(
    config: DataConfig | Any,
    tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    batch_size_per_process: int,
    seed: int | None = None,
    stats: PipelineStats | None = None,
    source=None,
) -> grain.DatasetIterator:
    """Iterator of dict[str, np.ndarray [b, L]] batches (keys of ``mdp.ARRAY_SPECS``); checkpointable.
    ``source`` overrides the config's record source (e.g. ``top_return_source``'s subset)."""
    config = DataConfig.from_config(config)
    return iter(
        make_dataset(
            config,
            tokenizer,
            process_index=process_index,
            process_count=process_count,
            batch_size_per_process=batch_size_per_process,
            seed=seed,
            source=source,
            stats=stats,
        )
    )


def iterator_state(it: grain.DatasetIterator) -> dict:
    """The iterator's position as a JSON-serialisable dict (plain ints/strings/lists)."""
    return json.loads(json.dumps(it.get_state(), default=_to_builtin))


def restore_iterator(it: grain.DatasetIterator, state: dict | str | bytes) -> grain.DatasetIterator:
    """Moves a freshly built iterator (same config, seed, process) to a saved position; returns it."""
    if isinstance(state, (str, bytes)):
        state = json.loads(state)
    it.set_state(state)
    return it


def _to_builtin(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"iterator state holds a {type(x).__name__}, which is not JSON-serialisable")
