"""Q-SFT losses: Bellman values and targets, weighted cross-entropy (WCE), BC, chunked drivers.

All pure functions. Notation (docs/algorithm.md section 1, docs/architecture.md): the model's output row k
predicts token k + 1, so action token i is trained through row i - 1. Arrays indexed by token are
"token space" ([B, L], e.g. `action_mask`, `rewards`, the Bellman targets); arrays indexed by output
row are "row space" ([B, L], e.g. the state values V(k), and the per-row labels/weights the loss
drivers take). `to_rows` maps token space to row space.

Vocabulary: logits have V_pad >= vocab_size columns (the embedding table is rounded up); columns
>= vocab_size are padding and are excluded from every sum, max and softmax here, whatever values
they hold.

The WCE loss of one row with logits z, taken token x and target weight w is

    l = -[ w log p(x) + (1 - w) / (V - 1) * sum_{a != x, a real} log p(a) ]
      = lse(z) - w z_x - (1 - w) (sum_real(z) - z_x) / (V - 1)

(V = vocab_size, log p = z - lse), i.e. cross-entropy against the soft target t = w at x and
(1 - w) / (V - 1) on every other real token; d l / d z = softmax(z) - t. The dummy-token variant
puts all of 1 - w on one designated token d: l = lse(z) - w z_x - (1 - w) z_d. BC is the case w = 1.
Only lse(z), z_x and sum_real(z) (or z_d) are needed, so the chunked drivers never build a
[B, L, V] array, in the forward or the backward pass.

Soft-capped logits (ModelConfig.final_logit_softcap, Gemma 2): the chunked drivers take `softcap` and
form z = cap * tanh(u / cap) from the raw logits u = hidden @ unembed, as the model's forward does
(`logits_from_hidden`); every loss and value above is of z, and d l / d u = (d l / d z) (1 - (z / cap)^2)
on the real columns.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from qsft_jax.models import heads as heads_lib
from qsft_jax.models.transformer import logits_from_hidden
from qsft_jax.sharding import logical_constraint

# exp() of a larger log-ratio overflows float32 (log(float32 max) ~ 88.7). Values are only ever
# used inside clip(r + gamma * V, 0, 1), so any V above 1 + |r| gives the same target.
LOG_VALUE_CAP = 80.0

TARGET_MODES = ("token", "turn", "ones")


@dataclasses.dataclass(frozen=True)
class TargetConfig:
  """How the Bellman targets are formed (docs/algorithm.md sections 2 and 4).

  mode: "token" (bootstrap from the next action token, the paper's), "turn" (from the next action
    turn's first token) or "ones" (every action target 1: the targets-equal-1 control).
  support_min: behaviour-support threshold of the Bellman max (`bellman_log_values`), in [0, 1).
  dummy_token: the token that receives all of 1 - w in the WCE and is excluded from the Bellman max,
    or None for the even spread over the other real tokens.
  mc_mix: weight in [0, 1] of the Monte Carlo return in the target (`compute_targets`).
  n_step: bootstrap links chained before the value is read, an int >= 1 (`n_step_returns`).

  Built from a run config by `from_config`; the error messages name the config field. Frozen and
  hashable, so it can be a static argument of a jitted function.
  """
  mode: str = "token"
  support_min: float = 1e-4
  dummy_token: int | None = None
  mc_mix: float = 0.0
  n_step: int = 1

  def __post_init__(self):
    if self.mode not in TARGET_MODES:
      raise ValueError(f"qsft.targets_mode: {self.mode!r} is not one of {TARGET_MODES}")
    if not 0.0 <= self.support_min < 1.0:
      raise ValueError(f"qsft.support_min: must be in [0, 1); got {self.support_min}")
    if self.dummy_token is not None and (isinstance(self.dummy_token, bool)
                                         or not isinstance(self.dummy_token, int)
                                         or self.dummy_token < 0):
      raise ValueError(f"qsft.dummy_token: must be a token id >= 0 (-1 in the config for none); "
                       f"got {self.dummy_token!r}")
    if not 0.0 <= self.mc_mix <= 1.0:
      raise ValueError(f"qsft.mc_mix: must be in [0, 1]; got {self.mc_mix}")
    _check_n_step(self.n_step)

  @classmethod
  def from_config(cls, config: Any, phase: str = "qsft") -> "TargetConfig":
    """The target settings of `phase` from the run config's qsft.* fields ("control": mode "ones",
    everything else the same; qsft.dummy_token -1 means none). Fields missing from the config take
    the defaults above."""
    q = config.get("qsft", None)
    q = {} if q is None else q
    dummy = int(q.get("dummy_token", -1))
    return cls(mode="ones" if phase == "control" else q.get("targets_mode", "token"),
               support_min=q.get("support_min", 1e-4), dummy_token=None if dummy < 0 else dummy,
               mc_mix=q.get("mc_mix", 0.0), n_step=q.get("n_step", 1))

  def bellman(self) -> "TargetConfig":
    """These settings with the control's mode "ones" replaced by "token": the Bellman targets that
    theta_bar and phi give (what the value diagnostic reports for a control run)."""
    return dataclasses.replace(self, mode="token") if self.mode == "ones" else self


def _check_n_step(n_step: Any) -> None:
  if isinstance(n_step, bool) or not isinstance(n_step, int):
    raise ValueError(f"qsft.n_step: must be an int >= 1; got {n_step!r}")
  if n_step < 1:
    raise ValueError(f"qsft.n_step: must be >= 1; got {n_step}")


def real_vocab_mask(num_columns: int, vocab_size: int) -> jax.Array:
  """[V_pad] bool: True for the real vocabulary columns (id < vocab_size)."""
  if not 1 <= vocab_size <= num_columns:
    raise ValueError(f"vocab_size={vocab_size} must be in [1, {num_columns}] (the logits' last dim)")
  return jnp.arange(num_columns) < vocab_size


def real_log_softmax(logits: jax.Array, vocab_size: int) -> jax.Array:
  """log_softmax over the real vocabulary only. logits [..., V_pad] -> float32 [..., V_pad], with
  padded columns set to -inf."""
  z = logits.astype(jnp.float32)
  real = real_vocab_mask(z.shape[-1], vocab_size)
  z = jnp.where(real, z, -jnp.inf)
  return z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Bellman values and targets


def _bellman_terms(target_logits: jax.Array, behaviour_logits: jax.Array, vocab_size: int,
                   support_min: float, exclude_token: int | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log V, lse of the target logits, lse of the behaviour logits), each float32 [...].

  log p_bar(a) - log pi(a) = (z_bar(a) - z_phi(a)) + (lse_phi - lse_bar), and
  pi(a) >= t  <=>  z_phi(a) >= log t + lse_phi, so one masked max over z_bar - z_phi suffices: no
  [..., V] log-softmax is materialised (the values cost a few passes over the chunk's logits).
  """
  if support_min < 0:
    raise ValueError(f"support_min={support_min} must be >= 0")
  if exclude_token is not None and not 0 <= exclude_token < vocab_size:
    raise ValueError(f"exclude_token={exclude_token} must be a real token id (< vocab_size={vocab_size})")
  if exclude_token is not None and vocab_size < 2:
    raise ValueError("excluding a token from the Bellman max needs vocab_size >= 2")
  if target_logits.shape != behaviour_logits.shape:
    raise ValueError(f"target_logits {target_logits.shape} and behaviour_logits "
                     f"{behaviour_logits.shape} must have the same shape")
  real = real_vocab_mask(target_logits.shape[-1], vocab_size)
  z_bar = jnp.where(real, target_logits.astype(jnp.float32), -jnp.inf)
  z_phi = jnp.where(real, behaviour_logits.astype(jnp.float32), -jnp.inf)
  lse_bar = jax.scipy.special.logsumexp(z_bar, axis=-1)
  lse_phi = jax.scipy.special.logsumexp(z_phi, axis=-1)
  eligible = real
  if exclude_token is not None:
    # The WCE dummy token: theta puts 1 - w there by construction, so its ratio is no action's value
    # (with pi_phi(dummy) just above support_min it would set V to hundreds and clip every target).
    eligible = eligible & (jnp.arange(z_phi.shape[-1]) != exclude_token)
  log_threshold = jnp.log(jnp.float32(support_min)) if support_min > 0 else -jnp.inf
  # min(.., max over eligible z_phi): the behaviour's most likely ELIGIBLE token always passes, so
  # the support is never empty, also when the excluded token is phi's most likely one.
  top_eligible = jnp.max(jnp.where(eligible, z_phi, -jnp.inf), axis=-1)
  cut = jnp.minimum(log_threshold + lse_phi, top_eligible)
  supported = eligible & (z_phi >= cut[..., None])
  best = jnp.max(jnp.where(supported, z_bar - z_phi, -jnp.inf), axis=-1)
  return best + lse_phi - lse_bar, lse_bar, lse_phi


def bellman_log_values(target_logits: jax.Array, behaviour_logits: jax.Array, vocab_size: int,
                       support_min: float, exclude_token: int | None = None) -> jax.Array:
  """log V per row: max over supported real tokens of log p_bar(a) - log pi_phi(a).

  target_logits, behaviour_logits: [..., V_pad] (theta_bar's and phi's logits of the same rows).
  Returns float32 [...].

  Eligible tokens: the real tokens other than exclude_token (the WCE dummy token, when one is
  used: it is never in the support). Supported tokens: the eligible a with
  pi_phi(a) >= min(support_min, max over eligible a' of pi_phi(a')). Taking the min with the most
  likely eligible token's probability keeps the set non-empty when support_min exceeds every
  eligible token's probability (possible when support_min > 1 / vocab_size, or when the excluded
  dummy token is phi's most likely token): then only phi's most likely eligible token(s) count, and
  V is never the empty max. support_min = 0 admits every eligible token (the paper's V: the max of
  the ratio over the whole vocabulary).
  """
  return _bellman_terms(target_logits, behaviour_logits, vocab_size, support_min, exclude_token)[0]


def bellman_values(target_logits: jax.Array, behaviour_logits: jax.Array, vocab_size: int,
                   support_min: float, exclude_token: int | None = None) -> jax.Array:
  """V per row = max over supported real tokens a of p_bar(a) / pi_phi(a), float32 [...].

  See `bellman_log_values` for the support rule. Computed in log space; returned as a ratio, capped
  at exp(LOG_VALUE_CAP) so it stays finite (the cap never changes a clipped target).
  """
  return _ratio_from_log(bellman_log_values(target_logits, behaviour_logits, vocab_size, support_min,
                                            exclude_token))


def _ratio_from_log(log_v: jax.Array) -> jax.Array:
  return jnp.exp(jnp.minimum(log_v, LOG_VALUE_CAP))


def gather_rows(values: jax.Array, rows: jax.Array) -> jax.Array:
  """values [B, L] (row space), rows [B, L] int (-1 = none) -> values[b, rows[b, i]] or 0."""
  picked = jnp.take_along_axis(values, jnp.maximum(rows, 0), axis=1)
  return jnp.where(rows >= 0, picked, 0.0)


def bellman_targets(values: jax.Array, rewards: jax.Array, discounts: jax.Array,
                    next_action_row: jax.Array, action_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Clipped one-step Bellman targets in token space.

  w_i = clip(r_i + gamma_i * V(next_action_row_i), 0, 1) on action tokens, V(-1) := 0; 0 elsewhere.

  Args:
    values: [B, L] float, V of each output row (row space).
    rewards, discounts: [B, L] float (token space).
    next_action_row: [B, L] int, the row whose value bootstraps token i, -1 for none.
    action_mask: [B, L] bool.
  Returns:
    targets [B, L] float32 (0 off actions) and clipped [B, L] bool (action tokens whose unclipped
    target was outside [0, 1]; above 1 exactly where clipped & (targets == 1)).

  The same function serves the per-turn bootstrap (pass turn rewards, `turn_discounts` and
  `next_turn_row`; see `compute_targets`).
  """
  values = values.astype(jnp.float32)
  bootstrap = gather_rows(values, next_action_row)
  # where, not multiply: a zero discount must silence the value even when it is huge.
  discounted = jnp.where(next_action_row >= 0, discounts.astype(jnp.float32) * bootstrap, 0.0)
  raw = rewards.astype(jnp.float32) + discounted
  return _clip_targets(raw, action_mask)


def turn_rewards(rewards: jax.Array, discounts: jax.Array, next_action_row: jax.Array,
                 action_mask: jax.Array, turn_index: jax.Array) -> jax.Array:
  """Discounted reward from action token i to the end of its action turn, [B, L] float32.

  R_i = r_i + gamma_i * R_{i+1} while token i + 1 continues the same action turn (it is token i's
  next action, n(i) = i + 1, with the same turn_index), else r_i. This is the reward collected
  before the per-turn bootstrap point (the next turn's first action token).
  """
  rewards = rewards.astype(jnp.float32)
  length = rewards.shape[1]
  row = jnp.arange(length)[None, :]
  next_turn_index = jnp.concatenate([turn_index[:, 1:], jnp.full_like(turn_index[:, :1], -2)], 1)
  continues = action_mask & (next_action_row == row) & (next_turn_index == turn_index)
  step_discount = jnp.where(continues, discounts.astype(jnp.float32), 0.0)

  def back(carry, xs):  # reverse scan over positions, carry = R_{i+1} [B]
    r, g = xs
    out = r + g * carry
    return out, out

  _, out = jax.lax.scan(back, jnp.zeros(rewards.shape[0], jnp.float32),
                        (rewards.T, step_discount.T), reverse=True)
  return jnp.where(action_mask, out.T, 0.0)


def _chain_continues(next_row: jax.Array, action_mask: jax.Array) -> jax.Array:
  """[B, L] bool: the bootstrap row `next_row` is followed by an action token of the same episode.

  Row k's output is the state before token k + 1. The data contract (docs/architecture.md) has
  `action_mask` false at the first token of every segment, so token next_row + 1 being an action
  token means it is the next action of the SAME episode; otherwise next_row is a truncated episode's
  final row (or -1): the chain ends there.
  """
  length = action_mask.shape[1]
  nxt = next_row + 1
  picked = jnp.take_along_axis(action_mask, jnp.clip(nxt, 0, length - 1), axis=1)
  return (next_row >= 0) & (nxt < length) & picked


def n_step_returns(values: jax.Array, rewards: jax.Array, discounts: jax.Array,
                   next_row: jax.Array, action_mask: jax.Array, n_step: int) -> jax.Array:
  """Unclipped n-step bootstrapped returns in token space, float32 [B, L] (0 off actions).

  Follows the chain i_0 = i, i_{k+1} = next_row[i_k] + 1 (the next action token, or the next turn's
  first action token in turn mode) for up to n_step links:

      G^(n)_i = sum_{k<m} (prod_{j<k} d_{i_j}) r_{i_k} + (prod_{j<m} d_{i_j}) V(next_row[i_{m-1}])

  with m = n_step, or fewer where the chain ends first: at a done episode's last action (next_row
  = -1: no bootstrap term) or at a truncated episode's final row (bootstrap from it). n_step = 1 is
  the one-step target r_i + d_i V(next_row_i) of `bellman_targets`.

  Args:
    values: [B, L] row-space V; rewards, discounts: [B, L] per link (token space); next_row: [B, L]
      int (-1 = none); action_mask: [B, L] bool; n_step: int >= 1 (static: n_step gathers).
  """
  _check_n_step(n_step)
  values = values.astype(jnp.float32)
  rewards = rewards.astype(jnp.float32)
  discounts = discounts.astype(jnp.float32)
  take = lambda x, idx: jnp.take_along_axis(x, idx, axis=1)
  cur = jnp.broadcast_to(jnp.arange(rewards.shape[1], dtype=jnp.int32)[None], rewards.shape)
  active = action_mask
  acc = jnp.zeros(rewards.shape, jnp.float32)    # discounted rewards collected so far
  scale = jnp.ones(rewards.shape, jnp.float32)   # discount from i to the current link
  out = jnp.zeros(rewards.shape, jnp.float32)
  for k in range(n_step):
    row = take(next_row, cur)
    d = take(discounts, cur)
    acc = acc + scale * take(rewards, cur)
    cont = active & _chain_continues(row, action_mask) if k < n_step - 1 else jnp.zeros_like(active)
    # where, not multiply: a zero discount must silence the value even when it is huge.
    boot = jnp.where(row >= 0, d * gather_rows(values, row), 0.0)
    out = jnp.where(active & ~cont, acc + scale * boot, out)
    scale = scale * d
    cur = jnp.where(cont, row + 1, cur)
    active = cont
  return out


def monte_carlo_returns(values: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Monte Carlo returns, completed by a bootstrap where an episode was truncated, float32 [B, L].

  G_i = returns_to_go_i + D_i * V(e_i): D_i is the product of the per-token `discounts` along the
  next-action chain from i to the episode's end and e_i the row the chain ends at. A done episode's
  last action has discount 0, so D_i = 0 and G_i = returns_to_go_i (the observed return); a truncated
  episode's chain ends at its final row (the state in which the agent acts next), whose value stands
  for the unobserved rest, as in every other target. G_i is the n-step return with n = infinity.
  0 off actions. values: [B, L] row space; batch: the token-level MDP arrays.
  """
  mask = batch["action_mask"]
  next_row = batch["next_action_row"]
  discounts = batch["discounts"].astype(jnp.float32)
  cont = mask & _chain_continues(next_row, mask)

  def back(carry, xs):  # reverse scan over positions; carry = (D, end row) of the last action seen
    d_next, e_next = carry
    m, c, d, row = xs
    d_i = jnp.where(c, d * d_next, d)
    e_i = jnp.where(c, e_next, row)
    new = (jnp.where(m, d_i, d_next), jnp.where(m, e_i, e_next))
    return new, new

  b = mask.shape[0]
  init = (jnp.zeros(b, jnp.float32), jnp.full(b, -1, next_row.dtype))
  _, (tail_discount, end_row) = jax.lax.scan(back, init, (mask.T, cont.T, discounts.T, next_row.T),
                                             reverse=True)
  tail_discount, end_row = tail_discount.T, end_row.T
  boot = jnp.where(end_row >= 0, tail_discount * gather_rows(values.astype(jnp.float32), end_row), 0.0)
  return jnp.where(mask, batch["returns_to_go"].astype(jnp.float32) + boot, 0.0)


def _clip_targets(raw: jax.Array, action_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(clip(raw, 0, 1) on action tokens, 0 elsewhere; clipped = action tokens with raw outside [0, 1])."""
  targets = jnp.clip(raw, 0.0, 1.0)
  clipped = action_mask & ((raw > 1.0) | (raw < 0.0))
  return jnp.where(action_mask, targets, 0.0), clipped


def compute_targets(values: jax.Array, batch: Mapping[str, jax.Array],
                    targets: TargetConfig) -> tuple[jax.Array, jax.Array]:
  """Targets [B, L] and clipped [B, L] for a batch of token-level MDP arrays.

  targets.mode: "token" (bootstrap from the next action token, the paper's), "turn" (bootstrap from the
  first action token of the next action turn, with the reward to the end of this turn and
  `turn_discounts`), or "ones" (control: every action target is 1, i.e. BC on theta; mc_mix and
  n_step are ignored). values: [B, L] row-space V (unused for "ones").

  targets.n_step: chain the bootstrap n_step links (tokens in "token" mode, turns in "turn" mode),
  see `n_step_returns`. targets.mc_mix = lam in [0, 1]: w = clip((1 - lam) * G^(n) + lam * G^MC, 0, 1) with
  G^MC the Monte Carlo return to the episode's end (`monte_carlo_returns`: `returns_to_go`, plus a
  bootstrap where the episode was truncated). The defaults (0, 1) are the one-step target exactly.
  docs/algorithm.md section 4 gives each setting's fixed point. targets.support_min and
  targets.dummy_token are not used here (they shape the values: `chunked_bellman_values`).
  """
  mode, mc_mix, n_step = targets.mode, targets.mc_mix, targets.n_step
  mask = batch["action_mask"]
  if mode == "ones":
    return mask.astype(jnp.float32), jnp.zeros_like(mask)
  if mode == "token":
    rewards, discounts, next_row = batch["rewards"], batch["discounts"], batch["next_action_row"]
  elif mode == "turn":
    rewards = turn_rewards(batch["rewards"], batch["discounts"], batch["next_action_row"], mask,
                           batch["turn_index"])
    discounts, next_row = batch["turn_discounts"], batch["next_turn_row"]
  else:  # unreachable: TargetConfig validates its mode
    raise ValueError(f"targets mode {mode!r} unknown; expected one of {TARGET_MODES}")
  if n_step == 1 and mc_mix == 0.0:
    return bellman_targets(values, rewards, discounts, next_row, mask)
  raw = n_step_returns(values, rewards, discounts, next_row, mask, n_step)
  if mc_mix > 0.0:
    raw = (1.0 - mc_mix) * raw + mc_mix * monte_carlo_returns(values, batch)
  return _clip_targets(raw, mask)


# --------------------------------------------------------------------------------------------
# Per-token losses from logits


def _row_terms(logits: jax.Array, labels: jax.Array, vocab_size: int,
               dummy_token: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(lse, z_label, z_other) per row, float32 [...]: z_other is the mean logit of the real tokens
  other than the label (even spread) or the dummy token's logit."""
  z = logits.astype(jnp.float32)
  real = real_vocab_mask(z.shape[-1], vocab_size)
  lse = jax.scipy.special.logsumexp(jnp.where(real, z, -jnp.inf), axis=-1)
  z_label = jnp.take_along_axis(z, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if dummy_token is None:
    if vocab_size < 2:
      raise ValueError("the even-spread WCE needs vocab_size >= 2")
    z_sum = jnp.sum(jnp.where(real, z, 0.0), axis=-1)
    z_other = (z_sum - z_label) / (vocab_size - 1)
  else:
    if not 0 <= dummy_token < vocab_size:
      raise ValueError(f"dummy_token={dummy_token} must be a real token id (< vocab_size={vocab_size})")
    z_other = z[..., dummy_token]
  return lse, z_label, z_other


def wce_per_token(logits: jax.Array, labels: jax.Array, weights: jax.Array, vocab_size: int,
                  dummy_token: int | None = None) -> jax.Array:
  """Weighted cross-entropy per row (module docstring).

  logits [..., V_pad]; labels [...] int (the taken token, < vocab_size); weights [...] (targets w in
  [0, 1]). Returns float32 [...]. dummy_token: put all of 1 - w on this token instead of spreading it.
  """
  lse, z_label, z_other = _row_terms(logits, labels, vocab_size, dummy_token)
  w = weights.astype(jnp.float32)
  return lse - w * z_label - (1.0 - w) * z_other


def bc_per_token(logits: jax.Array, labels: jax.Array, vocab_size: int) -> jax.Array:
  """Cross-entropy -log p(label) over the real vocabulary, float32 [...] (WCE with w = 1)."""
  return wce_per_token(logits, labels, jnp.ones(labels.shape, jnp.float32), vocab_size)


def soft_targets(labels: jax.Array, weights: jax.Array, num_columns: int, vocab_size: int,
                 dummy_token: int | None = None) -> jax.Array:
  """The WCE's soft target distribution [..., num_columns] float32 (0 on padded columns).

  Dense: used per chunk in the fused backward pass and by tests, never for a whole batch.
  """
  w = weights.astype(jnp.float32)[..., None]
  onehot = jax.nn.one_hot(labels, num_columns, dtype=jnp.float32)
  if dummy_token is None:
    real = real_vocab_mask(num_columns, vocab_size).astype(jnp.float32)
    rest = (real - onehot) / (vocab_size - 1)
  else:
    rest = jax.nn.one_hot(dummy_token, num_columns, dtype=jnp.float32)
  return w * onehot + (1.0 - w) * rest


# --------------------------------------------------------------------------------------------
# Chunked drivers: from hidden states [B, L, D] and the unembedding [D, V_pad]


def to_rows(token_array: jax.Array, fill: Any = 0) -> jax.Array:
  """Token space -> row space: out[:, k] = x[:, k + 1], the last row gets `fill`. [B, L] -> [B, L]."""
  pad = jnp.full_like(token_array[:, :1], fill)
  return jnp.concatenate([token_array[:, 1:], pad], axis=1)


def action_token_count(action_mask: jax.Array) -> jax.Array:
  """Loss normaliser: number of action tokens (>= 1), float32 []. Call it on the GLOBAL batch."""
  return jnp.maximum(jnp.sum(action_mask.astype(jnp.float32)), 1.0)


def _chunk(x: jax.Array, chunk_size: int) -> jax.Array:
  """[B, L, ...] -> [N, B, C, ...] with L zero-padded up to N * C."""
  b, length = x.shape[:2]
  n = -(-length // chunk_size)
  x = jnp.pad(x, [(0, 0), (0, n * chunk_size - length)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((b, n, chunk_size) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunk(x: jax.Array, length: int) -> jax.Array:
  """[N, B, C, ...] -> [B, L, ...] (drops the padding)."""
  x = jnp.moveaxis(x, 0, 1)
  x = x.reshape((x.shape[0], -1) + x.shape[3:])
  return x[:, :length]


def _check_softcap(softcap: float | None) -> float | None:
  """softcap as a Python float (a static argument), or None; it must be > 0."""
  if softcap is None:
    return None
  if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
    raise ValueError(f"softcap={softcap!r} must be a number > 0 or None")
  return float(softcap)


def _check_chunk_size(chunk_size: int, length: int) -> int:
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1")
  return min(chunk_size, length)


def _unembed_for_chunks(unembed: jax.Array, dtype: Any) -> jax.Array:
  """unembed [D, V_pad] in the chunk matmuls' dtype (the hidden states'), laid out as they need it: D
  whole on every device, V_pad split as the rule table's "vocab". Called before a scan over chunks,
  so that XLA gathers it once there instead of in every trip (a no-op outside a mesh and rules)."""
  return logical_constraint(unembed.astype(dtype), (None, "vocab"))


def _wce_chunk_forward(h, unembed, labels, weights, mask, vocab_size, dummy_token, softcap):
  """One chunk: logits [B, C, V_pad] f32 (soft-capped when softcap is set), masked per-row losses [B, C],
  label log-probs [B, C]."""
  logits = logits_from_hidden(h, unembed, vocab_size, softcap=softcap)
  lse, z_label, z_other = _row_terms(logits, labels, vocab_size, dummy_token)
  w = weights.astype(jnp.float32)
  rows = (lse - w * z_label - (1.0 - w) * z_other) * mask
  return logits, lse, rows, z_label - lse


def _wce_primal(hidden, unembed, labels, weights, mask, normaliser, vocab_size, chunk_size, dummy_token,
                softcap):
  """Forward only: (loss [], label log-probs [B, L])."""
  length = hidden.shape[1]
  xs = tuple(_chunk(a, chunk_size) for a in (hidden, labels, weights, mask))
  unembed = _unembed_for_chunks(unembed, hidden.dtype)

  def body(total, x):
    h, lab, w, m = x
    _, _, rows, logp = _wce_chunk_forward(h, unembed, lab, w, m, vocab_size, dummy_token, softcap)
    return total + jnp.sum(rows), logp

  total, logp = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total / normaliser, _unchunk(logp, length)


def _wce_fwd(hidden, unembed, labels, weights, mask, normaliser, vocab_size, chunk_size, dummy_token,
             softcap):
  """Forward with the gradient computed alongside, chunk by chunk (fused cross-entropy).

  d loss / d z = (softmax(z) - t) * mask / normaliser per row, times the soft-cap's derivative
  1 - (z / cap)^2 on the real columns when softcap is set; from it the chunk's contribution to
  d hidden ([B, C, D]) and d unembed ([D, V_pad], accumulated) are formed at once, so no logits are
  kept or recomputed: the loss costs 3 unembedding matmuls in all, as a plain training pass would.

  Under a mesh, unembed is gathered once before the loop (`_unembed_for_chunks`), in the compute
  dtype; d hidden takes that copy too, as autodiff of the logits matmul would (TPU matmuls at default
  precision round float32 operands to bf16 anyway). d unembed is reduced over the rows' devices in
  every trip (into its parameter layout): reducing after the loop instead would keep an unreduced
  float32 [D, V_pad] per device through the loop.
  """
  length = hidden.shape[1]
  xs = tuple(_chunk(a, chunk_size) for a in (hidden, labels, weights, mask))
  columns = unembed.shape[-1]
  chunk_unembed = _unembed_for_chunks(unembed, hidden.dtype)

  def body(carry, x):
    total, d_unembed = carry
    h, lab, w, m = x
    logits, lse, rows, logp = _wce_chunk_forward(h, chunk_unembed, lab, w, m, vocab_size, dummy_token,
                                                 softcap)
    probs = jnp.exp(logits - lse[..., None])  # padded columns: exp(PAD_LOGIT - lse) = 0
    scale = m.astype(jnp.float32) / normaliser
    d_logits = (probs - soft_targets(lab, w, columns, vocab_size, dummy_token)) * scale[..., None]
    if softcap is not None:
      # d z / d u of z = cap * tanh(u / cap). Padded columns hold PAD_LOGIT, whose square overflows
      # float32: they get 0 (their d_logits is 0, and the masked logits carry no gradient there).
      d_cap = jnp.where(real_vocab_mask(columns, vocab_size), 1.0 - jnp.square(logits / softcap), 0.0)
      d_logits = d_logits * d_cap
    d_h = jnp.einsum("bcv,dv->bcd", d_logits, chunk_unembed.astype(jnp.float32)).astype(hidden.dtype)
    d_unembed = d_unembed + jnp.einsum("bcd,bcv->dv", h.astype(jnp.float32), d_logits)
    return (total + jnp.sum(rows), d_unembed), (logp, d_h)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(unembed.shape, jnp.float32))
  (total, d_unembed), (logp, d_hidden) = jax.lax.scan(body, init, xs)
  loss = total / normaliser
  out = (loss, _unchunk(logp, length))
  unembed_dtype = jnp.zeros((), unembed.dtype)  # a dtype carrier: residuals must be arrays
  return out, (_unchunk(d_hidden, length), d_unembed, unembed_dtype, loss, normaliser)


def _wce_bwd(vocab_size, chunk_size, dummy_token, softcap, residuals, cotangents):
  d_hidden, d_unembed, unembed_dtype, loss, normaliser = residuals
  g_loss, _ = cotangents  # the log-prob output is stop-gradient in the public wrapper
  g_loss = g_loss.astype(jnp.float32)
  d_hidden = (g_loss * d_hidden.astype(jnp.float32)).astype(d_hidden.dtype)
  d_unembed = (g_loss * d_unembed).astype(unembed_dtype.dtype)
  # Labels, weights and mask get no gradient (weights are targets: stop-gradient by definition);
  # d loss / d normaliser = -loss / normaliser (normally a constant, but keep it exact).
  return d_hidden, d_unembed, None, None, None, -g_loss * loss / normaliser


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _wce_fused(hidden, unembed, labels, weights, mask, normaliser, vocab_size, chunk_size, dummy_token,
               softcap):
  return _wce_primal(hidden, unembed, labels, weights, mask, normaliser, vocab_size, chunk_size,
                     dummy_token, softcap)


def _wce_fused_fwd(hidden, unembed, labels, weights, mask, normaliser, vocab_size, chunk_size,
                   dummy_token, softcap):
  out, res = _wce_fwd(hidden, unembed, labels, weights, mask, normaliser, vocab_size, chunk_size,
                      dummy_token, softcap)
  return out, res


_wce_fused.defvjp(_wce_fused_fwd, _wce_bwd)


def chunked_wce_loss(hidden: jax.Array, unembed: jax.Array, row_labels: jax.Array,
                     row_weights: jax.Array, row_mask: jax.Array, normaliser: jax.Array, *,
                     vocab_size: int, chunk_size: int = 128, dummy_token: int | None = None,
                     softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
  """WCE summed over trained rows / normaliser, computed chunk by chunk along the sequence.

  Args:
    hidden: [B, L, D] final hidden states (any float dtype).
    unembed: [D, V_pad] unembedding matrix.
    row_labels: [B, L] int, the token row k predicts (= to_rows(tokens)).
    row_weights: [B, L] float, its target w (= to_rows(targets)); treated as a constant.
    row_mask: [B, L] bool/float, rows that are trained (= to_rows(action_mask)).
    normaliser: [] float, the GLOBAL action-token count (`action_token_count`), so that sharding
      and gradient accumulation leave the loss and gradient unchanged.
    vocab_size: real vocabulary size; chunk_size: rows per chunk (L is padded up to a multiple).
    dummy_token: the dummy-token variant's token id, or None for the even spread.
    softcap: the model's final_logit_softcap (logits cap * tanh(logits / cap)), or None for none.
  Returns:
    loss [] float32, and log p(row_labels) [B, L] float32 (stop-gradient; for metrics).

  Differentiable in hidden and unembed through a custom VJP that forms the gradient in the forward
  scan (see `_wce_fwd`): neither pass holds more than one [B, C, V_pad] chunk of logits.
  """
  if hidden.ndim != 3 or unembed.ndim != 2 or hidden.shape[-1] != unembed.shape[0]:
    raise ValueError(f"hidden {hidden.shape} must be [B, L, D] and unembed {unembed.shape} [D, V_pad]")
  for name, a in (("row_labels", row_labels), ("row_weights", row_weights), ("row_mask", row_mask)):
    if a.shape != hidden.shape[:2]:
      raise ValueError(f"{name} has shape {a.shape}, expected [B, L] = {hidden.shape[:2]}")
  chunk_size = _check_chunk_size(chunk_size, hidden.shape[1])
  loss, logp = _wce_fused(hidden, unembed, row_labels.astype(jnp.int32),
                          jax.lax.stop_gradient(row_weights.astype(jnp.float32)),
                          row_mask.astype(jnp.float32),
                          jnp.asarray(normaliser, jnp.float32), vocab_size, chunk_size, dummy_token,
                          _check_softcap(softcap))
  return loss, jax.lax.stop_gradient(logp)


def chunked_bc_loss(hidden: jax.Array, unembed: jax.Array, row_labels: jax.Array,
                    row_mask: jax.Array, normaliser: jax.Array, *, vocab_size: int,
                    chunk_size: int = 128, softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy on trained rows / normaliser: `chunked_wce_loss` with all weights 1.

  Shapes and softcap as `chunked_wce_loss`; returns (loss [], log p(row_labels) [B, L])."""
  ones = jnp.ones(row_labels.shape, jnp.float32)
  return chunked_wce_loss(hidden, unembed, row_labels, ones, row_mask, normaliser,
                          vocab_size=vocab_size, chunk_size=chunk_size, softcap=softcap)


def chunked_bellman_values(target_hidden: jax.Array, target_unembed: jax.Array,
                           behaviour_hidden: jax.Array, behaviour_unembed: jax.Array,
                           row_labels: jax.Array, *, vocab_size: int, support_min: float,
                           chunk_size: int = 128, exclude_token: int | None = None,
                           softcap: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row Bellman values from theta_bar's and phi's hidden states, chunk by chunk (no gradient).

  Args:
    target_hidden, behaviour_hidden: [B, L, D]; target_unembed, behaviour_unembed: [D, V_pad].
    row_labels: [B, L] int, the token each row predicts (for the metrics below).
    softcap: the model's final_logit_softcap, applied to both models' logits, or None for none.
  Returns (all float32 [B, L], stop-gradient):
    values V(k) (see `bellman_values`), log pi_phi(row_labels), log p_theta_bar(row_labels).
  """
  length = target_hidden.shape[1]
  chunk_size = _check_chunk_size(chunk_size, length)
  softcap = _check_softcap(softcap)
  xs = tuple(_chunk(jax.lax.stop_gradient(a), chunk_size)
             for a in (target_hidden, behaviour_hidden, row_labels))
  target_unembed = _unembed_for_chunks(jax.lax.stop_gradient(target_unembed), target_hidden.dtype)
  behaviour_unembed = _unembed_for_chunks(jax.lax.stop_gradient(behaviour_unembed), behaviour_hidden.dtype)

  def body(_, x):
    h_bar, h_phi, lab = x
    z_bar = logits_from_hidden(h_bar, target_unembed, vocab_size, softcap=softcap)
    z_phi = logits_from_hidden(h_phi, behaviour_unembed, vocab_size, softcap=softcap)
    log_v, lse_bar, lse_phi = _bellman_terms(z_bar, z_phi, vocab_size, support_min, exclude_token)
    values = _ratio_from_log(log_v)
    lab = lab[..., None].astype(jnp.int32)
    logp_phi = jnp.take_along_axis(z_phi, lab, -1)[..., 0] - lse_phi
    logp_bar = jnp.take_along_axis(z_bar, lab, -1)[..., 0] - lse_bar
    return None, (values, logp_phi, logp_bar)

  _, out = jax.lax.scan(body, None, xs)
  return tuple(_unchunk(o, length) for o in out)


# --------------------------------------------------------------------------------------------
# The whole Q-SFT loss of one (micro)batch


def qsft_loss(theta_hidden: jax.Array, theta_unembed: jax.Array, target_hidden: jax.Array,
              target_unembed: jax.Array, behaviour_hidden: jax.Array, behaviour_unembed: jax.Array,
              batch: Mapping[str, jax.Array], normaliser: jax.Array, *, vocab_size: int,
              targets: TargetConfig, chunk_size: int = 128,
              softcap: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Q-SFT loss: values from theta_bar and phi -> Bellman targets -> WCE on theta.

  Args:
    theta_hidden, target_hidden, behaviour_hidden: [B, L, D] hidden states of theta, theta_bar, phi
      (only theta's carry a gradient); *_unembed: [D, V_pad].
    batch: the [B, L] token-level MDP arrays (docs/architecture.md).
    normaliser: [] GLOBAL action-token count.
    vocab_size: real vocabulary size; chunk_size: rows per chunk of the chunked drivers.
    targets: the Bellman-target settings (support_min and dummy_token shape the values and the
      WCE; mode, mc_mix and n_step how values propagate: `compute_targets`).
    softcap: the model's final_logit_softcap (all three models' logits), or None for none.
  Returns:
    loss [] and aux: "targets", "clipped" (token space [B, L]); "values", "logp_theta",
    "logp_behaviour" (row space [B, L]: V(k) and the log-probs of the token row k predicts).
  """
  tokens = batch["tokens"]
  row_labels = to_rows(tokens)
  # Also for mode "ones": the control then logs the same diagnostics at the same cost.
  values, logp_behaviour, _ = chunked_bellman_values(
      target_hidden, target_unembed, behaviour_hidden, behaviour_unembed, row_labels,
      vocab_size=vocab_size, support_min=targets.support_min, chunk_size=chunk_size,
      exclude_token=targets.dummy_token, softcap=softcap)
  weights, clipped = compute_targets(values, batch, targets)
  loss, logp_theta = chunked_wce_loss(
      theta_hidden, theta_unembed, row_labels, to_rows(weights), to_rows(batch["action_mask"], False),
      normaliser, vocab_size=vocab_size, chunk_size=chunk_size, dummy_token=targets.dummy_token,
      softcap=softcap)
  aux = {"targets": weights, "clipped": clipped, "values": values, "logp_theta": logp_theta,
         "logp_behaviour": logp_behaviour}
  return loss, aux


# --------------------------------------------------------------------------------------------
# Value heads: Monte Carlo returns and ILQL (docs/algorithm.md section 9)
#
# The heads (qsft_jax.models.heads) read the final hidden state h of row i - 1 for action token i,
# as the WCE reads its logits. Every loss is summed over the action tokens of the (micro)batch and
# divided by the GLOBAL action-token count, as the WCE.


def _heads_rows(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(row labels [B, L] int32, row mask [B, L] float32): the token row k predicts, and whether it is
  an action token."""
  return to_rows(batch["tokens"]).astype(jnp.int32), to_rows(batch["action_mask"], False).astype(jnp.float32)


def mc_heads_loss(hidden: jax.Array, heads: Mapping[str, Any], batch: Mapping[str, jax.Array],
                  normaliser: jax.Array, *, vocab_size: int,
                  chunk_size: int = 128) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Monte Carlo regression of one Q head and the V head on the return-to-go G_i:

      l_i = (Q(s_{i-1}, x_i) - G_i)^2 + (V(s_{i-1}) - G_i)^2

  Args:
    hidden: [B, L, D] final hidden states (carrying a gradient only when the trunk trains).
    heads: the ValueHeads variables (one Q head).
    batch: the [B, L] token-level MDP arrays (`returns_to_go`, `tokens`, `action_mask`).
    normaliser: [] GLOBAL action-token count; vocab_size: real vocabulary size; chunk_size: rows per
      chunk of `chunked_q_terms`.
  Returns:
    loss [] and aux (sums over action tokens / normaliser: "q_loss", "v_loss"; masked sums "sum_q",
    "sum_v" of Q(s_{i-1}, x_i) and V(s_{i-1})).
  """
  labels, mask = _heads_rows(batch)
  returns = to_rows(batch["returns_to_go"]).astype(jnp.float32)
  q = chunked_q_terms(hidden, heads, labels, vocab_size=vocab_size, chunk_size=chunk_size)[0][0]
  v = heads_lib.state_values(heads, hidden)
  q_loss = jnp.sum(mask * jnp.square(q - returns)) / normaliser
  v_loss = jnp.sum(mask * jnp.square(v - returns)) / normaliser
  aux = {"q_loss": q_loss, "v_loss": v_loss, "sum_q": jnp.sum(mask * q), "sum_v": jnp.sum(mask * v)}
  return q_loss + v_loss, jax.tree.map(jax.lax.stop_gradient, aux)


@jax.custom_vjp
def _grad_in_kernel_layout(kernel: jax.Array) -> jax.Array:
  """Identity on a gathered Q kernel [J, D, V] whose cotangent is laid out as the parameter (the rule
  table's "embed", "vocab"): inside the chunk loop each trip's kernel gradient is then reduced into
  the sharded layout, instead of accumulating a whole float32 [J, D, V] per device across the loop."""
  return kernel


def _grad_in_kernel_layout_fwd(kernel):
  return kernel, None


def _grad_in_kernel_layout_bwd(_, g):
  return (logical_constraint(g, (None, "embed", "vocab")),)


_grad_in_kernel_layout.defvjp(_grad_in_kernel_layout_fwd, _grad_in_kernel_layout_bwd)


def chunked_q_terms(hidden: jax.Array, heads: Mapping[str, Any], row_labels: jax.Array, *, vocab_size: int,
                    chunk_size: int = 128, target_q: Mapping[str, Any] | None = None,
                    logsumexp: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Q values of the labelled tokens, chunk by chunk along the sequence.

  Args:
    hidden: [B, L, D] final hidden states; heads: ValueHeads variables (J Q heads);
    row_labels: [B, L] int, the token each row's Q is read at.
    target_q: target Q heads {"params": {q_kernel, q_bias}} read at the same tokens (no gradient), or None.
    logsumexp: also return logsumexp over the real vocabulary of every head's row.
  Returns (float32):
    Q_j(s_k, label_k) [J, B, L]; the target heads' [J, B, L] or None; the logsumexps [J, B, L] or None.

  The body is rematerialised: neither pass holds more than one [J, B, C, V] chunk of Q values (the
  backward pass recomputes each chunk's from its hidden states). The kernels are gathered once before
  the loop in the hidden states' dtype (as `_unembed_for_chunks`); the online kernel's gradient is
  reduced into its parameter layout in every trip (`_grad_in_kernel_layout`).
  """
  length = hidden.shape[1]
  chunk_size = _check_chunk_size(chunk_size, length)
  gathered = lambda t: {
      "q_kernel": logical_constraint(t["q_kernel"].astype(hidden.dtype), (None, None, "vocab")),
      "q_bias": t["q_bias"]}
  online = gathered(heads_lib.inner(heads))
  target = None if target_q is None else gathered(jax.lax.stop_gradient(heads_lib.inner(target_q)))

  @jax.checkpoint
  def body(_, x):
    h, lab = x
    kernels = {"q_kernel": _grad_in_kernel_layout(online["q_kernel"]), "q_bias": online["q_bias"]}
    q = heads_lib.q_values(kernels, h, vocab_size)  # [J, B, C, V]; padded columns PAD_LOGIT
    take = lambda z: jnp.take_along_axis(z, lab[None, ..., None].astype(jnp.int32), axis=-1)[..., 0]
    out = {"q": take(q)}
    if logsumexp:
      out["lse"] = jax.scipy.special.logsumexp(q, axis=-1)
    if target is not None:
      out["q_bar"] = take(heads_lib.q_values(target, jax.lax.stop_gradient(h), vocab_size))
    return None, out

  _, out = jax.lax.scan(body, None, (_chunk(hidden, chunk_size), _chunk(row_labels, chunk_size)))
  # [N, J, B, C] -> [J, B, L]
  out = {k: jnp.moveaxis(_unchunk(jnp.moveaxis(v, 1, -1), length), -1, 0) for k, v in out.items()}
  return out["q"], out.get("q_bar"), out.get("lse")


def ilql_loss(hidden: jax.Array, heads: Mapping[str, Any], target_q: Mapping[str, Any],
              batch: Mapping[str, jax.Array], normaliser: jax.Array, *, vocab_size: int, expectile: float,
              cql_alpha: float, chunk_size: int = 128) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ILQL on action token i (row i - 1 the state, n(i) - 1 the next state's row):

      L_Q   = sum_j (Q_j(s_{i-1}, x_i) - [r_i + gamma_i V(s_{n(i)-1})])^2   V stop-gradient, 0 when done
      L_V   = |expectile - 1{u < 0}| u^2,   u = min_j Qbar_j(s_{i-1}, x_i) - V(s_{i-1})
      L_CQL = cql_alpha sum_j [logsumexp_{a real} Q_j(s_{i-1}, a) - Q_j(s_{i-1}, x_i)]

  Args:
    hidden: [B, L, D] final hidden states; heads: the ValueHeads variables (J Q heads and V);
    target_q: the target Q heads {"params": {q_kernel, q_bias}} (Qbar_j; no gradient).
    batch: the [B, L] token-level MDP arrays (`rewards`, `discounts`, `next_action_row`, ...).
    normaliser: [] GLOBAL action-token count; vocab_size: real vocabulary size.
    expectile: tau of the V loss, in (0, 1); cql_alpha: weight of L_CQL, >= 0 (0: no logsumexp);
    chunk_size: rows per chunk of `chunked_q_terms`.
  Returns:
    loss [] and aux: "q_loss", "v_loss", "cql_loss" (each summed over action tokens / normaliser),
    "sum_q" (of the mean over heads of Q_j(s_{i-1}, x_i)), "sum_v", "sum_target" (masked sums).
  """
  labels, mask = _heads_rows(batch)
  v = heads_lib.state_values(heads, hidden)  # [B, L] row space
  bootstrap = gather_rows(jax.lax.stop_gradient(v), batch["next_action_row"])
  targets = batch["rewards"].astype(jnp.float32) + jnp.where(
      batch["next_action_row"] >= 0, batch["discounts"].astype(jnp.float32) * bootstrap, 0.0)
  targets = to_rows(targets)  # token i's target on row i - 1
  q, q_bar, lse = chunked_q_terms(hidden, heads, labels, vocab_size=vocab_size, chunk_size=chunk_size,
                                  target_q=target_q, logsumexp=cql_alpha > 0)  # each [J, B, L]
  q_loss = jnp.sum(mask * jnp.sum(jnp.square(q - targets), axis=0)) / normaliser
  u = jnp.min(q_bar, axis=0) - v
  weight = jnp.abs(expectile - (u < 0).astype(jnp.float32))
  v_loss = jnp.sum(mask * weight * jnp.square(u)) / normaliser
  cql_loss = jnp.zeros((), jnp.float32)
  if cql_alpha > 0:
    cql_loss = cql_alpha * jnp.sum(mask * jnp.sum(lse - q, axis=0)) / normaliser
  aux = {"q_loss": q_loss, "v_loss": v_loss, "cql_loss": cql_loss,
         "sum_q": jnp.sum(mask * jnp.mean(q, axis=0)), "sum_v": jnp.sum(mask * v),
         "sum_target": jnp.sum(mask * targets)}
  return q_loss + v_loss + cql_loss, jax.tree.map(jax.lax.stop_gradient, aux)
