"""Train states, target-network updates and the jitted BC and Q-SFT train steps.

Train state (docs/architecture.md): a plain dict. BC: {"step", "params", "opt_state"}; Q-SFT adds
"target_params" (theta_bar) and "behaviour_params" (phi, frozen). "params" is the Flax variables dict
{"params": tree} of `Transformer(config)`; every array is sharded by the config's rule table.

With LoRA (qsft_jax.models.lora) each parameter set is an adapter set {"lora": adapters} over one frozen
base, the state's "base" {"params": base tree}: the forward of a set is `{**state["base"], **set}`, the
gradient, the optimizer state and theta_bar's update cover the adapters only, and the step returns the
base unchanged (donated in, aliased out: never copied).

A step is one jitted pure function (state, batch) -> (state, metrics) with explicit in/out shardings
and the state donated. The batch is the dict of [B, L] token-level MDP arrays. Gradient accumulation
splits the global batch into `microbatches` parts and scans over them; every part's loss is divided
by the GLOBAL action-token count, so the summed gradient is exactly the full batch's.

Q-SFT step: theta_bar and phi forward (no gradient) -> per-row values V (chunked) -> targets at the
next-action rows -> WCE on theta (chunked, fused gradient) -> optimizer update -> target update
(Polyak with tau, or a hard copy every `TargetUpdate.every` steps).

A step is configured by three objects, each built once from the run config (`qsft_jax.phases`):
`losses.TargetConfig` (the Bellman targets), `TargetUpdate` (theta_bar's update) and `StepOptions`
(chunking, gradient accumulation, non-finite handling).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qsft_jax import losses
from qsft_jax import sharding as qsharding
from qsft_jax.models import heads as heads_lib
from qsft_jax.models import sharded
from qsft_jax.models import lora as lora_lib
from qsft_jax.models import quant_base
from qsft_jax.models.config import ModelConfig
from qsft_jax.models.lora import LoraConfig
from qsft_jax.models.transformer import unembedding

BC_KEYS = ("step", "params", "opt_state")
QSFT_KEYS = BC_KEYS + ("target_params", "behaviour_params")
BASE_KEY = "base"  # a LoRA state's frozen base {"params": tree}


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """How a step computes: chunk_size and microbatches change only float rounding, skip_nonfinite
  what a step with a non-finite loss or gradient does.

  chunk_size: rows per chunk of the chunked losses (config loss.chunk_size), >= 1.
  microbatches: gradient-accumulation parts of the global batch (config bc/qsft.microbatches), >= 1.
  skip_nonfinite: a step with a non-finite loss, gradient norm or updated parameters leaves the state
    unchanged (config on_nonfinite = "skip") instead of applying it.
  """
  chunk_size: int = 128
  microbatches: int = 1
  skip_nonfinite: bool = False

  def __post_init__(self):
    if self.chunk_size < 1:
      raise ValueError(f"loss.chunk_size: must be >= 1; got {self.chunk_size}")
    if self.microbatches < 1:
      raise ValueError(f"microbatches: must be >= 1; got {self.microbatches}")


@dataclasses.dataclass(frozen=True)
class TargetUpdate:
  """The target-network (theta_bar) update after each optimizer step (docs/algorithm.md section 4).

  every > 0: hard copy theta_bar <- theta every `every` steps (tau unused); every == 0: Polyak
  theta_bar <- (1 - tau) theta_bar + tau theta every step. Config qsft.tau, qsft.target_update_every.
  """
  tau: float = 0.005
  every: int = 0

  def __post_init__(self):
    if not 0.0 <= self.tau <= 1.0:
      raise ValueError(f"qsft.tau: must be in [0, 1]; got {self.tau}")
    if self.every < 0:
      raise ValueError(f"qsft.target_update_every: must be >= 0; got {self.every}")


# ----------------------------------------------------------------------------------------------
# State


def init_bc_state(params: Any, optimizer: optax.GradientTransformation) -> dict:
  """{"step": int32 0, "params", "opt_state"} (call under jit with out_shardings to shard it)."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def init_qsft_state(params: Any, behaviour_params: Any, optimizer: optax.GradientTransformation,
                    target_params: Any = None) -> dict:
  """BC state of theta plus "target_params" (default: theta) and "behaviour_params".

  theta_bar and phi are copied, so that no buffer appears twice in the donated state even when
  theta starts from phi (the same arrays).
  """
  state = init_bc_state(params, optimizer)
  state["target_params"] = jax.tree.map(jnp.copy, params if target_params is None else target_params)
  state["behaviour_params"] = jax.tree.map(jnp.copy, behaviour_params)
  return state


def init_lora_bc_state(variables: Any, optimizer: optax.GradientTransformation, lora: LoraConfig) -> dict:
  """LoRA BC state from variables {"params": base, "lora": adapters}: {"step", "params": {"lora": ...},
  "opt_state" (adapters only), "base": the base as stored (`lora.store_base`: base_dtype)}."""
  base, adapters = lora_lib.split(variables)
  return {**init_bc_state(adapters, optimizer), BASE_KEY: lora_lib.store_base(base, lora)}


def init_lora_qsft_state(variables: Any, behaviour_variables: Any, optimizer: optax.GradientTransformation,
                         lora: LoraConfig) -> dict:
  """LoRA Q-SFT state: theta's adapters from `variables`, theta_bar a copy of them, phi's adapters from
  `behaviour_variables`; the base is `variables`'s (both sets run over one base)."""
  base, adapters = lora_lib.split(variables)
  state = init_qsft_state(adapters, lora_lib.split(behaviour_variables)[1], optimizer)
  state[BASE_KEY] = lora_lib.store_base(base, lora)
  return state


def state_shardings(model: nn.Module, model_config: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules, kind: str) -> dict:
  """NamedShardings of a train state ("bc" or "qsft") from the rule table.

  Optimizer-state leaves that mirror a parameter (Adam moments, ...) take that parameter's
  sharding; the rest (counts, scalars) are replicated. A model with LoRA adapters
  (`Transformer(config, lora=...)`) gives the LoRA state: parameter sets {"lora": ...} and "base".
  """
  if kind not in ("bc", "qsft"):
    raise ValueError(f"state kind {kind!r}: expected 'bc' or 'qsft'")
  params = quant_base.variables_shardings(model, model_config, mesh, rules)
  shapes = sharded.param_shapes(model, model_config)
  base = None
  if lora_lib.COLLECTION in params:
    base = {"params": params["params"]}  # QLoRA: the quantised base of phases.build's init_state
    params, shapes = ({lora_lib.COLLECTION: t[lora_lib.COLLECTION]} for t in (params, shapes))
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(optimizer.init, shapes)
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  out = {"step": replicated, "params": params, "opt_state": opt}
  if kind == "qsft":
    out["target_params"] = params
    out["behaviour_params"] = params
  if base is not None:
    out[BASE_KEY] = base
  return out


def polyak_update(target: Any, online: Any, tau: float | jax.Array) -> Any:
  """theta_bar <- (1 - tau) * theta_bar + tau * theta, leaf by leaf in the target's dtype."""
  def mix(t, o):
    tau_t = jnp.asarray(tau, t.dtype)
    return (1 - tau_t) * t + tau_t * o.astype(t.dtype)
  return jax.tree.map(mix, target, online)


def update_target(target: Any, online: Any, step: jax.Array, update: TargetUpdate) -> Any:
  """The target-network update after optimizer step number `step` (1-based: the step just taken).

  update.every > 0: hard copy theta_bar <- theta when step % every == 0, else unchanged (tau
  ignored). update.every == 0: Polyak with update.tau every step.
  """
  if update.every == 0:
    return polyak_update(target, online, update.tau)
  copy = (step % update.every) == 0
  return jax.tree.map(lambda t, o: jnp.where(copy, o.astype(t.dtype), t), target, online)


# ----------------------------------------------------------------------------------------------
# Steps


@dataclasses.dataclass(frozen=True)
class StepFn:
  """A jitted step that runs under its mesh and logical-axis rules (needed when it is traced).

  Call it like the function; `.lower(state, batch)` lowers it (for cost and memory analysis).
  """
  jitted: Callable
  mesh: Mesh
  rules: Any

  def __call__(self, state, batch):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted(state, batch)

  def lower(self, state, batch):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(state, batch)


def _split_microbatches(batch: Mapping[str, jax.Array], microbatches: int) -> dict:
  """[B, ...] -> [M, B / M, ...]. Microbatch m takes rows m, m + M, m + 2M, ...: each device's
  contiguous block of rows then holds rows of every microbatch, so no rows move between devices."""
  def split(x):
    rows = x.shape[0]
    if rows % microbatches:
      raise ValueError(f"batch of {rows} rows does not split into {microbatches} microbatches")
    return jnp.swapaxes(x.reshape((rows // microbatches, microbatches) + x.shape[1:]), 0, 1)
  return {k: split(v) for k, v in batch.items()}


def _constrain_rows(batch, row_sharding):
  return {k: jax.lax.with_sharding_constraint(v, row_sharding) if v.ndim == 2 else v
          for k, v in batch.items()}


def _base_of(state) -> dict:
  """{"base": state's base} of a LoRA state, passed through a step unchanged; {} otherwise."""
  return {BASE_KEY: state[BASE_KEY]} if BASE_KEY in state else {}


def _with_base(state) -> Callable[[Any], Any]:
  """params -> the variables of their forward: {**base, **adapters} with LoRA, the params otherwise.
  The base is read without a gradient (only the adapters are differentiated)."""
  if BASE_KEY not in state:
    return lambda p: p
  base = jax.lax.stop_gradient(state[BASE_KEY])
  return lambda p: {**base, **p}


def _hidden(model, params, batch):
  return model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                     method="hidden_states")


def tree_is_finite(tree: Any) -> jax.Array:
  """bool []: every element of every floating-point leaf of `tree` is finite (one fused reduction
  per leaf; no squares or sums that could overflow on large finite values)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.ones((), jnp.bool_)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _apply_update(state, grads, loss, optimizer, skip_nonfinite):
  """Optimizer update. Returns (params, opt_state, grad norm, params_finite, skipped).

  params_finite: the updated parameters are all finite (a finite loss and gradient can still give
  non-finite parameters: an overflowing learning rate or optimizer state). With skip_nonfinite, a
  step with a non-finite loss, gradient norm or updated parameters leaves params and optimizer
  state unchanged (skipped = True)."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  params_finite = tree_is_finite(params)
  skipped = jnp.zeros((), jnp.bool_)
  if skip_nonfinite:
    skipped = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skipped, o, n), new, old)
    params = keep(params, state["params"])
    opt_state = keep(opt_state, state["opt_state"])
  return params, opt_state, grad_norm, params_finite, skipped


def _accumulate(micro_fn, batch, microbatches, row_sharding, params):
  """Sums (loss, grads, metric sums) of micro_fn over microbatches (a scan when M > 1)."""
  if microbatches == 1:
    return micro_fn(params, batch)
  parts = _split_microbatches(batch, microbatches)

  def body(carry, part):
    out = micro_fn(params, _constrain_rows(part, row_sharding))
    return jax.tree.map(jnp.add, carry, out), None

  zeros = jax.eval_shape(lambda: micro_fn(params, jax.tree.map(lambda v: v[0], parts)))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  total, _ = jax.lax.scan(body, zeros, parts)
  return total


def _count_metrics(batch):
  return {"action_tokens": jnp.sum(batch["action_mask"].astype(jnp.float32)),
          "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))}


def _jit_step(step_fn, model, model_config, optimizer, mesh, rules, kind):
  shardings = state_shardings(model, model_config, optimizer, mesh, rules, kind)
  rows = qsharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step_fn, in_shardings=(shardings, rows), out_shardings=(shardings, replicated),
                   donate_argnums=0)
  return StepFn(jitted, mesh, rules)


def make_bc_step(model: nn.Module, model_config: ModelConfig, optimizer: optax.GradientTransformation,
                 mesh: Mesh, rules, options: StepOptions = StepOptions()) -> StepFn:
  """Jitted BC (cross-entropy on action tokens) step: (state, batch) -> (state, metrics).

  metrics (floats, replicated): loss, grad_norm, mean_logp (mean log p of the taken action tokens),
  action_tokens, tokens, params_finite (1.0 when the optimizer update gave finite parameters, else
  0.0: the trainer stops before saving, or the step was skipped), skipped (1.0 when a non-finite step
  was skipped; 0 unless skip_nonfinite).
  """
  rows = qsharding.batch_sharding(mesh, rules)
  vocab = model_config.vocab_size

  def step(state, batch):
    normaliser = losses.action_token_count(batch["action_mask"])
    full = _with_base(state)

    def micro(params, part):
      def loss_fn(p):
        hidden = _hidden(model, full(p), part)
        loss, logp = losses.chunked_bc_loss(
            hidden, unembedding(full(p), model_config), losses.to_rows(part["tokens"]),
            losses.to_rows(part["action_mask"], False), normaliser, vocab_size=vocab,
            chunk_size=options.chunk_size, softcap=model_config.final_logit_softcap)
        return loss, logp
      (loss, logp), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      row_mask = losses.to_rows(part["action_mask"], False)
      return loss, grads, {"sum_logp": jnp.sum(jnp.where(row_mask, logp, 0.0)), **_count_metrics(part)}

    loss, grads, sums = _accumulate(micro, batch, options.microbatches, rows, state["params"])
    params, opt_state, grad_norm, params_finite, skipped = _apply_update(
        state, grads, loss, optimizer, options.skip_nonfinite)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, **_base_of(state)}
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "mean_logp": sums["sum_logp"] / jnp.maximum(sums["action_tokens"], 1.0),
               "action_tokens": sums["action_tokens"], "tokens": sums["tokens"],
               "params_finite": params_finite.astype(jnp.float32),
               "skipped": skipped.astype(jnp.float32)}
    return new_state, metrics

  return _jit_step(step, model, model_config, optimizer, mesh, rules, "bc")


def make_qsft_step(model: nn.Module, model_config: ModelConfig, optimizer: optax.GradientTransformation,
                   mesh: Mesh, rules, targets: losses.TargetConfig = losses.TargetConfig(),
                   update: TargetUpdate = TargetUpdate(),
                   options: StepOptions = StepOptions()) -> StepFn:
  """Jitted Q-SFT step: (state, batch) -> (state, metrics). See the module docstring.

  targets: how the Bellman targets are formed (mode "token" | "turn" | "ones", support_min,
  dummy_token, n_step, mc_mix; docs/algorithm.md sections 2 and 4); update: theta_bar's update
  (Polyak or hard copy); options: chunking, microbatches, skipping non-finite steps.

  metrics (floats, replicated; means over the action tokens of the global batch): loss,
  mean_target, clipped_above / clipped_below (fraction of targets clipped at 1 / at 0),
  mean_p_theta and mean_pi_phi (probabilities of the taken tokens), mean_ratio (p_theta / pi_phi),
  grad_norm, action_tokens, tokens, params_finite (of theta after the update), skipped.
  """
  for name, obj, kind in (("targets", targets, losses.TargetConfig), ("update", update, TargetUpdate),
                          ("options", options, StepOptions)):
    if not isinstance(obj, kind):
      raise TypeError(f"{name} must be a {kind.__qualname__}; got {type(obj).__name__}")
  rows = qsharding.batch_sharding(mesh, rules)
  vocab = model_config.vocab_size

  def step(state, batch):
    normaliser = losses.action_token_count(batch["action_mask"])
    full = _with_base(state)
    target_params = full(jax.lax.stop_gradient(state["target_params"]))
    behaviour_params = full(jax.lax.stop_gradient(state["behaviour_params"]))

    def micro(params, part):
      target_hidden = _hidden(model, target_params, part)
      behaviour_hidden = _hidden(model, behaviour_params, part)

      def loss_fn(p):
        return losses.qsft_loss(
            _hidden(model, full(p), part), unembedding(full(p), model_config), target_hidden,
            unembedding(target_params, model_config), behaviour_hidden,
            unembedding(behaviour_params, model_config), part, normaliser, vocab_size=vocab,
            targets=targets, chunk_size=options.chunk_size, softcap=model_config.final_logit_softcap)

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      mask = part["action_mask"]
      row_mask = losses.to_rows(mask, False)
      weights, clipped = aux["targets"], aux["clipped"]
      log_ratio = aux["logp_theta"] - aux["logp_behaviour"]
      row_sum = lambda x: jnp.sum(jnp.where(row_mask, x, 0.0))
      sums = {"sum_target": jnp.sum(jnp.where(mask, weights, 0.0)),
              "clipped_above": jnp.sum(clipped & (weights >= 1.0)).astype(jnp.float32),
              "clipped_below": jnp.sum(clipped & (weights <= 0.0)).astype(jnp.float32),
              "sum_p_theta": row_sum(jnp.exp(aux["logp_theta"])),
              "sum_pi_phi": row_sum(jnp.exp(aux["logp_behaviour"])),
              "sum_ratio": row_sum(jnp.exp(jnp.minimum(log_ratio, losses.LOG_VALUE_CAP))),
              **_count_metrics(part)}
      return loss, grads, sums

    loss, grads, sums = _accumulate(micro, batch, options.microbatches, rows, state["params"])
    params, opt_state, grad_norm, params_finite, skipped = _apply_update(
        state, grads, loss, optimizer, options.skip_nonfinite)
    new_step = state["step"] + 1
    target = update_target(state["target_params"], params, new_step, update)
    if options.skip_nonfinite:
      target = jax.tree.map(lambda n, o: jnp.where(skipped, o, n), target, state["target_params"])
    new_state = {"step": new_step, "params": params, "opt_state": opt_state,
                 "target_params": target, "behaviour_params": state["behaviour_params"], **_base_of(state)}
    count = jnp.maximum(sums["action_tokens"], 1.0)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "mean_target": sums["sum_target"] / count,
               "clipped_above": sums["clipped_above"] / count,
               "clipped_below": sums["clipped_below"] / count,
               "mean_p_theta": sums["sum_p_theta"] / count,
               "mean_pi_phi": sums["sum_pi_phi"] / count,
               "mean_ratio": sums["sum_ratio"] / count,
               "action_tokens": sums["action_tokens"], "tokens": sums["tokens"],
               "params_finite": params_finite.astype(jnp.float32),
               "skipped": skipped.astype(jnp.float32)}
    return new_state, metrics

  return _jit_step(step, model, model_config, optimizer, mesh, rules, "qsft")


# ----------------------------------------------------------------------------------------------
# Value-head baselines: Monte Carlo returns and ILQL (docs/algorithm.md section 9)

HEADS_METHODS = ("mc", "ilql")
TRUNKS = ("phi", "train")


@dataclasses.dataclass(frozen=True)
class HeadsSettings:
  """What a value-head phase trains (config sections mc.* and ilql.*).

  method: "mc" (one Q head and V regressed on the return-to-go) or "ilql" (two Q heads with Polyak
    target copies, V by expectile regression, the CQL term).
  trunk: "phi" (the heads read the frozen phi's hidden states; only they train) or "train" (the
    trunk starts from phi and trains with the heads).
  expectile, cql_alpha, tau: ILQL's expectile of the V loss, weight of the CQL term and Polyak rate of
    the target Q heads (unused by MC).
  """
  method: str = "mc"
  trunk: str = "phi"
  expectile: float = 0.7
  cql_alpha: float = 0.01
  tau: float = 0.005

  def __post_init__(self):
    if self.method not in HEADS_METHODS:
      raise ValueError(f"method {self.method!r}: expected one of {HEADS_METHODS}")
    if self.trunk not in TRUNKS:
      raise ValueError(f"{self.method}.trunk: {self.trunk!r} is not one of {TRUNKS}")
    if not 0.0 < self.expectile < 1.0:
      raise ValueError(f"{self.method}.expectile: must be in (0, 1); got {self.expectile}")
    if not self.cql_alpha >= 0.0:
      raise ValueError(f"{self.method}.cql_alpha: must be >= 0; got {self.cql_alpha}")
    if not 0.0 <= self.tau <= 1.0:
      raise ValueError(f"{self.method}.tau: must be in [0, 1]; got {self.tau}")

  @property
  def num_q(self) -> int:
    return 2 if self.method == "ilql" else 1

  @classmethod
  def from_config(cls, config: Any, phase: str) -> "HeadsSettings":
    """The settings of phase "mc" or "ilql" from its config section."""
    s = config[phase]
    if phase == "mc":
      return cls(method="mc", trunk=s.trunk)
    return cls(method="ilql", trunk=s.trunk, expectile=s.expectile, cql_alpha=s.cql_alpha, tau=s.tau)


def init_heads_state(phi: Any, heads: Any, optimizer: optax.GradientTransformation,
                     settings: HeadsSettings) -> dict:
  """A value-head phase's state from phi's variables and new heads ({"params": tree} of
  `models.heads.ValueHeads`): {"step", "params": {"heads"[, "trunk"]}, "opt_state"} plus
  "target_params" (ILQL: a copy of the Q heads) and, with trunk "phi", "trunk" (phi, frozen). The
  trunk is copied, so that no buffer appears twice in the donated state."""
  trunk = jax.tree.map(jnp.copy, phi)
  params = {"heads": heads, **({"trunk": trunk} if settings.trunk == "train" else {})}
  state = init_bc_state(params, optimizer)
  if settings.method == "ilql":
    state["target_params"] = jax.tree.map(jnp.copy, heads_lib.q_part(heads))
  if settings.trunk == "phi":
    state["trunk"] = trunk
  return state


def heads_state_shardings(model: nn.Module, model_config: ModelConfig, optimizer: optax.GradientTransformation,
                          mesh: Mesh, rules, settings: HeadsSettings) -> dict:
  """NamedShardings of `init_heads_state`'s state from the rule table (optimizer leaves as their
  parameter, the rest replicated)."""
  heads = heads_lib.param_shardings(model_config, settings.num_q, mesh, rules)
  trunk = sharded.param_shardings(model, model_config, mesh, rules)
  params = {"heads": heads, **({"trunk": trunk} if settings.trunk == "train" else {})}
  shapes = {"heads": heads_lib.param_shapes(model_config, settings.num_q)}
  if settings.trunk == "train":
    shapes["trunk"] = sharded.param_shapes(model, model_config)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, shapes), params,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  out = {"step": replicated, "params": params, "opt_state": opt}
  if settings.method == "ilql":
    out["target_params"] = heads_lib.q_part(heads)
  if settings.trunk == "phi":
    out["trunk"] = trunk
  return out


def make_heads_step(model: nn.Module, model_config: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules, settings: HeadsSettings,
                    options: StepOptions = StepOptions()) -> StepFn:
  """Jitted MC or ILQL step: (state, batch) -> (state, metrics), state as `init_heads_state`.

  The trunk's hidden states (phi's, frozen, or the trained trunk's) feed `losses.mc_heads_loss` or
  `losses.ilql_loss`; the optimizer updates the heads (and the trunk with trunk "train"); ILQL then
  moves the target Q heads by Polyak with settings.tau. With trunk "phi" the trunk is donated and
  returned unchanged (aliased, never copied).

  metrics (floats, replicated): loss, q_loss, v_loss (and ILQL's cql_loss, mean_target), mean_q and
  mean_v (Q(s_{i-1}, x_i), averaged over ILQL's heads, and V(s_{i-1}) over the action tokens),
  grad_norm, action_tokens, tokens, params_finite, skipped.
  """
  if not isinstance(settings, HeadsSettings):
    raise TypeError(f"settings must be a HeadsSettings; got {type(settings).__name__}")
  rows = qsharding.batch_sharding(mesh, rules)
  vocab = model_config.vocab_size
  ilql = settings.method == "ilql"

  def step(state, batch):
    normaliser = losses.action_token_count(batch["action_mask"])
    frozen_trunk = jax.lax.stop_gradient(state["trunk"]) if settings.trunk == "phi" else None
    target_q = jax.lax.stop_gradient(state["target_params"]) if ilql else None

    def micro(params, part):
      frozen_hidden = None if frozen_trunk is None else jax.lax.stop_gradient(
          _hidden(model, frozen_trunk, part))

      def loss_fn(p):
        hidden = frozen_hidden if frozen_hidden is not None else _hidden(model, p["trunk"], part)
        if ilql:
          return losses.ilql_loss(hidden, p["heads"], target_q, part, normaliser, vocab_size=vocab,
                                  expectile=settings.expectile, cql_alpha=settings.cql_alpha,
                                  chunk_size=options.chunk_size)
        return losses.mc_heads_loss(hidden, p["heads"], part, normaliser, vocab_size=vocab,
                                    chunk_size=options.chunk_size)

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, grads, {**aux, **_count_metrics(part)}

    loss, grads, sums = _accumulate(micro, batch, options.microbatches, rows, state["params"])
    params, opt_state, grad_norm, params_finite, skipped = _apply_update(
        state, grads, loss, optimizer, options.skip_nonfinite)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if ilql:
      target = polyak_update(state["target_params"], heads_lib.q_part(params["heads"]), settings.tau)
      if options.skip_nonfinite:
        target = jax.tree.map(lambda n, o: jnp.where(skipped, o, n), target, state["target_params"])
      new_state["target_params"] = target
    if settings.trunk == "phi":
      new_state["trunk"] = state["trunk"]
    count = jnp.maximum(sums["action_tokens"], 1.0)
    metrics = {"loss": loss, "q_loss": sums["q_loss"], "v_loss": sums["v_loss"],
               "mean_q": sums["sum_q"] / count, "mean_v": sums["sum_v"] / count,
               "grad_norm": grad_norm, "action_tokens": sums["action_tokens"], "tokens": sums["tokens"],
               "params_finite": params_finite.astype(jnp.float32), "skipped": skipped.astype(jnp.float32)}
    if ilql:
      metrics.update(cql_loss=sums["cql_loss"], mean_target=sums["sum_target"] / count)
    return new_state, metrics

  shardings = heads_state_shardings(model, model_config, optimizer, mesh, rules, settings)
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step, in_shardings=(shardings, rows), out_shardings=(shardings, replicated),
                   donate_argnums=0)
  return StepFn(jitted, mesh, rules)
