"""What each training phase builds from the config: its optimizer, jitted step, initial state and the
state's shardings.

The trainer (`qsft_jax.main`) runs these programs; the ahead-of-time compiler (`qsft_jax.aot`)
compiles the very same ones for a pod slice, so what AOT reports is what the trainer will run.

Phases: "bc" trains phi (the behaviour policy) with the cross-entropy on action tokens; "qsft"
trains theta with the weighted cross-entropy against theta_bar and the frozen phi; "control" is the
"qsft" phase with every target forced to 1 (the same settings, initialisation and batches).
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
from qsft_jax.models.lora import LoraConfig
from qsft_jax.models.transformer import Transformer

PHASES = ("bc", "qsft", "control")
# The control sees exactly the batches of Q-SFT (same data seed offset): only the targets differ.
DATA_SEED_OFFSET = {"bc": 0, "qsft": 1, "control": 1}


def optim_config(config: ml_collections.ConfigDict, phase: str) -> ml_collections.ConfigDict:
  """The config section holding a phase's steps, batch size and optimizer (the control's is qsft's)."""
  return config["qsft" if phase == "control" else phase]


def state_kind(phase: str) -> str:
  """The train-state layout of a phase: "bc" (theta alone) or "qsft" (with theta_bar and phi)."""
  return "bc" if phase == "bc" else "qsft"


def make_optimizer(p: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with linear warm-up then cosine decay to 10%, after global-norm clipping.

  The first moment is stored in `p.mu_dtype` ("" = the parameters' dtype).
  Returns (optimizer, schedule); `schedule(step - 1)` is the learning rate of 1-based step `step`.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, p.learning_rate, warmup_steps=max(1, min(p.warmup_steps, p.steps)),
      decay_steps=max(p.steps, p.warmup_steps + 1), end_value=0.1 * p.learning_rate)
  parts = [optax.clip_by_global_norm(p.grad_clip)] if p.grad_clip > 0 else []
  mu_dtype = jnp.dtype(p.mu_dtype) if p.mu_dtype else None
  parts.append(optax.adamw(schedule, b1=p.b1, b2=p.b2, weight_decay=p.weight_decay, mu_dtype=mu_dtype))
  return optax.chain(*parts), schedule


def step_options(config: ml_collections.ConfigDict, phase: str) -> train_steps.StepOptions:
  """loss.chunk_size, the phase's microbatches and on_nonfinite as the step's `StepOptions`."""
  return train_steps.StepOptions(chunk_size=config.loss.chunk_size,
                                 microbatches=optim_config(config, phase).microbatches,
                                 skip_nonfinite=config.on_nonfinite == "skip")


def target_update(config: ml_collections.ConfigDict) -> train_steps.TargetUpdate:
  """qsft.tau and qsft.target_update_every as the Q-SFT step's `TargetUpdate` (the control's too)."""
  return train_steps.TargetUpdate(tau=config.qsft.tau, every=config.qsft.target_update_every)


def _store_frozen(state: dict, dtype: jnp.dtype | None) -> dict:
  """The Q-SFT state with the floating-point leaves of theta_bar and phi in `dtype` (None: as they are).

  Neither set takes a gradient or optimizer state, and the step keeps each set's dtype (the forward
  casts to the compute dtype; `train_steps.polyak_update` mixes in the target's dtype).
  """
  if dtype is None:
    return state
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return {**state, **{k: jax.tree.map(cast, state[k]) for k in ("target_params", "behaviour_params")}}


@dataclasses.dataclass(frozen=True)
class PhaseProgram:
  """One phase's compiled pieces.

  step: the jitted (state, batch) -> (state, metrics) (`train_steps.StepFn`, also `.lower(...)`).
  init_state: "bc": params -> state; "qsft"/"control": (theta, phi) -> state, theta_bar and phi
    stored in qsft.frozen_dtype. Call under jit with out_shardings=state_shardings, or under
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
    args = param_shapes if self.kind == "bc" else (param_shapes, param_shapes)
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
  if kind == "bc":
    step = train_steps.make_bc_step(model, model_config, optimizer, mesh, rules, options)
    init_state = lambda params: train_steps.init_bc_state(params, optimizer)
    if lora is not None:
      init_state = lambda variables: train_steps.init_lora_bc_state(variables, optimizer, lora)
  elif lora is not None:
    step = train_steps.make_qsft_step(model, model_config, optimizer, mesh, rules,
                                      losses.TargetConfig.from_config(config, phase),
                                      target_update(config), options)
    frozen = jnp.dtype(config.qsft.frozen_dtype) if config.qsft.frozen_dtype else None
    init_state = lambda variables: _store_frozen(
        train_steps.init_lora_qsft_state(variables[0], variables[1], optimizer, lora), frozen)
  else:
    step = train_steps.make_qsft_step(model, model_config, optimizer, mesh, rules,
                                      losses.TargetConfig.from_config(config, phase),
                                      target_update(config), options)
    frozen = jnp.dtype(config.qsft.frozen_dtype) if config.qsft.frozen_dtype else None
    init_state = lambda params: _store_frozen(
        train_steps.init_qsft_state(params[0], params[1], optimizer), frozen)
  shardings = train_steps.state_shardings(model, model_config, optimizer, mesh, rules, kind)
  return PhaseProgram(phase=phase, kind=kind, model=model, optimizer=optimizer, schedule=schedule,
                      step=step, init_state=init_state, state_shardings=shardings, lora=lora)
