"""A process's rows of the global batch, built from logical data shards.

The global batch of B rows is the concatenation, in shard order, of `num_shards` logical shards'
B / num_shards rows each; shard s is the pipeline run with (process_index=s, process_count=num_shards).
Process p of P reads only shards [p * S / P, (p + 1) * S / P), so no host builds the whole global
batch, and the global batch does not depend on how many processes share the work: one process with
S shards and S processes with one shard each train on exactly the same batches.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from qsft_jax.data.pipeline import iterator_state, make_train_iterator, restore_iterator


def owned_shards(num_shards: int, process_index: int, process_count: int) -> range:
  if num_shards % process_count:
    raise ValueError(f"data_shards={num_shards} must be a multiple of the process count {process_count}")
  per = num_shards // process_count
  return range(process_index * per, (process_index + 1) * per)


class ShardedBatchIterator:
  """Iterator of this process's rows {key: np.ndarray [B / P, L]}; checkpointable by grain's handler
  (get_state -> bytes, set_state(bytes), start_prefetch). `source`: the records every shard is cut
  from (default the config's source; filtered BC passes `pipeline.top_return_source`'s subset)."""

  def __init__(self, data_config: Any, tokenizer, *, global_batch_size: int, num_shards: int,
               process_index: int, process_count: int, seed: int, source=None):
    if global_batch_size % num_shards:
      raise ValueError(f"batch size {global_batch_size} does not divide into {num_shards} data shards")
    self.shards = owned_shards(num_shards, process_index, process_count)
    self.iterators = [
        make_train_iterator(data_config, tokenizer, process_index=s, process_count=num_shards,
                            batch_size_per_process=global_batch_size // num_shards, seed=seed,
                            source=source)
        for s in self.shards]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps({str(s): iterator_state(it) for s, it in zip(self.shards, self.iterators)}).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state)
    if sorted(states) != sorted(map(str, self.shards)):
      raise ValueError(f"data iterator checkpoint holds shards {sorted(states)}, this process reads "
                       f"{list(self.shards)}: restore with the same data_shards and process count")
    for s, it in zip(self.shards, self.iterators):
      restore_iterator(it, states[str(s)])

  def start_prefetch(self) -> None:
    pass
