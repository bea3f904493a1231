"""A run's workdir: its layout, the files that describe the run, and `Run`, a loaded run.

Workdir layout (what `qsft_jax.main` writes and everything else reads):

  WORKDIR/config.json            the resolved config (`write_config`, `read_config`)
  WORKDIR/model_config.json      the ModelConfig the parameters belong to (`save_model_config`)
  WORKDIR/tokenizer.json         the character tokenizer (only for char tokenizers: `tokenizer_spec`)
  WORKDIR/data/                  generated train.jsonl / heldout.jsonl (bundled tasks: `data_files`)
  WORKDIR/bc/checkpoints/N/      phase 1: {"state": {step, params, opt_state}, "data": iterator}
  WORKDIR/qsft/checkpoints/N/    phase 2: + target_params, behaviour_params
  WORKDIR/control/checkpoints/N/ the targets-equal-1 control of phase 2 (same layout), when run
  WORKDIR/<phase>/DONE           written after the phase's final checkpoint is complete
  WORKDIR/<phase>/metrics.json   the logged metrics of the phase
  WORKDIR/<phase>/tensorboard/   tensorboardX scalars
  WORKDIR/eval/results.json      evaluation (qsft_jax.evaluate)

The checkpoints themselves (orbax managers, save, restore, DONE markers) are `qsft_jax.checkpoints`.

    run = load(workdir)        # the latest parameters of every phase, without optimizer state
    run.theta_params, run.targets, run.data_config, ...
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from qsft_jax import checkpoints
from qsft_jax import errors
from qsft_jax import losses
from qsft_jax import sharding as qsharding
from qsft_jax.data import DataConfig
from qsft_jax.models import sharded
from qsft_jax.models.config import ModelConfig, get_preset

CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
# A loaded run's default mesh: data parallel over every local device.
DEFAULT_MESH_SHAPE = {"data": -1, "fsdp": 1, "tensor": 1}


def write_json_atomic(path: str, obj: Any) -> None:
  """json.dump to `path` through a temporary file and a rename: readers never see half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


def data_files(workdir: str) -> dict[str, str]:
  """{"train", "heldout"}: the JSONL files a bundled task's data are generated into."""
  return {"train": os.path.join(workdir, "data", "train.jsonl"),
          "heldout": os.path.join(workdir, "data", "heldout.jsonl")}


# ------------------------------------------------------------------------------------------------
# The files that describe a run


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json (process 0 only)."""
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.NotFoundError(f"{path}: no {CONFIG_FILE}; is {workdir!r} a qsft_jax workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def tokenizer_spec(workdir: str, config: ml_collections.ConfigDict) -> str:
  """config.tokenizer, except that a char tokenizer saved in the workdir is read from there, so that
  everything after training sees the exact alphabet it was trained with."""
  saved = os.path.join(workdir, TOKENIZER_FILE)
  if config.tokenizer == "char" and os.path.exists(saved):
    return f"char:{saved}"
  return config.tokenizer


def prepare_tokenizer(workdir: str, config: ml_collections.ConfigDict):
  """The run's tokenizer, saved into the workdir (`save_tokenizer`)."""
  from qsft_jax.tokenizers import load_tokenizer

  tokenizer = load_tokenizer(tokenizer_spec(workdir, config))
  save_tokenizer(workdir, config, tokenizer)
  return tokenizer


def save_tokenizer(workdir: str, config: ml_collections.ConfigDict, tokenizer) -> None:
  """A char tokenizer built from config.tokenizer = "char" is saved into the workdir (process 0,
  atomically: other processes may read it on a resume); other tokenizers are named by the config."""
  from qsft_jax.tokenizers import CharTokenizer
  if isinstance(tokenizer, CharTokenizer) and config.tokenizer == "char":
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(path) and jax.process_index() == 0:
      tmp = f"{path}.tmp{os.getpid()}"
      tokenizer.save(tmp)
      os.replace(tmp, path)


def model_config_from(config: ml_collections.ConfigDict, tokenizer) -> ModelConfig:
  """The ModelConfig of a randomly initialised run: the preset with overrides and the tokenizer's
  vocabulary (pretrained runs take theirs from the weights: `qsft_jax.main.build_model`)."""
  overrides = dict(config.model.overrides)
  overrides.setdefault("vocab_size", tokenizer.vocab_size)
  return get_preset(config.model.preset, **overrides)


def save_model_config(workdir: str, model_config: ModelConfig) -> None:
  """WORKDIR/model_config.json (process 0 only)."""
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, MODEL_CONFIG_FILE), dataclasses.asdict(model_config))


def read_model_config(workdir: str) -> ModelConfig:
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.NotFoundError(f"{path}: missing; the run did not get as far as building its model")
  with open(path) as f:
    fields = json.load(f)
  return ModelConfig.from_dict(fields)


def data_config_from(config: ml_collections.ConfigDict) -> DataConfig:
  """The DataConfig of config.data (its templates, max_length and reward settings), for tokenising
  episodes as training did; keys DataConfig does not know are left out."""
  fields = {k: v for k, v in dict(config.data).items() if k in DataConfig.__dataclass_fields__}
  return DataConfig.from_config(fields)


# ------------------------------------------------------------------------------------------------
# A loaded run


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A run's config, model, tokenizer and latest parameters (no optimizer state).

  behaviour_params: phi (from the qsft checkpoint when there is one, else from bc's).
  theta_params, target_params: theta and theta_bar of the qsft phase, None before its first
    checkpoint. control_params: theta of the control phase, None without one.
  *_step: the checkpoint step each parameter set was read from (None where absent).
  mesh, rules: where the parameters are placed (the config's rule table).
  """
  workdir: str
  config: ml_collections.ConfigDict
  model_config: ModelConfig
  tokenizer: Any
  data_config: DataConfig
  behaviour_params: Any
  theta_params: Any = None
  target_params: Any = None
  control_params: Any = None
  behaviour_step: int | None = None
  theta_step: int | None = None
  target_step: int | None = None
  control_step: int | None = None
  mesh: Any = None
  rules: Any = None

  @property
  def targets(self) -> losses.TargetConfig:
    """The run's Bellman-target settings (qsft.*; what its value diagnostics use)."""
    return losses.TargetConfig.from_config(self.config, "qsft")

  def with_theta(self, theta_params: Any, target_params: Any = None, *, theta_step: int | None = None,
                 target_step: int | None = None) -> Run:
    """This run with another theta (and theta_bar, or none) and no control: e.g. the control's theta
    for the value diagnostics."""
    return dataclasses.replace(self, theta_params=theta_params, target_params=target_params,
                               theta_step=theta_step, target_step=target_step, control_params=None,
                               control_step=None)


def load(workdir: str, mesh=None, rules=None) -> Run:
  """Loads the latest parameters of every phase of a workdir into a `Run`.

  Parameters are placed by the rule table (`rules`, default the config's mesh.rules) on `mesh`
  (default: data parallel over all local devices). Raises FileNotFoundError when neither bc/ nor
  qsft/ has a checkpoint.
  """
  from qsft_jax.models.transformer import Transformer
  from qsft_jax.tokenizers import load_tokenizer

  workdir = os.path.abspath(workdir)
  config = read_config(workdir)
  tokenizer = load_tokenizer(tokenizer_spec(workdir, config))
  model_config = read_model_config(workdir)
  rules = tuple(tuple(r) for r in (rules or config.mesh.rules))
  mesh = mesh or qsharding.make_mesh(DEFAULT_MESH_SHAPE)
  model = Transformer(model_config)
  shardings = sharded.param_shardings(model, model_config, mesh, rules)
  shapes = sharded.param_shapes(model, model_config)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)

  qsft = checkpoints.restore_latest_params(
      workdir, "qsft", ("params", "behaviour_params", "target_params"), abstract)
  if qsft is not None:
    step, params = qsft
    sets = dict(behaviour_params=params["behaviour_params"], behaviour_step=step,
                     theta_params=params["params"], theta_step=step,
                     target_params=params["target_params"], target_step=step)
  else:
    bc = checkpoints.restore_latest_params(workdir, "bc", ("params",), abstract)
    if bc is None:
      raise errors.NotFoundError(f"{workdir}: no checkpoint in bc/ or qsft/ yet")
    sets = dict(behaviour_params=bc[1]["params"], behaviour_step=bc[0])
  control = checkpoints.restore_latest_params(workdir, "control", ("params",), abstract)
  if control is not None:
    sets.update(control_params=control[1]["params"], control_step=control[0])
  return Run(workdir=workdir, config=config, model_config=model_config, tokenizer=tokenizer,
             data_config=data_config_from(config), mesh=mesh, rules=rules, **sets)
