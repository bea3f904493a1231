"""What each training phase builds from the config: its optimizer, jitted step, initial state and the
state's shardings.

The trainer (`qsft_jax.main`) runs these programs; the ahead-of-time compiler (`qsft_jax.aot`)
compiles the very same ones for a pod slice, so what AOT reports is what the trainer will run.

Phases: "bc" trains phi (the behaviour policy) with the cross-entropy on action tokens; "qsft"
trains theta with the weighted cross-entropy against theta_bar and the frozen phi; "control" is the
"qsft" phase with every target forced to 1 (the same settings, initialisation and batches); "mc" and
"ilql" train value heads on the hidden states of phi (frozen) or of a trunk that starts from phi
(`train_steps.make_heads_step`); "filtered_bc" is "bc" (the same step, state and initialisation) on the
episodes with the top returns (`data.pipeline.top_return_source`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from qsft_jax import losses
from qsft_jax import sharding as qsharding
from qsft_jax import train_steps
from qsft_jax.models.config import ModelConfig
from qsft_jax.models import heads as heads_lib
from qsft_jax.models import quant_base
from qsft_jax.models.lora import LoraConfig
from qsft_jax.models.transformer import Transformer

PHASES = ("bc", "qsft", "control", "filtered_bc", "mc", "ilql")
# The control sees exactly the batches of Q-SFT (same data seed offset): only the targets differ. The
# value-head baselines see them too, for comparability. Filtered BC shuffles its subset with BC's seed.
DATA_SEED_OFFSET = {"bc": 0, "qsft": 1, "control": 1, "filtered_bc": 0, "mc": 1, "ilql": 1}
HEADS_PHASES = ("mc", "ilql")


def optim_config(config: ml_collections.ConfigDict, phase: str) -> ml_collections.ConfigDict:
  """The config section holding a phase's steps, batch size and optimizer (the control's is qsft's)."""
  return config["qsft" if phase == "control" else phase]


def state_kind(phase: str) -> str:
  """The train-state layout of a phase: "bc" (theta alone: bc, filtered_bc), "qsft" (with theta_bar and
  phi) or "heads" (value heads over a trunk: `train_steps.init_heads_state`)."""
  if phase in HEADS_PHASES:
    return "heads"
  return "bc" if phase in ("bc", "filtered_bc") else "qsft"


def forward_passes(config: ml_collections.ConfigDict, phase: str) -> int:
  """Model forwards per training token of a phase's step, for its FLOP count: a training pass is 3
  (forward and backward), Q-SFT adds theta_bar's and phi's; a value-head phase over the frozen phi
  runs one forward (the heads are not counted)."""
  if state_kind(phase) == "heads":
    return 3 if config[phase].trunk == "train" else 1
  return 3 if state_kind(phase) == "bc" else 5


def storage_dtype(name: str) -> jnp.dtype | None:
  """A storage-dtype config field ("float32", "bfloat16") as a dtype; "" -> None (the parameters')."""
  return jnp.dtype(name) if name else None


def adamw(learning_rate: optax.ScalarOrSchedule, *, b1: float, b2: float, weight_decay: float,
          mu_dtype: jnp.dtype | None = None, nu_dtype: jnp.dtype | None = None
          ) -> optax.GradientTransformation:
  """`optax.adamw` (eps 1e-8, the same state layout) with both moments' storage dtypes chosen.

  optax.adamw has only mu_dtype: its second moment is stored in the parameters' dtype. Here nu is
  cast to `nu_dtype` at init and after each update (None: the parameters' dtype). As optax does for
  mu, each update is computed from the new moments in float32 (decay x stored moment is rounded to the
  stored dtype, optax's arithmetic) before they are rounded for storage.
  """
  adam = optax.scale_by_adam(b1=b1, b2=b2, mu_dtype=mu_dtype)
  store = lambda state: state._replace(nu=optax.tree.cast(state.nu, nu_dtype))

  def init(params):
    return store(adam.init(params))

  def update(updates, state, params=None):
    updates, state = adam.update(updates, state, params)
    return updates, store(state)

  return optax.chain(optax.GradientTransformation(init, update), optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))


def make_optimizer(p: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with linear warm-up then cosine decay to 10%, after global-norm clipping.

  The first and second moments are stored in `p.mu_dtype` and `p.nu_dtype` ("" = the parameters'
  dtype). Returns (optimizer, schedule); `schedule(step - 1)` is the learning rate of 1-based step
  `step`.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, p.learning_rate, warmup_steps=max(1, min(p.warmup_steps, p.steps)),
      decay_steps=max(p.steps, p.warmup_steps + 1), end_value=0.1 * p.learning_rate)
  parts = [optax.clip_by_global_norm(p.grad_clip)] if p.grad_clip > 0 else []
  parts.append(adamw(schedule, b1=p.b1, b2=p.b2, weight_decay=p.weight_decay,
                     mu_dtype=storage_dtype(p.mu_dtype), nu_dtype=storage_dtype(p.nu_dtype)))
  return optax.chain(*parts), schedule


def step_options(config: ml_collections.ConfigDict, phase: str) -> train_steps.StepOptions:
  """loss.chunk_size, the phase's microbatches and on_nonfinite as the step's `StepOptions`."""
  return train_steps.StepOptions(chunk_size=config.loss.chunk_size,
                                 microbatches=optim_config(config, phase).microbatches,
                                 skip_nonfinite=config.on_nonfinite == "skip")


def target_update(config: ml_collections.ConfigDict) -> train_steps.TargetUpdate:
  """qsft.tau and qsft.target_update_every as the Q-SFT step's `TargetUpdate` (the control's too)."""
  return train_steps.TargetUpdate(tau=config.qsft.tau, every=config.qsft.target_update_every)


def _store_frozen(state: dict, dtypes: dict[str, jnp.dtype | None]) -> dict:
  """The Q-SFT state with the floating-point leaves of each set named in `dtypes` ("target_params",
  "behaviour_params") in its dtype (None: as they are).

  Neither set takes a gradient or optimizer state, and the step keeps each set's dtype (the forward
  casts to the compute dtype; `train_steps.polyak_update` mixes in the target's dtype).
  """
  def cast(tree, dtype):
    if dtype is None:
      return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  return {**state, **{k: cast(state[k], dtype) for k, dtype in dtypes.items()}}


def _quantized_base(init_state: Callable[[Any], dict], model_config: ModelConfig,
                    lora: LoraConfig) -> Callable[[Any], dict]:
  """init_state with the LoRA state's base quantised (QLoRA, model.lora.quantization int8 / nf4): its
  targeted kernels stored as `quant.QuantizedArray`s, the rest in base_dtype (`quant_base.quantize_base`)."""
  def init(params):
    state = init_state(params)
    return {**state, "base": quant_base.quantize_base(state["base"], model_config, lora)}
  return init


@dataclasses.dataclass(frozen=True)
class PhaseProgram:
  """One phase's compiled pieces.

  step: the jitted (state, batch) -> (state, metrics) (`train_steps.StepFn`, also `.lower(...)`).
  init_state: "bc": params -> state; "mc"/"ilql": phi -> state (`train_steps.init_heads_state`, new
    heads drawn from seed + 2); "qsft"/"control": (theta, phi) -> state, theta_bar stored in
    qsft.target_dtype and phi in qsft.behaviour_dtype (theta in the parameters' dtype, AdamW's
    moments in mu_dtype / nu_dtype). Call under jit with out_shardings=state_shardings, or under
    jax.eval_shape for the abstract state. With LoRA each of params, theta, phi is the variables dict
    {"params": base, "lora": adapters} (theta's base is the state's base, stored in lora.base_dtype).
  state_shardings: the NamedShardings of the state from the rule table.
  lora: the run's LoraConfig when model.lora.rank > 0 (the LoRA state of train_steps), else None.
  """
  phase: str
  kind: str
  model: nn.Module
  optimizer: optax.GradientTransformation
  schedule: Callable
  step: train_steps.StepFn
  init_state: Callable[[Any], dict]
  state_shardings: dict
  lora: LoraConfig | None = None

  def abstract_state(self, param_shapes: Any) -> dict:
    """ShapeDtypeStructs (with shardings) of the state that starts from parameters of these shapes
    (`sharded.param_shapes(self.model)`: with LoRA the variables {"params", "lora"}, base included)."""
    args = param_shapes if self.kind in ("bc", "heads") else (param_shapes, param_shapes)
    return qsharding.abstract_with_shardings(jax.eval_shape(self.init_state, args), self.state_shardings)


def build(config: ml_collections.ConfigDict, phase: str, model_config: ModelConfig, mesh: Mesh,
          rules) -> PhaseProgram:
  """The optimizer, step, initial-state function and state shardings of `phase` under `config`."""
  if phase not in PHASES:
    raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
  p = optim_config(config, phase)
  lora = LoraConfig.from_config(config.model.lora) if "lora" in config.model else None
  lora = lora if lora is not None and lora.enabled else None
  model = Transformer(model_config, lora=lora)
  optimizer, schedule = make_optimizer(p)
  options = step_options(config, phase)
  kind = state_kind(phase)
  if kind == "heads":
    if lora is not None:
      raise ValueError(f"phase {phase!r}: value heads over LoRA adapters are not supported "
                       "(config_lib.check_config)")
    settings = train_steps.HeadsSettings.from_config(config, phase)
    step = train_steps.make_heads_step(model, model_config, optimizer, mesh, rules, settings, options)
    key = jax.random.key(config.seed + 2)
    h = jnp.zeros((1, model_config.d_model), jnp.dtype(model_config.dtype))
    init_state = lambda phi: train_steps.init_heads_state(
        phi, nn.unbox(heads_lib.ValueHeads(model_config, settings.num_q).init(key, h)), optimizer, settings)
    shardings = train_steps.heads_state_shardings(model, model_config, optimizer, mesh, rules, settings)
    return PhaseProgram(phase=phase, kind=kind, model=model, optimizer=optimizer, schedule=schedule,
                        step=step, init_state=init_state, state_shardings=shardings)
  if kind == "bc":
    step = train_steps.make_bc_step(model, model_config, optimizer, mesh, rules, options)
    init_state = lambda params: train_steps.init_bc_state(params, optimizer)
    if lora is not None:
      init_state = lambda variables: train_steps.init_lora_bc_state(variables, optimizer, lora)
  else:
    step = train_steps.make_qsft_step(model, model_config, optimizer, mesh, rules,
                                      losses.TargetConfig.from_config(config, phase),
                                      target_update(config), options)
    frozen = {"target_params": storage_dtype(config.qsft.target_dtype),
              "behaviour_params": storage_dtype(config.qsft.behaviour_dtype)}
    if lora is None:
      init_state = lambda params: _store_frozen(
          train_steps.init_qsft_state(params[0], params[1], optimizer), frozen)
    else:  # each of theta, phi is {"params": base, "lora": adapters}; the adapters take the dtypes
      init_state = lambda variables: _store_frozen(
          train_steps.init_lora_qsft_state(variables[0], variables[1], optimizer, lora), frozen)
  shardings = train_steps.state_shardings(model, model_config, optimizer, mesh, rules, kind)
  if lora is not None and lora.quantization != "none":
    init_state = _quantized_base(init_state, model_config, lora)
  return PhaseProgram(phase=phase, kind=kind, model=model, optimizer=optimizer, schedule=schedule,
                      step=step, init_state=init_state, state_shardings=shardings, lora=lora)
