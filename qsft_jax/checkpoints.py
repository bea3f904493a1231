"""Checkpoints: an orbax CheckpointManager per phase, holding the train state, the data iterator and
the phase's metrics log.

WORKDIR/<phase>/checkpoints/N/ holds {"state": the train state, "data": the grain iterator,
"history": the metrics log up to step N} of step N, and WORKDIR/<phase>/DONE marks a finished phase
(the whole workdir layout: `qsft_jax.run`).

Orbax writes each step into a temporary directory and renames it when complete, so a process killed
during a write leaves no directory that `latest_step()` takes for a finished checkpoint. The state is
saved from its shards by every process (no gather to one host) and restores onto any mesh: the
caller passes the abstract state with the target shardings.

A complete checkpoint can still be damaged afterwards (a truncated or deleted file, an emptied
metadata file, an empty step directory). `restore_latest` then falls back to the newest step that
restores, and moves each newer damaged step aside to WORKDIR/<phase>/checkpoints/N.broken (kept for
inspection; orbax ignores the name, and a later save of step N finds the name free). When no step
restores it raises `CheckpointError` and changes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from qsft_jax import storage
from qsft_jax.errors import ConfigError, UserError

ITEMS = ("state", "data", "history", "base")
BROKEN_SUFFIX = ".broken"
BASE_KEY = "base"  # a LoRA state's frozen base: never saved (see `without_base`)


class CheckpointError(UserError):
  """No checkpoint of a phase can be restored; the message lists each step and why."""


def without_base(tree: dict) -> dict:
  """A train state (or its shardings / abstract state) without a LoRA state's frozen "base": what a
  checkpoint holds. The base is rebuilt from model.init and checked against the record saved beside."""
  return {k: v for k, v in tree.items() if k != BASE_KEY}


def phase_dir(workdir: str, phase: str) -> str:
  return os.path.join(storage.normalize(workdir), phase)


def make_manager(workdir: str, phase: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """The phase's CheckpointManager: keeps the last `keep`, plus every `keep_every`-th step."""
  c = config.checkpoint
  options = ocp.CheckpointManagerOptions(
      max_to_keep=c.keep, keep_period=c.keep_every or None, create=True,
      enable_async_checkpointing=c.async_save)
  return ocp.CheckpointManager(os.path.join(phase_dir(workdir, phase), "checkpoints"), options=options,
                               item_names=ITEMS)


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_iterator=None,
         history: Any = None, base_record: dict | None = None) -> None:
  """Saves step `step` (asynchronously when the manager is async). `history`: a JSON-serialisable
  object saved with the step (the trainer's metrics log up to this step), not to be mutated after.
  `base_record`: a LoRA run's record of its frozen base (`lora.base_record`; the state excludes it)."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  if history is not None:
    items["history"] = ocp.args.JsonSave(history)
  if base_record is not None:
    items["base"] = ocp.args.JsonSave(dict(base_record))
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def read_base_record(directory: str, step: int) -> dict | None:
  """The base record saved with checkpoint step `step` in `directory` (a phase's checkpoints/); None
  when the step has none (a full fine-tuning checkpoint)."""
  path = storage.path(os.path.join(str(directory), str(step), "base", "metadata"))  # orbax's JsonSave file
  if not path.exists():
    return None
  with path.open() as f:
    return json.load(f)


def check_base_record(manager_or_dir: Any, step: int, expected: dict | None, *, label: str = "") -> None:
  """ConfigError when checkpoint step `step` was trained over another base than `expected` (both named)."""
  from qsft_jax.models.lora import describe_record
  directory = getattr(manager_or_dir, "directory", manager_or_dir)
  saved = read_base_record(directory, step)
  if saved is None or expected is None or dict(saved) != dict(expected):
    have = "no base record (not a LoRA checkpoint)" if saved is None else describe_record(saved)
    want = "no LoRA base (model.lora.rank = 0)" if expected is None else describe_record(expected)
    raise ConfigError(
        f"{label}: the checkpoint of step {step} in {directory} was trained over {have}, but this run's "
        f"base is {want}; config.model.lora (and model.init) must be those of the run that wrote it")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator=None) -> dict:
  """Restores `state` onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding) and,
  when given, moves `data_iterator` to the saved position. Returns the state."""
  return restore_with_history(manager, step, abstract_state, data_iterator)[0]


def restore_with_history(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                         data_iterator=None) -> tuple[dict, Any]:
  """`restore`, plus the step's saved "history" (None in a checkpoint saved without one)."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  if storage.path(os.path.join(step_dir(manager, step), "history")).is_dir():
    items["history"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["history"] if "history" in items else None


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore_latest` restored: the step, the state, the saved history (or None), and the newer
  steps that could not be restored, as (step, reason), moved aside to N.broken."""
  step: int
  state: dict
  history: Any
  broken: tuple[tuple[int, str], ...] = ()


def _reason(error: BaseException, limit: int = 300) -> str:
  """An exception as one line: its type and its message, whitespace collapsed, cut at `limit`."""
  text = " ".join(str(error).split())
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (every process calls this with its own value)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def move_aside(manager: ocp.CheckpointManager, steps: Sequence[int]) -> list[str]:
  """Renames step directories to N.broken (N.broken1, ... if taken; process 0 renames, every process
  waits for it) and reloads the manager's list of steps. Returns the new paths."""
  moved = []
  for step in steps:
    src = step_dir(manager, step)
    dst, n = src + BROKEN_SUFFIX, 0
    while storage.path(dst).exists():
      n += 1
      dst = f"{src}{BROKEN_SUFFIX}{n}"
    if jax.process_index() == 0:
      storage.path(src).rename(dst)
    moved.append(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("qsft_jax.checkpoints.move_aside")
  manager.reload()
  return moved


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator=None, *,
                   label: str = "") -> Restored | None:
  """Restores the newest step that restores (see `restore_with_history`); None without any step.

  A step that fails to restore (anything orbax, tensorstore or grain raise on a damaged step) is
  logged as one warning line naming the step and why, and the previous step is tried, down to the
  oldest. Once one restores, the newer failed ones are moved aside (`move_aside`), so that the run
  saves those step numbers again. When none restores, CheckpointError lists every step and its
  reason and nothing is moved (a mismatch with every step is more likely a changed config than
  damage). With several processes a step counts as restored only when it restored on all of them.
  `label` prefixes the messages (the phase).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failed: list[tuple[int, str]] = []
  for step in steps:
    try:
      state, history = restore_with_history(manager, step, abstract_state, data_iterator)
      error = None
    except Exception as e:  # pylint: disable=broad-except  # damage surfaces as many error types
      error, state, history = e, None, None
    if _all_processes(error is None):
      if failed:
        moved = move_aside(manager, [s for s, _ in failed])
        logging.warning("%s: restored the checkpoint of step %d; the damaged newer ones were moved to "
                        "%s", label, step, ", ".join(moved))
      return Restored(step=step, state=state, history=history, broken=tuple(failed))
    reason = _reason(error) if error is not None else "it failed to restore on another process"
    failed.append((step, reason))
    logging.warning("%s: the checkpoint of step %d cannot be restored (%s); trying the previous one",
                    label, step, reason)
  listing = "; ".join(f"step {s}: {r}" for s, r in failed)
  raise CheckpointError(
      f"{label}: none of the {len(failed)} checkpoints in {manager.directory} can be restored "
      f"({listing}). If the config changed since they were written, rerun with the original config; to train the "
      "phase again from scratch, move that directory away first (nothing was deleted)")


def mark_done(workdir: str, phase: str, step: int) -> None:
  if jax.process_index() == 0:
    storage.path(os.path.join(phase_dir(workdir, phase), "DONE")).write_text(f"{step}\n")


def is_done(workdir: str, phase: str) -> bool:
  return storage.path(os.path.join(phase_dir(workdir, phase), "DONE")).exists()


def restore_latest_params(workdir: str, phase: str, keys: Sequence[str], abstract_params: Any
                          ) -> tuple[int, dict] | None:
  """(step, {key: params}) of the phase's newest checkpoint that restores, reading only the parameter
  sets `keys` of its state ("params", "target_params", "behaviour_params"; no optimizer state), each
  onto the shardings of `abstract_params` (ShapeDtypeStructs with .sharding). None without a
  checkpoint; a damaged newer step is skipped with a warning (left in place: this reader writes
  nothing); CheckpointError when none restores."""
  path = os.path.join(phase_dir(workdir, phase), "checkpoints")
  if not storage.path(path).is_dir():
    return None
  manager, args = _params_reader(path, keys, abstract_params)
  failed = []
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        restored = manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except  # damage surfaces as many error types
        failed.append((step, _reason(e)))
        logging.warning("%s: the checkpoint of step %d cannot be restored (%s); trying the previous "
                        "one", phase, step, failed[-1][1])
        continue
      return step, _check_restored(restored["state"], phase, step, path)
  finally:
    manager.close()
  if failed:
    listing = "; ".join(f"step {s}: {r}" for s, r in failed)
    raise CheckpointError(f"{phase}: none of the checkpoints in {path} can be restored ({listing})")
  return None


def _check_restored(restored: dict, phase: str, step: int, path: str) -> dict:
  """`restored` (the {key: params} a partial restore read) when every leaf is an array; a checkpoint
  that does not hold a leaf asked for (another model, a LoRA run's adapters against full fine-tuning's
  parameters) comes back from orbax's partial restore as that leaf's ShapeDtypeStruct, which is a
  CheckpointError naming the first such leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  missing = ["/".join(str(getattr(k, "key", k)) for k in keys) for keys, leaf in leaves
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise CheckpointError(f"{phase}: the checkpoint of step {step} in {path} holds no {missing[0]} (of "
                          f"{len(leaves)} arrays asked for, {len(missing)} missing): it was written by a run "
                          "with another model or LoRA setting")
  return restored


def _params_reader(path: str, keys: Sequence[str], abstract_params: Any):
  """(a read-only manager of the checkpoints in `path`, the restore args of the parameter sets
  `keys`, each onto `abstract_params`)."""
  # Nothing here saves or deletes, and create=False makes no directory. Not read_only=True: orbax
  # then logs three warnings on every open (the options it overrides and "directory is read only").
  manager = ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
      item_names=ITEMS)
  abstract = {k: abstract_params for k in keys}
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))
  return manager, args


def restore_params_at(workdir: str, phase: str, step: int, keys: Sequence[str], abstract_params: Any
                      ) -> dict:
  """{key: params} of the parameter sets `keys` of the phase's checkpoint of `step`, as
  `restore_latest_params` reads them; CheckpointError when that step does not restore."""
  path = os.path.join(phase_dir(workdir, phase), "checkpoints")
  manager, args = _params_reader(path, keys, abstract_params)
  try:
    restored = manager.restore(step, args=args)["state"]
  except Exception as e:  # pylint: disable=broad-except  # damage surfaces as many error types
    raise CheckpointError(f"{phase}: the checkpoint of step {step} in {path} cannot be restored "
                          f"({_reason(e)})") from None
  finally:
    manager.close()
  return _check_restored(restored, phase, step, path)
