"""A run's workdir: its layout, the files that describe the run, and `Run`, a loaded run.

Workdir layout (what `qsft_jax.main` writes and everything else reads):

  WORKDIR/config.json            the resolved config (`write_config`, `read_config`)
  WORKDIR/config_history.jsonl   one line per accepted config change: time and `field: old -> new`
  WORKDIR/model_config.json      the ModelConfig the parameters belong to (`save_model_config`)
  WORKDIR/tokenizer.json         the character tokenizer (only for char tokenizers: `tokenizer_spec`)
  WORKDIR/data/                  generated train.jsonl / heldout.jsonl (bundled tasks: `data_files`)
  WORKDIR/bc/checkpoints/N/      phase 1: {"state": {step, params, opt_state}, "data": iterator,
                                 "history": the metrics logged up to step N}
  WORKDIR/<phase>/checkpoints/N.broken  a step that could not be restored, set aside on resume
  WORKDIR/qsft/checkpoints/N/    phase 2: + target_params, behaviour_params
  WORKDIR/control/checkpoints/N/ the targets-equal-1 control of phase 2 (same layout), when run
  WORKDIR/filtered_bc/checkpoints/N/  filtered BC (phase 1's layout), when run
  WORKDIR/mc|ilql/checkpoints/N/ the value-head baselines: {step, params: {heads[, trunk]}, opt_state,
                                 target_params (ILQL's target Q heads), trunk (phi, with trunk "phi")}
  WORKDIR/<phase>/DONE           written after the phase's final checkpoint is complete
  WORKDIR/<phase>/metrics.json   the logged metrics of the phase
  WORKDIR/<phase>/tensorboard/   tensorboardX scalars
  WORKDIR/<phase>/profile/       jax.profiler traces of the steps in log.profile_steps, one per run of
                                 consecutive steps: steps_FIRST-LAST/plugins/profile/RUN/HOST.xplane.pb
                                 (TensorBoard's profile plugin, XProf)
  WORKDIR/eval/results.json      evaluation (qsft_jax.evaluate; results.md, episodes_POLICY.jsonl,
                                 value_diagnostics*.{json,png} beside it)
  WORKDIR/eval/tensorboard/      evaluation scalars: eval/POLICY/mean_return, stderr, success_rate and
                                 eval/qsft|control/value_corr[_turn0], at the step of the checkpoint
                                 evaluated (`tensorboard --logdir WORKDIR` shows them with training's)

The checkpoints themselves (orbax managers, save, restore, DONE markers) are `qsft_jax.checkpoints`.

A workdir belongs to one config: `check_workdir_config` compares a new start's config with
config.json and refuses the changes that would mix two configs in one run (`CONFIG_CHANGE_RULES`,
one table); `unfinished_phases` / `check_finished` say which phases have not reached their steps, for
the programs that read a workdir after training.

    run = load(workdir)        # the latest parameters of every phase, without optimizer state
    run.theta_params, run.targets, run.data_config, ...
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
from typing import Any

from absl import logging

import jax
import ml_collections

from qsft_jax import checkpoints
from qsft_jax import config_lib
from qsft_jax import errors
from qsft_jax import losses
from qsft_jax.config_lib import PHASES
from qsft_jax import sharding as qsharding
from qsft_jax import storage
from qsft_jax.data import DataConfig
from qsft_jax.errors import UserError
from qsft_jax.models import lora as lora_lib
from qsft_jax.models import quant_base
from qsft_jax.models import sharded
from qsft_jax.models.config import ModelConfig, get_preset
from qsft_jax.models.lora import LoraConfig

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
COMMIT_FILE = "commit_success.txt"  # what marks a complete checkpoint step in a bucket (orbax)
# A loaded run's default mesh: data parallel over every local device.
DEFAULT_MESH_SHAPE = {"data": -1, "fsdp": 1, "tensor": 1}


def write_json_atomic(path: str, obj: Any) -> None:
  """JSON of `obj` written to `path` (local or a URL) so that readers never see half a file
  (`storage.write_text_atomic`)."""
  storage.write_text_atomic(path, json.dumps(obj, indent=1, default=str))


def data_files(workdir: str) -> dict[str, str]:
  """{"train", "heldout"}: the JSONL files a bundled task's data are generated into."""
  return {"train": os.path.join(workdir, "data", "train.jsonl"),
          "heldout": os.path.join(workdir, "data", "heldout.jsonl")}


# ------------------------------------------------------------------------------------------------
# The files that describe a run


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json (process 0 only). When it replaces a different config (changes that
  `check_workdir_config` allowed), the changed fields are first appended to
  WORKDIR/config_history.jsonl as {"time": ISO 8601 UTC, "changes": ["field: old -> new", ...]}."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    old = _read_flat_config(path)
  except WorkdirError:  # unreadable, and allowed to be replaced: nothing was trained under it
    old = None
  if old is not None:
    changes = [_change_line(field, a, b) for field, a, b in _diff(old, _flatten(_as_json(config)))]
    if changes:
      entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changes": changes}
      storage.append_text(os.path.join(workdir, CONFIG_HISTORY_FILE), json.dumps(entry) + "\n")
      print(f"{path}: config changed ({'; '.join(changes)}); recorded in {CONFIG_HISTORY_FILE}",
            flush=True)
  write_json_atomic(path, config.to_dict())


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not storage.path(path).exists():
    raise WorkdirError(f"{path}: no {CONFIG_FILE}; is {workdir!r} a qsft_jax workdir?")
  try:
    with storage.path(path).open() as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path}: cannot be read ({e}); restore it from a copy") from None


def tokenizer_spec(workdir: str, config: ml_collections.ConfigDict) -> str:
  """config.tokenizer, except that a char tokenizer saved in the workdir is read from there, so that
  everything after training sees the exact alphabet it was trained with."""
  saved = os.path.join(workdir, TOKENIZER_FILE)
  if config.tokenizer == "char" and storage.path(saved).exists():
    return f"char:{saved}"
  return config.tokenizer


def save_tokenizer(workdir: str, config: ml_collections.ConfigDict, tokenizer) -> None:
  """A char tokenizer built from config.tokenizer = "char" is saved into the workdir (process 0,
  atomically: other processes may read it on a resume); other tokenizers are named by the config."""
  from qsft_jax.tokenizers import CharTokenizer
  if isinstance(tokenizer, CharTokenizer) and config.tokenizer == "char":
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not storage.path(path).exists() and jax.process_index() == 0:
      tokenizer.save(path)


def model_config_from(config: ml_collections.ConfigDict, tokenizer=None) -> ModelConfig:
  """The ModelConfig of a randomly initialised run: model.preset with model.overrides and, unless
  the overrides set vocab_size, the tokenizer's vocabulary (without a tokenizer, the preset's; AOT
  compiles shapes only). Pretrained runs take theirs from the weights: `qsft_jax.main.build_model`."""
  overrides = dict(config.model.overrides)
  if tokenizer is not None:
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
  return get_preset(config.model.preset, **overrides)


def save_model_config(workdir: str, model_config: ModelConfig) -> None:
  """WORKDIR/model_config.json (process 0 only)."""
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, MODEL_CONFIG_FILE), dataclasses.asdict(model_config))


def read_model_config(workdir: str) -> ModelConfig:
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not storage.path(path).exists():
    raise WorkdirError(f"{path}: missing; the run did not get as far as building its model")
  with storage.path(path).open() as f:
    fields = json.load(f)
  return ModelConfig.from_dict(fields)


def data_config_from(config: ml_collections.ConfigDict) -> DataConfig:
  """The DataConfig of config.data (its templates, max_length and reward settings), for tokenising
  episodes as training did; keys DataConfig does not know are left out."""
  fields = {k: v for k, v in dict(config.data).items() if k in DataConfig.__dataclass_fields__}
  return DataConfig.from_config(fields)


# ------------------------------------------------------------------------------------------------
# One workdir, one config: which changes a new start may make


class WorkdirError(errors.NotFoundError):
  """A workdir that is missing, incomplete or unreadable for what was asked of it."""


class ConfigDriftError(UserError, ValueError):
  """A start whose config differs from the workdir's config.json in ways that would corrupt it."""


class UnfinishedRunError(UserError, RuntimeError):
  """A workdir read as a finished run while some of its phases have not reached their steps."""


@dataclasses.dataclass(frozen=True)
class ChangeRule:
  """How a config field may change between two starts on one workdir.

  fields: fnmatch patterns of dotted field names ("model.*", "bc.steps"); the first rule of
    `CONFIG_CHANGE_RULES` with a matching pattern decides.
  kind: "safe" (always allowed); "steps" (a phase's step count: allowed while no phase that builds
    on the phase has started and the phase has not gone past the new count); "phases" (the phases
    that started keep their order at the front of the list, others may be added or dropped);
    "between_phases" (allowed while no phase is part way); "frozen" (refused once one of `after`
    has started: a phase name, or "data" when the task's data were generated into the workdir).
  why: what the field shapes, for the message.
  """
  fields: tuple[str, ...]
  kind: str
  why: str
  after: tuple[str, ...] = ()


# The config section holding each phase's optimizer settings and steps.
PHASE_SECTION = {"bc": "bc", "qsft": "qsft", "control": "qsft", "filtered_bc": "filtered_bc", "mc": "mc",
                 "ilql": "ilql"}
# The phases that start from another phase's result: Q-SFT, the control and the value heads take phi
# from bc.
BUILDS_ON = {"bc": ("qsft", "control", "mc", "ilql"), "qsft": (), "control": (), "filtered_bc": (), "mc": (),
             "ilql": ()}

CONFIG_CHANGE_RULES: tuple[ChangeRule, ...] = (
    ChangeRule(("log.*", "eval.*"), "safe", "read by logging and evaluation, never by a train step"),
    ChangeRule(("checkpoint.every_steps", "checkpoint.keep", "checkpoint.keep_every",
                "checkpoint.async_save"), "safe", "when checkpoints are written and how many are kept"),
    ChangeRule(("distributed.*", "mesh.*"), "safe",
               "where the steps run: checkpoints restore onto any mesh and process count"),
    ChangeRule(("on_nonfinite", "nonfinite.*"), "safe",
               "what follows a non-finite step (none is ever saved) and how many skips are tolerated"),
    ChangeRule(("loss.chunk_size", "bc.microbatches", "qsft.microbatches", "mc.microbatches",
                "ilql.microbatches", "filtered_bc.microbatches", "data.read_threads"), "safe",
               "how the same computation is cut (loss chunks, gradient accumulation, reader threads)"),
    ChangeRule(("data.num_workers",), "between_phases",
               "the batch order depends on it: a phase finishes with the workers it started with"),
    ChangeRule(("bc.steps", "qsft.steps", "mc.steps", "ilql.steps", "filtered_bc.steps"), "steps",
               "a phase may run longer, or stop earlier, until a later phase builds on it"),
    ChangeRule(("phases",), "phases", "the phases that started keep their order"),
    ChangeRule(("bc.*",), "frozen", "phase 1's optimizer and batches made its checkpoints and phi",
               after=("bc",)),
    ChangeRule(("qsft.*",), "frozen",
               "phase 2's targets, optimizer and batches made its checkpoints (and the control's)",
               after=("qsft", "control")),
    ChangeRule(("filtered_bc.*",), "frozen",
               "filtered BC's selection, optimizer and batches made its checkpoints", after=("filtered_bc",)),
    ChangeRule(("mc.*",), "frozen", "the MC phase's heads, optimizer and batches made its checkpoints",
               after=("mc",)),
    ChangeRule(("ilql.*",), "frozen", "the ILQL phase's heads, optimizer and batches made its checkpoints",
               after=("ilql",)),
    ChangeRule(("task", "env.*", "dataset.*"), "frozen",
               "the generated data and the environment the run is evaluated on",
               after=("data",) + PHASES),
    ChangeRule(("model.*", "tokenizer"), "frozen", "the parameters' shapes and vocabulary",
               after=PHASES),
    ChangeRule(("data.*", "seed", "data_shards"), "frozen",
               "the tokens, rewards, initialisation and batch order of every checkpoint", after=PHASES),
    ChangeRule(("*",), "frozen", "not known to be safe to change in a started run", after=PHASES),
)

_ABSENT = object()


def _as_json(config: ml_collections.ConfigDict | dict) -> dict:
  """The config as config.json holds it (tuples as lists, values JSON can hold)."""
  d = config.to_dict() if hasattr(config, "to_dict") else config
  return json.loads(json.dumps(d, default=str))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves, empty dicts add nothing."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """[(field, old value, new value)] of the fields that differ, sorted; _ABSENT where one lacks it."""
  return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
          if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _change_line(field: str, old: Any, new: Any) -> str:
  """"field: old -> new" with JSON values ("(absent)" for a field one side lacks)."""
  fmt = lambda v: "(absent)" if v is _ABSENT else json.dumps(v)
  return f"{field}: {fmt(old)} -> {fmt(new)}"


def _read_flat_config(path: str) -> dict[str, Any] | None:
  """The flattened config.json at `path`; None when there is none; WorkdirError when unreadable."""
  if not storage.path(path).exists():
    return None
  try:
    with storage.path(path).open() as f:
      tree = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path}: cannot be read ({e}); restore it from a copy, or start the run in a "
                       "new --workdir") from None
  if not isinstance(tree, dict):
    raise WorkdirError(f"{path}: holds no config (a JSON {type(tree).__name__}); restore it from a "
                       "copy, or start the run in a new --workdir")
  return _flatten(tree)


def checkpoint_steps(workdir: str, phase: str) -> list[int]:
  """The steps of the phase's checkpoint directories, sorted (locally orbax names a step's directory
  by its number only once the step is written in full; in a bucket, which has no atomic rename, it
  writes into N/ and marks a complete step with N/commit_success.txt)."""
  path = storage.path(os.path.join(workdir, phase, "checkpoints"))
  if not path.is_dir():
    return []
  complete = ((lambda p: (p / COMMIT_FILE).exists()) if storage.is_url(workdir) else (lambda p: True))
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and complete(p))


def done_step(workdir: str, phase: str) -> int | None:
  """The step written in WORKDIR/<phase>/DONE (the phase's steps when it finished); None without a
  marker; the latest checkpoint step for a marker that holds no number."""
  path = storage.path(os.path.join(workdir, phase, "DONE"))
  if not path.exists():
    return None
  try:
    with path.open() as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    steps = checkpoint_steps(workdir, phase)
    return steps[-1] if steps else 0


def _started(workdir: str) -> dict[str, bool]:
  """{phase: has a checkpoint or a DONE marker} for every phase, and "data": the task's data were
  generated into the workdir."""
  started = {p: bool(checkpoint_steps(workdir, p)) or done_step(workdir, p) is not None
             for p in PHASES}
  started["data"] = storage.path(data_files(workdir)["train"]).exists()
  return started


def _rule_for(field: str) -> ChangeRule:
  for rule in CONFIG_CHANGE_RULES:
    if any(fnmatch.fnmatchcase(field, pattern) for pattern in rule.fields):
      return rule
  raise AssertionError("CONFIG_CHANGE_RULES ends with a rule for every field")


def _refusal(workdir: str, field: str, old: Any, new: Any, started: dict[str, bool]) -> str | None:
  """Why changing `field` from `old` to `new` would corrupt the run in `workdir`; None when safe."""
  rule = _rule_for(field)
  if rule.kind == "safe":
    return None
  if rule.kind == "frozen":
    begun = [e for e in rule.after if started.get(e)]
    if not begun:
      return None
    event = "its data were generated" if begun[0] == "data" else f"phase {begun[0]} has started"
    return f"{rule.why}; {event}"
  if rule.kind == "between_phases":
    part_way = [p for p in PHASES if started[p] and done_step(workdir, p) is None]
    return f"{rule.why}; phase {part_way[0]} is part way" if part_way else None
  if rule.kind == "phases":
    old_order = list(old) if isinstance(old, list) else []
    begun = [p for p in old_order if started.get(p)] + [
        p for p in PHASES if started[p] and p not in old_order]
    new_order = list(new) if isinstance(new, list) else []
    if new_order[:len(begun)] != begun:
      return f"{rule.why}: {', '.join(begun)} started, so the phases must begin with them, in order"
    return None
  if rule.kind == "steps":
    section = field.split(".")[0]
    if not isinstance(new, int) or isinstance(new, bool):
      return "a step count is a whole number"
    for phase in (p for p in PHASES if PHASE_SECTION[p] == section and started[p]):
      later = [p for p in BUILDS_ON[phase] if started[p]]
      if later:
        return f"phase {later[0]} has started from phase {phase}'s result"
      reached = max(checkpoint_steps(workdir, phase) or [0])
      if new < reached:
        return f"phase {phase} is already at step {reached}"
    return None
  raise AssertionError(f"unknown rule kind {rule.kind!r}")


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """Compares `config` with WORKDIR/config.json before a run writes anything; returns the allowed
  changes ("field: old -> new", [] for a new workdir or the same config) and raises
  ConfigDriftError listing every change that would corrupt what the workdir holds (the rules:
  `CONFIG_CHANGE_RULES`). `write_config` then records the allowed changes."""
  workdir = storage.normalize(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  started = _started(workdir)
  try:
    old = _read_flat_config(path)
  except WorkdirError:
    if any(started[p] for p in PHASES):
      raise
    return []  # nothing was trained under it: the new config replaces it
  if old is None:
    return []
  for retired, fields in config_lib.RETIRED_FIELDS.items():  # read as the fields that replaced it
    if retired in old:
      value = old.pop(retired)
      for field in fields:
        old.setdefault(field, value)
  allowed, refused = [], []
  defaults = _flatten(_as_json(config_lib.base_config()))
  for field, a, b in _diff(old, _flatten(_as_json(config))):
    if a is _ABSENT and field in defaults and b == defaults[field]:
      continue  # a field newer than the workdir's config.json, at its default: what the run used
    why = _refusal(workdir, field, a, b, started)
    line = _change_line(field, a, b)
    if why is None:
      allowed.append(line)
    else:
      refused.append(f"  {line}  ({why})")
  if refused:
    raise ConfigDriftError(
        f"{path}: the config differs from the one this workdir was trained with; "
        f"{len(refused)} change(s) would corrupt it:\n" + "\n".join(refused) +
        f"\nStart this config in a new --workdir, or rerun with the workdir's own config ({path}).")
  return allowed


# ------------------------------------------------------------------------------------------------
# Finished and unfinished phases


@dataclasses.dataclass(frozen=True)
class PhaseProgress:
  """How far one configured phase got: its latest checkpoint step (None without one), its
  configured steps, and whether it finished them (a DONE marker for at least that many steps)."""
  phase: str
  step: int | None
  steps: int
  done: bool

  def describe(self) -> str:
    at = "no checkpoint" if self.step is None else f"checkpoint step {self.step}"
    return f"{self.phase} ({at} of {self.steps} steps, config.{PHASE_SECTION[self.phase]}.steps)"

  def to_json(self) -> dict:
    return {"phase": self.phase, "step": self.step, "steps": self.steps}


def phase_progress(workdir: str, config: ml_collections.ConfigDict) -> list[PhaseProgress]:
  """A `PhaseProgress` per phase of config.phases (none for a config without phases)."""
  out = []
  for phase in config.get("phases", ()) or ():
    section = config.get(PHASE_SECTION.get(phase, phase))
    if section is None or "steps" not in section:
      continue
    steps = checkpoint_steps(workdir, phase)
    marked = done_step(workdir, phase)
    out.append(PhaseProgress(phase, steps[-1] if steps else None, int(section.steps),
                             marked is not None and marked >= section.steps))
  return out


def check_finished(workdir: str, config: ml_collections.ConfigDict, *, allow_unfinished: bool,
                   override: str) -> list[PhaseProgress]:
  """The unfinished phases of a workdir. Raises UnfinishedRunError naming each (its checkpoint step
  and configured steps) and `override`, the flag that reads such a run anyway; with
  allow_unfinished, logs a warning and returns them."""
  unfinished = [p for p in phase_progress(workdir, config) if not p.done]
  if not unfinished:
    return []
  what = "; ".join(p.describe() for p in unfinished)
  if not allow_unfinished:
    raise UnfinishedRunError(
        f"{workdir}: unfinished phases: {what}. Finish the run (run python -m qsft_jax.main again "
        f"with its --config and --workdir) or pass {override} to use the latest checkpoints as "
        "they are")
  logging.warning("%s: unfinished phases: %s; using the latest checkpoints as they are", workdir, what)
  return unfinished


# ------------------------------------------------------------------------------------------------
# A loaded run


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A run's config, model, tokenizer and latest parameters (no optimizer state).

  behaviour_params: phi (from the qsft checkpoint when there is one, else from bc's).
  theta_params, target_params: theta and theta_bar of the qsft phase, None before its first
    checkpoint. control_params: theta of the control phase, None without one.
  filtered_bc_params: the filtered_bc phase's parameters (a behaviour policy of its own), None without one.
  *_step: the checkpoint step each parameter set was read from (None where absent).
  heads: {"mc" | "ilql": {"heads", "trunk", "step"}} for each value-head phase with a checkpoint: the
    heads acting reads (`models.heads` variables; ILQL's Q heads are its target copies, with its V
    head), the trained trunk's params (None with trunk "phi": the heads read phi's hidden states)
    and the checkpoint step.
  mesh, rules: where the parameters are placed (the config's rule table).
  lora: the run's LoraConfig (model.lora.rank > 0), else None. Each parameter set is then the variables
    {"params": base, "lora": adapters} of `Transformer(model_config, lora=lora)`, all over the same
    base arrays (rebuilt from model.init and checked against the checkpoints' base record).
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
  filtered_bc_params: Any = None
  filtered_bc_step: int | None = None
  heads: dict[str, Any] = dataclasses.field(default_factory=dict)
  mesh: Any = None
  rules: Any = None
  lora: Any = None

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
                               control_step=None, heads={})


def lora_base(config: ml_collections.ConfigDict, model_config: ModelConfig, lora: LoraConfig, mesh,
              rules) -> dict:
  """The frozen base {"params": tree} of a LoRA run, as its states store it: model.init's weights (the
  random initialisation of `seed` for a random init) in lora.base_dtype, placed on `mesh`."""
  if config.model.init == "random":
    params = sharded.init_params_sharded(model_config, jax.random.key(config.seed), mesh, rules)
  else:
    from qsft_jax.models.weights import load_params
    _, params = load_params(config.model.init, mesh, rules, **config.model.overrides.to_dict())
  params = params if "params" in params else {"params": params}
  base = jax.jit(lambda b: lora_lib.store_base(b, lora))({"params": params["params"]})
  if lora.quantization != "none":  # QLoRA: the targeted kernels stored int8 / nf4, as the trainer does
    base = quant_base.quantized_base(base, model_config, lora, mesh, rules)
  return base


def load(workdir: str, mesh=None, rules=None) -> Run:
  """Loads the latest parameters of every phase of a workdir into a `Run`.

  Parameters are placed by the rule table (`rules`, default the config's mesh.rules) on `mesh`
  (default: data parallel over all local devices). Raises WorkdirError (a FileNotFoundError) when
  neither bc/ nor qsft/ has a checkpoint. Unfinished phases are loaded as they are: the programs
  that read a workdir as a finished run check that first (`check_finished`).
  """
  from qsft_jax.models.transformer import Transformer
  from qsft_jax.tokenizers import load_tokenizer

  workdir = storage.normalize(workdir)
  config = read_config(workdir)
  tokenizer = load_tokenizer(tokenizer_spec(workdir, config))
  model_config = read_model_config(workdir)
  rules = tuple(tuple(r) for r in (rules or config.mesh.rules))
  mesh = mesh or qsharding.make_mesh(DEFAULT_MESH_SHAPE)
  lora = LoraConfig.from_config(config.model.get("lora", {}))
  lora = lora if lora.enabled else None
  model = Transformer(model_config, lora=lora)
  shardings = sharded.param_shardings(model, model_config, mesh, rules)
  shapes = sharded.param_shapes(model, model_config)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  base = {}
  if lora is not None:
    abstract = {"lora": abstract["lora"]}  # the checkpoints hold the adapters only

  qsft = checkpoints.restore_latest_params(
      workdir, "qsft", ("params", "behaviour_params", "target_params"), abstract)
  if qsft is not None:
    step, params = qsft
    # phi is the frozen copy phase 2 carries; its step is phase 1's last checkpoint (BC and Q-SFT
    # count their steps separately).
    bc_steps = checkpoint_steps(workdir, "bc")
    sets = dict(behaviour_params=params["behaviour_params"],
                behaviour_step=bc_steps[-1] if bc_steps else step,
                theta_params=params["params"], theta_step=step,
                     target_params=params["target_params"], target_step=step)
  else:
    bc = checkpoints.restore_latest_params(workdir, "bc", ("params",), abstract)
    if bc is None:
      raise WorkdirError(f"{workdir}: no checkpoint in bc/ or qsft/ yet")
    sets = dict(behaviour_params=bc[1]["params"], behaviour_step=bc[0])
  control = checkpoints.restore_latest_params(workdir, "control", ("params",), abstract)
  if control is not None:
    sets.update(control_params=control[1]["params"], control_step=control[0])
  filtered = checkpoints.restore_latest_params(workdir, "filtered_bc", ("params",), abstract)
  if filtered is not None:
    sets.update(filtered_bc_params=filtered[1]["params"], filtered_bc_step=filtered[0])
  if lora is not None:
    base = lora_base(config, model_config, lora, mesh, rules)
    record = lora_lib.base_record(base, config.model.init, lora)
    for phase, step in (("qsft", sets.get("theta_step")), ("bc", None if qsft else sets["behaviour_step"]),
                        ("control", sets.get("control_step")), ("filtered_bc", sets.get("filtered_bc_step"))):
      if step is not None:
        checkpoints.check_base_record(os.path.join(checkpoints.phase_dir(workdir, phase), "checkpoints"),
                                      step, record, label=f"{workdir}: {phase}")
    sets = {k: ({**base, **v} if k.endswith("_params") and v is not None else v) for k, v in sets.items()}
  heads = {}
  if lora is None:
    heads = {phase: loaded for phase in ("mc", "ilql")
             if (loaded := load_heads(workdir, config, phase, model, model_config, mesh, rules)) is not None}
  return Run(lora=lora, workdir=workdir, config=config, model_config=model_config, tokenizer=tokenizer,
             data_config=data_config_from(config), mesh=mesh, rules=rules, heads=heads, **sets)


def load_heads(workdir: str, config: ml_collections.ConfigDict, phase: str, model, model_config: ModelConfig,
               mesh, rules) -> dict | None:
  """{"heads", "trunk", "step"} of a value-head phase's newest checkpoint (see `Run.heads`); None
  without one."""
  from qsft_jax.models import heads as heads_lib
  from qsft_jax.train_steps import HeadsSettings
  if not checkpoint_steps(workdir, phase):
    return None
  settings = HeadsSettings.from_config(config, phase)
  place = lambda shapes, shardings: jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  abstract = {"heads": place(heads_lib.param_shapes(model_config, settings.num_q),
                             heads_lib.param_shardings(model_config, settings.num_q, mesh, rules))}
  if settings.trunk == "train":
    abstract["trunk"] = place(sharded.param_shapes(model, model_config),
                              sharded.param_shardings(model, model_config, mesh, rules))
  restored = checkpoints.restore_latest_params(workdir, phase, ("params",), abstract)
  if restored is None:
    return None
  step, params = restored
  heads = params["params"]["heads"]
  if settings.method == "ilql":  # acting reads the target Q heads (with the V head)
    target = checkpoints.restore_params_at(workdir, phase, step, ("target_params",),
                                           heads_lib.q_part(abstract["heads"]))["target_params"]
    heads = {"params": {**heads["params"], **target["params"]}}
  return {"heads": heads, "trunk": params["params"].get("trunk"), "step": step}
