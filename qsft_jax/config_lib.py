"""Shared config defaults and the checks that run before anything compiles.

Every file in configs/ starts from `base_config()` and overrides what its task and scale need
(big_vision style: one `get_config()` per file, `--config.FIELD=VALUE` on the command line).
`check_config(config, device_count)` rejects a bad config with a message that names the field;
`check_data_files(config)` checks that data.path names files that hold episodes (the trainer calls
both before it writes anything).

Every config field, its default and its meaning are documented once, at the field in `base_config`
and `_optim` below.
"""
from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

from qsft_jax.errors import ConfigError
from qsft_jax.sharding import DEFAULT_RULES

PHASES = ("bc", "qsft", "control")
TASKS = ("", "maze", "wordle", "chess", "twenty_questions")
THETA_INITS = ("pretrained", "phi", "phi_init", "fresh")
STORAGE_DTYPES = ("", "float32", "bfloat16")  # "": the parameters' own dtype
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: learning rates above it overflow
# Fields that no longer exist -> the fields that replaced them (each takes the old value).
RETIRED_FIELDS = {"qsft.frozen_dtype": ("qsft.target_dtype", "qsft.behaviour_dtype")}


def _optim(steps: int, batch_size: int, learning_rate: float) -> ml_collections.ConfigDict:
  """The fields shared by the bc.* and qsft.* sections (the control phase uses qsft.*)."""
  return ml_collections.ConfigDict(dict(
      steps=steps,                  # optimizer steps of the phase
      batch_size=batch_size,        # global rows per step (all processes and microbatches together)
      microbatches=1,               # gradient-accumulation parts of each batch (exact: same gradient)
      learning_rate=learning_rate,  # peak AdamW rate: linear warm-up, then cosine decay to 10%
      warmup_steps=20,
      weight_decay=0.0,
      grad_clip=1.0,                # global-norm clipping before AdamW; 0 = none
      b1=0.9, b2=0.95,              # AdamW moments
      # Storage dtypes of AdamW's first and second moments ("" = the parameters', model param_dtype;
      # "float32" or "bfloat16"). Each step computes the update from the moments in float32 and stores
      # them rounded to these (bf16: 8 significant bits, a relative error up to 2^-9 per moment).
      mu_dtype="",
      nu_dtype=""))


def base_config() -> ml_collections.ConfigDict:
  """The shared defaults; each field's meaning is given beside it."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # seed of parameter init and of the data order
  # Bundled environment (maze | wordle | chess | twenty_questions) that generates the data and is evaluated
  # on; "" for a user dataset with no environment.
  c.task = "maze"
  c.env = ml_collections.ConfigDict()  # keyword arguments of `qsft_jax.envs.make_env(task, **env)`
  c.dataset = ml_collections.ConfigDict(dict(
      # Generate train/held-out JSONL from `task` into WORKDIR/data when data.path is empty
      # (deterministic; skipped when the files exist).
      generate=True,
      policy="paper",         # behaviour policy of the generator (qsft_jax/envs/policies.py)
      num_episodes=2000,      # training episodes
      heldout_episodes=200,   # held-out episodes, for the value diagnostics
      seed=0,                 # generator seed (held-out episodes use seed + 1)
      options=ml_collections.ConfigDict()))  # extra `generate_episodes(..., **options)`
  c.tokenizer = "char"  # "char", "char:PATH.json", "hf:PATH", "gguf:PATH" or "smollm2"
  # `qsft_jax.data.DataConfig` fields (that class documents them and checks unknown ones).
  c.data = ml_collections.ConfigDict(dict(
      path="",                   # training JSONL file(s); "" = the task's generated data
      max_length=256,            # tokens per row
      pack=True, pack_window=64,
      # An episode longer than max_length: "truncate" (keep the whole turns that fit) or "drop". The
      # trainer prints how many were truncated / dropped at start-up (also TensorBoard data/*) and
      # `python -m qsft_jax.data validate --max-length L` names every dropped line.
      overlong="truncate",
      # A character the tokenizer can only encode as unk (a char tokenizer's characters outside its
      # alphabet, e.g. "é" with the default printable-ASCII one; BPE tokenizers cover every string):
      # "error" names FILE:LINE: turns[i].text and the characters before the first step; "unk"
      # encodes them as the unk token (which cpu_value_learning's qsft.dummy_token also uses).
      unknown_chars="error",
      # "none", "affine:LO,HI[,MAX_TURNS]" or "terminal_return:RMIN,RMAX" (qsft_jax/data/rewards.py,
      # docs/algorithm.md section 5). affine maps each step's reward, so with LO != 0 it adds a
      # constant per action turn and episodes of different lengths can swap order (a warning is
      # logged); terminal_return keeps the order (gamma = 1).
      reward_transform="none",
      gamma=1.0, gamma_token=1.0,
      # "plain": each turn's text encoded on its own behind one BOS; "chat": the episode as a conversation
      # (observations user messages, actions assistant messages) rendered by a chat template, the action
      # mask on each assistant message's content and end-of-turn token (qsft_jax/data/chat.py). Chat needs
      # a Hugging Face tokenizer (tokenizer=smollm2, hf:PATH, gguf:PATH).
      format="plain",
      system_prompt="",          # chat: a system message first when non-empty
      chat_template="",          # chat: "" = the tokenizer's own; a Jinja template string; or "file:PATH"
      num_workers=0))
  c.model = ml_collections.ConfigDict(dict(
      preset="tiny-llama",   # `qsft_jax.models.config.get_preset` name
      init="random",         # "random", "hf:PATH", "gguf:PATH" or "smollm2" (pretrained weights)
      # ModelConfig fields to replace (dtype, scan_layers, remat_policy, ...), for a random init and
      # pretrained weights alike: dtype is the compute dtype, param_dtype the storage dtype of theta's
      # master weights (and of every set whose own dtype field is ""). With a char tokenizer and random
      # init, vocab_size is the tokenizer's.
      overrides=ml_collections.ConfigDict(),
      # LoRA (qsft_jax/models/lora.py): phi, theta and theta_bar are low-rank adapters over ONE frozen
      # base, the weights of model.init (or the random initialisation of `seed`); checkpoints hold the
      # adapters and a record of the base, not the base. qsft.theta_init picks theta's adapter: "phi"
      # phi's trained adapter; "phi_init" / "pretrained" the adapter phi started from (B = 0: exactly
      # the base model); "fresh" a new random A with B = 0.
      lora=ml_collections.ConfigDict(dict(
          rank=0,              # 0: off (full fine-tuning); > 0: adapters of this rank
          alpha=16.0,          # the adapter term is scaled by alpha / rank
          # re.search patterns over module paths such as "layers_3/attn/q" (scanned: "layers/attn/q");
          # the attention (q, k, v, o) and MLP (gate, up, down) projections can be adapted. Each
          # pattern must match at least one of them.
          targets=("attn/(q|k|v|o)$", "mlp/(gate|up|down)$"),
          base_dtype="bfloat16",  # storage dtype of the frozen base ("" = model param_dtype)
          # "none" | "int8" | "nf4": the frozen base's kernels stored quantised (QLoRA)
          quantization="none"))))
  # Logical data shards the global batch is built from (0: one per process). Process p reads only
  # its own shards; with a fixed value the batches do not depend on the process count (which must
  # divide it).
  c.data_shards = 0
  c.mesh = ml_collections.ConfigDict(dict(
      shape=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),  # -1: the remaining devices
      rules=tuple(DEFAULT_RULES)))  # logical-axis rule table (`qsft_jax.sharding.DEFAULT_RULES`)
  # enabled: call jax.distributed.initialize (also when QSFT_DISTRIBUTED=1); the other fields are
  # passed to it when set.
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1))
  # Phases to run, in order, from ("bc", "qsft", "control"). "control" is the targets-equal-1
  # baseline (docs/algorithm.md section 7): phase 2 again with every target 1 (BC on theta), the same
  # qsft.* settings, initialisation and batches, saved in WORKDIR/control/ and evaluated beside Q-SFT.
  c.phases = ("bc", "qsft")
  c.bc = _optim(steps=300, batch_size=16, learning_rate=1e-3)
  c.qsft = _optim(steps=300, batch_size=16, learning_rate=1e-3)
  # The Q-SFT phase (and the control). Target settings: `losses.TargetConfig`, docs/algorithm.md
  # sections 2 to 4.
  c.qsft.update(dict(
      tau=0.005,               # Polyak rate of theta_bar (when target_update_every = 0)
      target_update_every=0,   # > 0: hard copy theta_bar <- theta every N steps instead
      support_min=1e-4,        # behaviour-support threshold of the Bellman max, in [0, 1)
      # "token" (bootstrap from the next action token), "turn" (from the next action turn), "ones"
      # (every target 1: the control's targets).
      targets_mode="token",
      # theta's start: "phi" (the BC result); "phi_init" (the parameters phi started from: model.init's
      # weights, or the same random initialisation; the paper's Algorithm 1); "pretrained"
      # (model.init's weights; needs a non-random model.init); "fresh" (another random draw).
      theta_init="phi",
      dummy_token=-1,          # >= 0: put all of 1 - w on this token (small vocabularies); -1: spread
      # lam: target (1 - lam) * G^(n) + lam * (Monte Carlo return); faster propagation, fixed point
      # between Q* and Q^beta (docs/algorithm.md section 4).
      mc_mix=0.0,
      n_step=1,                # bootstrap n links ahead (rewards in between summed)
      # Storage dtypes of theta_bar (target_dtype) and phi (behaviour_dtype) in the Q-SFT state ("" = the
      # parameters', model param_dtype; "float32" or "bfloat16"). theta's master weights are stored in
      # model param_dtype, AdamW's moments in qsft.mu_dtype / nu_dtype. "bfloat16" halves a set's bytes;
      # for theta_bar it rounds each Polyak update (small tau: prefer target_update_every), for phi
      # (never updated) it rounds the weights once.
      target_dtype="",
      behaviour_dtype=""))
  c.loss = ml_collections.ConfigDict(dict(chunk_size=128))  # rows per chunk of the chunked losses
  # A step whose loss, gradient norm or updated parameters are not finite: "stop" fails naming the step
  # and metric, before anything from that state is saved; "skip" leaves the state unchanged.
  c.on_nonfinite = "stop"
  # Limits of on_nonfinite = "skip": a phase stops (with the checkpoints before the skipped steps)
  # after `max_consecutive_skips` skipped steps in a row, and a phase that skipped more than
  # `max_skipped_fraction` of its steps is not marked DONE (its checkpoints stay).
  c.nonfinite = ml_collections.ConfigDict(dict(max_consecutive_skips=10, max_skipped_fraction=0.1))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=200,
      keep=2,             # the last `keep` checkpoints ...
      keep_every=0,       # ... plus every K-th step (0: none)
      async_save=True))
  c.log = ml_collections.ConfigDict(dict(
      every_steps=20,  # print and record the metrics every N steps
      # the trainer's step count with rate and ETA on stderr (`qsft_jax.progress`: QSFT_PROGRESS
      # chooses a bar, a line every QSFT_PROGRESS_SECONDS, or nothing)
      progress_bar=True,
      # scalars in WORKDIR/<phase>/tensorboard during training and WORKDIR/eval/tensorboard after it
      tensorboard=True,
      # > 0: every N Q-SFT steps, the held-out value correlation (overall and at turn 0) and the
      # turn-0 mean target / clipped fraction go to the log, metrics.json and TensorBoard (needs
      # WORKDIR/data/heldout.jsonl).
      value_diagnostics_every=0,
      # Steps to trace with jax.profiler in every phase, for TensorBoard's profile plugin / XProf:
      # "" none; comma-separated step numbers and START:STOP ranges (STOP excluded, as in Python),
      # e.g. "10:13" (steps 10, 11, 12) or "5,20:22". Each run of consecutive steps is one trace in
      # WORKDIR/<phase>/profile/steps_FIRST-LAST/ (plugins/profile/RUN/HOST.xplane.pb), each step
      # annotated with its number. Tracing slows the traced steps; skip the first (compiling) step.
      profile_steps=""))
  # Evaluation after training (needs a task): episodes per policy, first environment seed, the
  # extraction betas, the longest action in tokens, episodes played together.
  c.eval = ml_collections.ConfigDict(dict(
      enabled=True, episodes=100, seed=10000, betas=(0.0, 1.0, 4.0, 16.0), max_new_tokens=16,
      batch_size=64))
  return c


VALUE_SETTINGS = ("", "paper")


def cpu_value_learning(c: ml_collections.ConfigDict, setting: str = "") -> ml_collections.ConfigDict:
  """The bundled tasks' CPU-scale phase-2 settings (configs/maze_cpu.py, wordle_cpu.py), measured in
  docs/results.md and docs/algorithm.md section 8. Changes `c` in place and returns it.

  setting "" (the default) is described below; "paper" (`--config=configs/maze_cpu.py:paper`) is the
  paper's Algorithm 1: theta, theta_bar and phi all start from the same model (theta_init "phi_init":
  the weights phi's BC started from, pretrained or the same random initialisation), phi trains by
  SFT, theta by the weighted cross-entropy with the per-token bootstrap, Polyak tau = 0.005, no Monte
  Carlo mixing, the even spread of 1 - w (no dummy token), and V the max of p_theta_bar / pi_phi over
  the whole vocabulary (support_min = 0; docs/algorithm.md section 8). The control still runs, with the
  same steps.

  - phases bc, qsft, control: every Q-SFT run trains its targets-equal-1 control on the same batches
    (docs/algorithm.md section 7) and evaluation reports both.
  - Per-turn bootstrap with a hard target copy every 25 steps, and half of each target from the
    observed Monte Carlo return (mc_mix = 0.5): values reach the first turn at once, the fixed point
    lies between Q* and Q^beta.
  - 1 - w on a dummy token, the char tokenizer's unk (id 3, never in the data): with ~100 characters the
    even spread biases every ratio upward by (1 - w) / (99 pi_phi). The dummy is excluded from the
    Bellman max and never played.
  - The Bellman max over tokens the behaviour policy takes at least 1% of the time: over rare tokens the
    ratio p_theta_bar / pi_phi is noise, and its max kept ~90% of the targets clipped at 1.
  --config.phases="('bc','qsft')" skips the control.
  """
  if setting not in VALUE_SETTINGS:
    raise ConfigError(f"config file argument: {setting!r} is not one of {VALUE_SETTINGS} (e.g. "
                      "--config=configs/maze_cpu.py:paper)")
  c.phases = ("bc", "qsft", "control")
  c.log.value_diagnostics_every = 100
  if setting == "paper":
    c.qsft.update(dict(targets_mode="token", target_update_every=0, tau=0.005, mc_mix=0.0, n_step=1,
                       dummy_token=-1, support_min=0.0, theta_init="phi_init"))
    return c
  c.qsft.targets_mode = "turn"
  c.qsft.target_update_every = 25
  c.qsft.mc_mix = 0.5
  from qsft_jax.tokenizers import CharTokenizer
  c.qsft.dummy_token = CharTokenizer.UNK
  c.qsft.support_min = 0.01
  c.qsft.theta_init = "phi"
  return c


def _fail(field: str, message: str):
  raise ConfigError(f"config.{field}: {message}")


def resolved_mesh_shape(shape: Any, device_count: int) -> dict:
  """mesh.shape with its -1 filled in; ConfigError when it cannot match device_count."""
  shape = dict(shape)
  if set(shape) != {"data", "fsdp", "tensor"}:
    _fail("mesh.shape", f"needs exactly the axes data, fsdp, tensor; got {sorted(shape)}")
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1:
    _fail("mesh.shape", f"at most one axis may be -1; got {shape}")
  if any(v == 0 or v < -1 for v in shape.values()):
    _fail("mesh.shape", f"sizes must be positive or -1; got {shape}")
  fixed = math.prod(v for v in shape.values() if v != -1)
  if free:
    if device_count % fixed:
      _fail("mesh.shape", f"{shape} cannot fill {device_count} devices ({fixed} does not divide it)")
    shape[free[0]] = device_count // fixed
  if math.prod(shape.values()) != device_count:
    _fail("mesh.shape", f"{shape} has {math.prod(shape.values())} devices but {device_count} are "
          "available")
  return shape


def check_config(config: ml_collections.ConfigDict, device_count: int, process_count: int = 1) -> dict:
  """Rejects what cannot run before anything compiles; returns the resolved mesh shape."""
  known = set(base_config().keys())
  unknown = set(config.keys()) - known
  if unknown:
    _fail(sorted(unknown)[0], f"unknown field; known top-level fields: {', '.join(sorted(known))}")
  for section in ("dataset", "data", "model", "mesh", "distributed", "bc", "qsft", "loss",
                  "nonfinite", "checkpoint", "log", "eval"):
    base = base_config()[section]
    extra = set(config[section].keys()) - set(base.keys())
    if section in ("data",):  # data fields are checked by DataConfig itself, which knows them all
      continue
    for field in sorted(extra):
      if f"{section}.{field}" in RETIRED_FIELDS:
        _fail(f"{section}.{field}", "was replaced by " + " and ".join(
            f"config.{f}" for f in RETIRED_FIELDS[f"{section}.{field}"]) + ": set those instead")
    if extra:
      _fail(f"{section}.{sorted(extra)[0]}", f"unknown field; known: {', '.join(sorted(base.keys()))}")

  mesh = resolved_mesh_shape(config.mesh.shape, device_count)
  if config.task not in TASKS:
    _fail("task", f"{config.task!r} is not a bundled task {TASKS[1:]} (use \"\" for none)")
  phases = tuple(config.phases)
  if not phases or any(p not in PHASES for p in phases) or len(set(phases)) != len(phases):
    _fail("phases", f"must be a non-empty ordered subset of {PHASES}; got {phases}")
  for name in ("qsft", "control"):
    if name in phases and (phases[0] != "bc"):
      _fail("phases", f"the {name} phase needs phi from the bc phase: put 'bc' first")
  if not config.data.path and not (config.task and config.dataset.generate):
    _fail("data.path", "is empty and no bundled task generates data (set data.path or task)")
  _check_data_fields(config)
  _check_model(config)

  batch_divisor = mesh["data"] * mesh["fsdp"]
  for name in ("qsft" if n == "control" else n for n in phases):
    p = config[name]
    if p.steps < 1:
      _fail(f"{name}.steps", f"must be >= 1; got {p.steps}")
    if not math.isfinite(p.learning_rate) or abs(p.learning_rate) > FLOAT32_MAX:
      _fail(f"{name}.learning_rate", f"{p.learning_rate} is not a finite float32 (the steps compute in "
            f"float32, largest {FLOAT32_MAX:.4g}): every update would be NaN; use a rate such as 1e-3")
    if p.learning_rate <= 0:
      _fail(f"{name}.learning_rate", f"must be > 0; got {p.learning_rate}")
    for field in ("mu_dtype", "nu_dtype"):
      if p[field] not in STORAGE_DTYPES:
        _fail(f"{name}.{field}", f"{p[field]!r} is not one of {STORAGE_DTYPES}")
    if p.microbatches < 1 or p.batch_size % p.microbatches:
      _fail(f"{name}.microbatches", f"{p.microbatches} must be >= 1 and divide {name}.batch_size="
            f"{p.batch_size}")
    micro = p.batch_size // p.microbatches
    if micro % batch_divisor:
      _fail(f"{name}.batch_size", f"{p.batch_size} rows ({micro} per microbatch) do not divide "
            f"across the mesh's data x fsdp = {batch_divisor} devices")
    shards = config.data_shards or process_count
    if shards % process_count:
      _fail("data_shards", f"{shards} is not a multiple of the {process_count} processes")
    if p.batch_size % shards or (p.batch_size // p.microbatches) % shards:
      _fail(f"{name}.batch_size", f"{p.batch_size} rows do not divide across {shards} data shards")
  q = config.qsft
  if "qsft" in phases or "control" in phases:
    from qsft_jax.losses import TargetConfig
    from qsft_jax.train_steps import TargetUpdate
    try:  # the step's own checks; their messages name the qsft.* field
      TargetUpdate(tau=q.tau, every=q.target_update_every)
      if q.tau == 0.0 and q.target_update_every == 0:
        _fail("qsft.tau", "is 0 and target_update_every is 0: the target network would never move")
      TargetConfig.from_config(config, "qsft")
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
    if q.theta_init not in THETA_INITS:
      _fail("qsft.theta_init", f"{q.theta_init!r} is not one of {THETA_INITS}")
    for field in ("target_dtype", "behaviour_dtype"):
      if q[field] not in STORAGE_DTYPES:
        _fail(f"qsft.{field}", f"{q[field]!r} is not one of {STORAGE_DTYPES}")
    if q.theta_init == "pretrained" and config.model.init == "random":
      _fail("qsft.theta_init", "is 'pretrained' but model.init is 'random': use 'phi_init' (phi's own "
            "random initialisation), 'fresh' or load weights")
  if config.on_nonfinite not in ("stop", "skip"):
    _fail("on_nonfinite", f"must be 'stop' or 'skip'; got {config.on_nonfinite!r}")
  n = config.nonfinite
  if not isinstance(n.max_consecutive_skips, int) or n.max_consecutive_skips < 1:
    _fail("nonfinite.max_consecutive_skips", f"must be an integer >= 1; got {n.max_consecutive_skips!r}")
  if not 0.0 <= n.max_skipped_fraction <= 1.0:
    _fail("nonfinite.max_skipped_fraction", f"must be in [0, 1]; got {n.max_skipped_fraction!r}")
  if config.checkpoint.every_steps < 1 or config.checkpoint.keep < 1:
    _fail("checkpoint.every_steps", "every_steps and keep must be >= 1")
  if config.loss.chunk_size < 1:
    _fail("loss.chunk_size", f"must be >= 1; got {config.loss.chunk_size}")
  profile_steps(config)
  return mesh


def profile_steps(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The sorted step numbers of log.profile_steps (see the field); ConfigError naming the field when
  it does not parse, names a step < 1, or is not a string."""
  spec = config.log.get("profile_steps", "")
  if not isinstance(spec, str):
    _fail("log.profile_steps", f"must be a string such as \"10:13\" or \"5,20:22\"; got {spec!r}")
  steps: set[int] = set()
  for item in (i.strip() for i in spec.split(",") if i.strip()):
    match = re.fullmatch(r"(\d+)(?:\s*:\s*(\d+))?", item)
    if match is None:
      _fail("log.profile_steps", f"{item!r} in {spec!r} is neither a step number nor START:STOP "
            "(e.g. \"10:13\" traces steps 10, 11 and 12)")
    start = int(match.group(1))
    stop = int(match.group(2)) if match.group(2) is not None else start + 1
    if start < 1 or stop <= start:
      _fail("log.profile_steps", f"{item!r} in {spec!r} holds no step: steps count from 1 and "
            "START:STOP needs STOP > START (STOP is excluded)")
    steps.update(range(start, stop))
  return tuple(sorted(steps))


def _check_data_fields(config: ml_collections.ConfigDict) -> None:
  """config.data builds a `qsft_jax.data.DataConfig` (its own checks: max_length, reward_transform,
  overlong, gamma, templates, unknown fields); its messages become ConfigErrors naming the field."""
  from qsft_jax.data.loading import DataConfig
  fields = config.data.to_dict()
  unknown = sorted(set(fields) - set(DataConfig.__dataclass_fields__))
  if unknown:
    _fail(f"data.{unknown[0]}", f"unknown field; known: {', '.join(sorted(DataConfig.__dataclass_fields__))}")
  try:
    DataConfig.from_config(fields)
  except (ValueError, TypeError) as e:
    message = str(e).removeprefix("data.")
    named = re.match(r"(\w+)(?:\.\w+)?:\s*(.*)", message, re.S)
    if named and named[1] in fields:  # "max_length: must be >= 2", "reward_transform.kind: ..."
      detail = named[2] + (f" (got {fields[named[1]]!r})" if named[1] == "reward_transform" else "")
      _fail(f"data.{named[1]}", detail)
    _fail("data", message)


def _check_model(config: ml_collections.ConfigDict) -> None:
  """model.overrides names ModelConfig fields; with model.init = "random", model.preset is a preset
  and the overrides make a valid ModelConfig (vocab_size is the tokenizer's, checked at run time)."""
  from qsft_jax.models import config as model_config_lib
  from qsft_jax.models import lora as lora_lib
  if "lora" in config.model:
    extra = sorted(set(config.model.lora.keys()) - set(base_config().model.lora.keys()))
    if extra:
      _fail(f"model.lora.{extra[0]}", f"unknown field; known: {', '.join(base_config().model.lora.keys())}")
    lora = config.model.lora
    if not isinstance(lora.rank, int) or isinstance(lora.rank, bool):
      _fail("model.lora.rank", f"must be an integer >= 0 (0: no LoRA); got {lora.rank!r}")
    if isinstance(lora.targets, str):
      _fail("model.lora.targets", f"must be a tuple of patterns, not a string ({lora.targets!r})")
    for field, message in lora_lib.problems(lora_lib.LoraConfig.from_config(lora)):
      _fail(f"model.lora.{field}", message)
  overrides = config.model.overrides.to_dict()
  known = [f for f in model_config_lib.ModelConfig.__dataclass_fields__]
  unknown = sorted(set(overrides) - set(known))
  if unknown:
    _fail(f"model.overrides.{unknown[0]}", f"ModelConfig has no such field; its fields: {', '.join(known)}")
  if config.model.init != "random":
    return  # the pretrained weights' own config, checked when they load
  if config.model.preset not in model_config_lib.preset_names():
    _fail("model.preset", f"{config.model.preset!r} is not a preset; known: "
          f"{', '.join(model_config_lib.preset_names())}")
  try:
    model_config_lib.get_preset(config.model.preset, **overrides)
  except (ValueError, TypeError) as e:
    message = str(e).removeprefix("ModelConfig: ")
    named = [k for k in overrides if re.search(rf"\b{k}\b", message)]
    field = f"model.overrides.{named[0]}" if named else "model.preset"
    _fail(field, f"{message} (model.preset {config.model.preset!r} with model.overrides {overrides})")


def check_data_files(config: ml_collections.ConfigDict) -> None:
  """data.path (when set) names files that exist and hold at least one non-blank line. Reads the
  filesystem, so it is separate from `check_config`, which also runs where the data is not (AOT)."""
  if not config.data.path or config.data.get("source", "jsonl") != "jsonl":
    return
  from qsft_jax import storage
  from qsft_jax.data.episodes import resolve_paths
  path = config.data.path
  try:
    files = resolve_paths(path if isinstance(path, str) else list(path))
  except FileNotFoundError as e:
    _fail("data.path", f"{e}; set data.path to your JSONL file(s), or leave it empty to generate the "
          "task's data")
  if not files:
    _fail("data.path", f"{path!r} matches no file")
  for file in files:
    try:
      with storage.path(file).open("rb") as f:
        if any(line.strip() for line in f):
          return
    except OSError as e:
      _fail("data.path", f"{file}: cannot be read: {e.strerror or e}")
  _fail("data.path", f"{', '.join(files)}: no episode (the file{'s are' if len(files) > 1 else ' is'} "
        "empty); one JSON episode per line is expected (README, Data format)")


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` (or `get_config(arg)`, what `--config=PATH:ARG` passes) of a config file given by
  path (configs build on one another with this, so they work from any current directory)."""
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(f"qsft_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def pod_config(preset: str, *, batch_size: int, max_length: int = 2048, chunk_size: int = 128,
               vocab_size: int | None = None, init: str = "random",
               theta_init: str = "fresh") -> ml_collections.ConfigDict:
  """The shared shape of the pod configs (configs/pod_*.py): Wordle with the SmolLM2 tokenizer, bf16
  compute, scanned layers with full remat, pure FSDP over every chip, global `batch_size` rows."""
  c = base_config()
  c.task = "wordle"
  c.tokenizer = "smollm2"
  c.data.max_length = max_length
  c.model.preset = preset
  c.model.init = init
  overrides = {"dtype": "bfloat16", "scan_layers": True, "remat_policy": "full"}
  if vocab_size is not None:
    overrides["vocab_size"] = vocab_size
  c.model.overrides = overrides
  c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
  c.bc.batch_size = c.qsft.batch_size = batch_size
  c.qsft.theta_init = theta_init
  c.loss.chunk_size = chunk_size
  return c
