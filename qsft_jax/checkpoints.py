"""Checkpoints: an orbax CheckpointManager per phase, holding the train state and the data iterator.

WORKDIR/<phase>/checkpoints/N/ holds {"state": the train state, "data": the grain iterator} of step N
and WORKDIR/<phase>/DONE marks a finished phase (the whole workdir layout: `qsft_jax.run`).

Orbax writes each step into a temporary directory and renames it when complete, so a process killed
during a write leaves no directory that `latest_step()` takes for a finished checkpoint. The state is
saved from its shards by every process (no gather to one host) and restores onto any mesh: the
caller passes the abstract state with the target shardings.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


def phase_dir(workdir: str, phase: str) -> str:
  return os.path.join(os.path.abspath(workdir), phase)


def make_manager(workdir: str, phase: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """The phase's CheckpointManager: keeps the last `keep`, plus every `keep_every`-th step."""
  c = config.checkpoint
  options = ocp.CheckpointManagerOptions(
      max_to_keep=c.keep, keep_period=c.keep_every or None, create=True,
      enable_async_checkpointing=c.async_save)
  return ocp.CheckpointManager(os.path.join(phase_dir(workdir, phase), "checkpoints"), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_iterator=None) -> None:
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator=None) -> dict:
  """Restores `state` onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding) and,
  when given, moves `data_iterator` to the saved position. Returns the state."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


def mark_done(workdir: str, phase: str, step: int) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(phase_dir(workdir, phase), "DONE"), "w") as f:
      f.write(f"{step}\n")


def is_done(workdir: str, phase: str) -> bool:
  return os.path.exists(os.path.join(phase_dir(workdir, phase), "DONE"))


def restore_latest_params(workdir: str, phase: str, keys: Sequence[str], abstract_params: Any
                          ) -> tuple[int, dict] | None:
  """(step, {key: params}) of the phase's latest checkpoint, reading only the parameter sets `keys`
  of its state ("params", "target_params", "behaviour_params"; no optimizer state), each onto the
  shardings of `abstract_params` (ShapeDtypeStructs with .sharding). None without a checkpoint."""
  path = os.path.join(phase_dir(workdir, phase), "checkpoints")
  if not os.path.isdir(path):
    return None
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=("state", "data"))
  try:
    step = manager.latest_step()
    if step is None:
      return None
    abstract = {k: abstract_params for k in keys}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)))
  finally:
    manager.close()
  return step, restored["state"]
