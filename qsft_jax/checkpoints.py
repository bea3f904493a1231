"""Checkpoints: orbax CheckpointManager per phase, holding the train state and the data iterator.

Workdir layout (what `qsft_jax.main` writes and everything else reads):

  WORKDIR/config.json            the resolved config
  WORKDIR/tokenizer.json         the character tokenizer (only for char tokenizers)
  WORKDIR/data/                  generated train.jsonl / heldout.jsonl (bundled tasks)
  WORKDIR/bc/checkpoints/N/      phase 1: {"state": {step, params, opt_state}, "data": iterator}
  WORKDIR/qsft/checkpoints/N/    phase 2: + target_params, behaviour_params
  WORKDIR/control/checkpoints/N/ the targets-equal-1 control of phase 2 (same layout), when run
  WORKDIR/<phase>/DONE           written after the phase's final checkpoint is complete
  WORKDIR/<phase>/tensorboard/   tensorboardX scalars
  WORKDIR/eval/results.json      evaluation (qsft_jax.evaluate)

Orbax writes each step into a temporary directory and renames it when complete, so a process killed
during a write leaves no directory that `latest_step()` takes for a finished checkpoint. The state is
saved from its shards by every process (no gather to one host) and restores onto any mesh: the
caller passes the abstract state with the target shardings.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from qsft_jax import sharding as qsharding
from qsft_jax.models import sharded
from qsft_jax.models.config import ModelConfig, get_preset


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


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no config.json; is {workdir!r} a qsft_jax workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def model_config_from(config: ml_collections.ConfigDict, tokenizer) -> ModelConfig:
  """The ModelConfig of a randomly initialised run: the preset with overrides and the tokenizer's
  vocabulary (pretrained runs take theirs from the weights: `qsft_jax.main.build_model_config`)."""
  overrides = dict(config.model.overrides)
  overrides.setdefault("vocab_size", tokenizer.vocab_size)
  return get_preset(config.model.preset, **overrides)


def save_model_config(workdir: str, model_config: ModelConfig) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      json.dump(dataclasses.asdict(model_config), f, indent=1)


def read_model_config(workdir: str) -> ModelConfig:
  path = os.path.join(workdir, "model_config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing; the run did not get as far as building its model")
  with open(path) as f:
    fields = json.load(f)
  return ModelConfig.from_dict(fields)


def load_for_inference(workdir: str, mesh=None, rules=None) -> dict:
  """Loads the latest parameters of a workdir without any optimizer state.

  Returns dict(config, model_config, tokenizer, behaviour_params, theta_params, target_params,
  control_params, mesh, rules); theta_params and target_params are None when phase 2 has no
  checkpoint yet (behaviour_params then come from phase 1); control_params (theta of the control
  phase) None without a control checkpoint. Parameters are
  placed by the config's rule table on `mesh` (default: a mesh over all local devices, data-parallel).
  """
  from qsft_jax.models.transformer import Transformer
  from qsft_jax.tokenizers import load_tokenizer

  config = read_config(workdir)
  tokenizer = load_tokenizer(tokenizer_spec(workdir, config))
  model_config = read_model_config(workdir)
  rules = tuple(tuple(r) for r in (rules or config.mesh.rules))
  mesh = mesh or qsharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  model = Transformer(model_config)
  shardings = sharded.param_shardings(model, model_config, mesh, rules)
  shapes = sharded.param_shapes(model, model_config)
  abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 shapes, shardings)

  def latest_params(phase, keys):
    path = os.path.join(phase_dir(workdir, phase), "checkpoints")
    if not os.path.isdir(path):
      return None
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
      return None
    abstract = {k: abstract_params for k in keys}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)))
    return restored["state"]

  qsft = latest_params("qsft", ("params", "behaviour_params", "target_params"))
  target = None
  if qsft is not None:
    behaviour, theta, target = qsft["behaviour_params"], qsft["params"], qsft["target_params"]
  else:
    bc = latest_params("bc", ("params",))
    if bc is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint in bc/ or qsft/ yet")
    behaviour, theta = bc["params"], None
  control = latest_params("control", ("params",))
  return dict(config=config, model_config=model_config, tokenizer=tokenizer,
              behaviour_params=behaviour, theta_params=theta, target_params=target,
              control_params=None if control is None else control["params"], mesh=mesh, rules=rules)


def tokenizer_spec(workdir: str, config: ml_collections.ConfigDict) -> str:
  """A char tokenizer is saved into the workdir so that analysis sees the exact alphabet."""
  saved = os.path.join(workdir, "tokenizer.json")
  if config.tokenizer == "char" and os.path.exists(saved):
    return f"char:{saved}"
  return config.tokenizer
