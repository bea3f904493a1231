"""Value-head baselines (MC returns, ILQL) against independent references (docs/algorithm.md section 9).

1. The losses against plain numpy on random packed batches (values), and their gradients against a
   direct jnp formula that forms the whole [J, B, L, V] Q array (the chunked, gathered and
   rematerialised code must agree with it).
2. On exact tabular token MDPs (tests/mdp_utils.py): the hidden state is a one-hot of the MDP state
   (the prefix), so each head is a table; training with the losses reaches
   - MC: Q^beta and V^beta of the behaviour policy (dynamic programming on the MDP);
   - ILQL with cql_alpha = 0: the fixed point of V(s) = tau-expectile over a ~ beta of Q(s, a),
     Q(s, a) = E[r + gamma V(s')], iterated exactly in numpy over the dataset (with truncated episodes);
   - ILQL with cql_alpha > 0: Q of actions outside the data moves down.
3. The train step: the frozen trunk comes back unchanged, the target heads move by Polyak, the loss is
   the loss function's.
4. The sampler's mode "heads": its scores at every generated step equal log_softmax(z_phi) +
   beta (min_j Q_j - V) from an uncached forward pass over the whole sequence.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsft_jax import losses
from qsft_jax import sharding
from qsft_jax import train_steps
from qsft_jax.models import Transformer, get_preset
from qsft_jax.models import heads as heads_lib
from qsft_jax.sampler import Sampler
import mdp_utils  # tests/mdp_utils.py

PAD, BOS, A, B, C, X, Y = range(7)
ACTIONS, OBS = (A, B, C), (X, Y)
VOCAB, V_PAD = 8, 16


def random_heads(rng, num_q, d, v_pad, scale=0.5):
  return {"params": {"q_kernel": rng.normal(0, scale, (num_q, d, v_pad)).astype(np.float32),
                     "q_bias": rng.normal(0, scale, (num_q, v_pad)).astype(np.float32),
                     "v_kernel": rng.normal(0, scale, (d,)).astype(np.float32),
                     "v_bias": np.float32(rng.normal())}}


# ------------------------------------------------------------------------------------------------
# 1. Losses on random arrays


def np_q(heads, h, vocab):
  """float64 [J, B, L, V_real] Q values and [B, L] V values, straight from the definition."""
  p = heads["params"]
  q = np.einsum("bld,jdv->jblv", h.astype(np.float64), p["q_kernel"]) + p["q_bias"][:, None, None, :]
  v = h.astype(np.float64) @ p["v_kernel"] + p["v_bias"]
  return q[..., :vocab], v


def np_losses(h, heads, target, batch, vocab, expectile, alpha):
  """(mc loss, ilql loss) in float64, token by token."""
  q, v = np_q(heads, h, vocab)
  q_bar, _ = np_q({"params": {**heads["params"], **target["params"]}}, h, vocab)
  n = max(batch["action_mask"].sum(), 1)
  mc = ilql = 0.0
  for b, i in zip(*np.nonzero(batch["action_mask"])):
    x, row = batch["tokens"][b, i], i - 1
    g = batch["returns_to_go"][b, i]
    mc += (q[0, b, row, x] - g) ** 2 + (v[b, row] - g) ** 2
    nxt = batch["next_action_row"][b, i]
    y = batch["rewards"][b, i] + (batch["discounts"][b, i] * v[b, nxt] if nxt >= 0 else 0.0)
    ilql += sum((q[j, b, row, x] - y) ** 2 for j in range(q.shape[0]))
    u = q_bar[:, b, row, x].min() - v[b, row]
    ilql += abs(expectile - float(u < 0)) * u ** 2
    for j in range(q.shape[0]):
      z = q[j, b, row]
      lse = z.max() + np.log(np.exp(z - z.max()).sum())
      ilql += alpha * (lse - q[j, b, row, x])
  return mc / n, ilql / n


def jnp_ilql_reference(h, heads, target_q, batch, vocab, expectile, alpha):
  """ILQL from the whole [J, B, L, V] Q array (no chunks, no gathers of kernel columns)."""
  p, t = heads["params"], target_q["params"]
  real = jnp.arange(p["q_kernel"].shape[-1]) < vocab
  q_all = jnp.einsum("bld,jdv->jblv", h, p["q_kernel"]) + p["q_bias"][:, None, None]
  q_bar_all = jnp.einsum("bld,jdv->jblv", h, t["q_kernel"]) + t["q_bias"][:, None, None]
  v = h @ p["v_kernel"] + p["v_bias"]
  labels = losses.to_rows(batch["tokens"])
  mask = losses.to_rows(batch["action_mask"], False).astype(jnp.float32)
  take = lambda a: jnp.take_along_axis(a, labels[None, ..., None], -1)[..., 0]
  q, q_bar = take(q_all), jax.lax.stop_gradient(take(q_bar_all))
  nxt = batch["next_action_row"]
  boot = jnp.where(nxt >= 0, jnp.take_along_axis(jax.lax.stop_gradient(v), jnp.maximum(nxt, 0), 1), 0.0)
  y = losses.to_rows(batch["rewards"] + batch["discounts"] * boot)
  u = q_bar.min(0) - v
  lse = jax.scipy.special.logsumexp(jnp.where(real, q_all, -jnp.inf), axis=-1)
  per_row = (((q - y) ** 2).sum(0) + jnp.abs(expectile - (u < 0)) * u ** 2 + alpha * (lse - q).sum(0))
  return jnp.sum(mask * per_row) / jnp.maximum(mask.sum(), 1.0)


@pytest.fixture(scope="module")
def random_case():
  rng = np.random.default_rng(0)
  batch = mdp_utils.random_batch(rng, num_rows=3, length=29, vocab_size=VOCAB)
  h = rng.normal(0, 1, (3, 29, 6)).astype(np.float32)
  heads = random_heads(rng, 2, 6, V_PAD)
  target = heads_lib.q_part(random_heads(rng, 2, 6, V_PAD))
  return batch, h, heads, target


def test_losses_match_numpy_on_random_batches(random_case):
  batch, h, heads, target = random_case
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  n = losses.action_token_count(jb["action_mask"])
  one_head = {"params": {k: v[:1] if k.startswith("q") else v for k, v in heads["params"].items()}}
  want_mc, _ = np_losses(h, one_head, heads_lib.q_part(one_head), batch, VOCAB, 0.7, 0.3)
  mc, _ = losses.mc_heads_loss(jnp.asarray(h), one_head, jb, n, vocab_size=VOCAB, chunk_size=7)
  np.testing.assert_allclose(float(mc), want_mc, rtol=1e-5)
  _, want_ilql = np_losses(h, heads, target, batch, VOCAB, 0.7, 0.3)
  for chunk in (4, 7, 64):  # chunks that do not divide L = 29, and one chunk
    ilql, aux = losses.ilql_loss(jnp.asarray(h), heads, target, jb, n, vocab_size=VOCAB, expectile=0.7,
                                 cql_alpha=0.3, chunk_size=chunk)
    np.testing.assert_allclose(float(ilql), want_ilql, rtol=1e-5)
    np.testing.assert_allclose(float(aux["q_loss"] + aux["v_loss"] + aux["cql_loss"]), want_ilql, rtol=1e-5)


def test_ilql_gradients_match_the_unchunked_formula(random_case):
  batch, h, heads, target = random_case
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  n = losses.action_token_count(jb["action_mask"])
  ours = lambda hh, hd: losses.ilql_loss(hh, hd, target, jb, n, vocab_size=VOCAB, expectile=0.8,
                                         cql_alpha=0.2, chunk_size=5)[0]
  ref = lambda hh, hd: jnp_ilql_reference(hh, hd, target, jb, VOCAB, 0.8, 0.2)
  g_ours = jax.grad(ours, argnums=(0, 1))(jnp.asarray(h), heads)
  g_ref = jax.grad(ref, argnums=(0, 1))(jnp.asarray(h), heads)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  # padded vocabulary columns get no gradient (they are no action)
  assert np.all(np.asarray(g_ours[1]["params"]["q_kernel"])[..., VOCAB:] == 0)


# ------------------------------------------------------------------------------------------------
# 2. Tabular fixed points


behaviour = mdp_utils.example_behaviour
obs_probs = mdp_utils.example_obs_probs


def reward(history):
  u = np.random.default_rng([7] + list(history)).uniform()
  return float(np.round((0.3 if len(history) == 2 else 0.7) * u ** 2, 3))


MDP = mdp_utils.TokenMDP([("act", 1), ("obs", 1), ("act", 2)], ACTIONS, OBS, behaviour, obs_probs, reward,
                         gamma=0.9, bos=BOS)


def build(**dataset_kwargs):
  eps = [mdp_utils.episode_arrays(turns, done, gamma=MDP.gamma) for turns, done in
         MDP.exact_dataset(**dataset_kwargs)]
  batch = mdp_utils.pack_rows([[e] for e in eps], max(len(e["tokens"]) for e in eps))
  index = {}
  states = mdp_utils.state_ids(batch["tokens"], batch["segment_ids"], index)
  one_hot = np.eye(len(index) + 1, dtype=np.float32)[states]  # [B, L, S]
  return batch, one_hot, states, index


def zero_heads(num_q, num_states):
  return {"params": {"q_kernel": jnp.zeros((num_q, num_states, V_PAD)), "q_bias": jnp.zeros((num_q, V_PAD)),
                     "v_kernel": jnp.zeros((num_states,)), "v_bias": jnp.zeros(())}}


def tables(heads, num_states):
  """(Q [J, S, V] and V [S]) of heads on the one-hot states."""
  eye = jnp.eye(num_states)
  return (np.asarray(heads_lib.q_values(heads, eye, VOCAB), np.float64),
          np.asarray(heads_lib.state_values(heads, eye), np.float64))


@jax.jit
def train_mc(batch, one_hot):
  n = losses.action_token_count(batch["action_mask"])
  opt = optax.adam(optax.cosine_decay_schedule(0.05, 1500, alpha=0.01))
  heads = zero_heads(1, one_hot.shape[-1])

  def step(carry, _):
    heads, opt_state = carry
    loss = lambda p: losses.mc_heads_loss(one_hot, p, batch, n, vocab_size=VOCAB, chunk_size=3)[0]
    grads = jax.grad(loss)(heads)
    updates, opt_state = opt.update(grads, opt_state)
    return (optax.apply_updates(heads, updates), opt_state), None

  (heads, _), _ = jax.lax.scan(step, (heads, opt.init(heads)), None, length=1500)
  return heads


@pytest.fixture(scope="module")
def ilql_trained():
  batch, one_hot, states, index = build(truncate_after=2, truncated_share=1)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  return batch, states, index, {alpha: train_ilql(jb, one_hot, alpha) for alpha in (0.0, 0.1)}


@functools.partial(jax.jit, static_argnames=("alpha",))
def train_ilql(batch, one_hot, alpha):
  n = losses.action_token_count(batch["action_mask"])
  steps = 3000
  opt = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.01))
  num_states = one_hot.shape[-1]
  heads = zero_heads(2, num_states)
  # distinct Q heads, as ValueHeads draws them
  heads["params"]["q_kernel"] = 0.01 * jax.random.normal(jax.random.key(0), (2, num_states, V_PAD))
  target = heads_lib.q_part(heads)

  def step(carry, _):
    heads, target, opt_state = carry
    loss = lambda p: losses.ilql_loss(one_hot, p, target, batch, n, vocab_size=VOCAB, expectile=0.8,
                                      cql_alpha=alpha, chunk_size=3)[0]
    updates, opt_state = opt.update(jax.grad(loss)(heads), opt_state)
    heads = optax.apply_updates(heads, updates)
    return (heads, train_steps.polyak_update(target, heads_lib.q_part(heads), 0.05), opt_state), None

  (heads, target, _), _ = jax.lax.scan(step, (heads, target, opt.init(heads)), None, length=steps)
  return heads


def np_expectile(values, weights, tau):
  """The tau-expectile of a discrete distribution: the root of sum_a w_a |tau - 1{q_a < v}| (q_a - v)."""
  lo, hi = min(values), max(values)
  for _ in range(100):
    v = (lo + hi) / 2
    g = sum(w * abs(tau - float(q < v)) * (q - v) for q, w in zip(values, weights))
    lo, hi = (v, hi) if g > 0 else (lo, v)
  return (lo + hi) / 2


def np_ilql_fixed_point(batch, states, tau, rounds):
  """Exact iteration over the dataset: Q(s, a) = mean over its occurrences of r + gamma V(next state),
  V(s) = tau-expectile of Q(s, x) over the actions x taken at s (weighted by their counts)."""
  num_states = states.max() + 1
  v = np.zeros(num_states)
  for _ in range(rounds):
    q_sum, count = {}, {}
    for b, i in zip(*np.nonzero(batch["action_mask"])):
      row = batch["next_action_row"][b, i]
      y = batch["rewards"][b, i] + (batch["discounts"][b, i] * v[states[b, row]] if row >= 0 else 0.0)
      key = (states[b, i - 1], batch["tokens"][b, i])
      q_sum[key] = q_sum.get(key, 0.0) + y
      count[key] = count.get(key, 0) + 1
    q = {k: q_sum[k] / count[k] for k in q_sum}
    new_v = v.copy()
    for s in {k[0] for k in q}:
      acts = [k for k in q if k[0] == s]
      new_v[s] = np_expectile([q[k] for k in acts], [count[k] for k in acts], tau)
    v = new_v
  return q, v


def test_mc_heads_reach_q_beta_and_v_beta():
  batch, one_hot, states, index = build()
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  q, v = tables(train_mc(jb, jnp.asarray(one_hot)), one_hot.shape[-1])
  q_beta = MDP.propagation_q(mc_mix=1.0)  # Q^beta by dynamic programming on the MDP
  checked = 0
  for (history, a), want in q_beta.items():
    if history in index:
      s = index[history]
      assert abs(q[0, s, a] - want) < 2e-3, (history, a)
      checked += 1
  assert checked > 10
  for history, s in index.items():
    if (history, A) in q_beta:  # an agent state: V^beta = E_beta Q^beta
      want = sum(p * q_beta[(history, a)] for a, p in zip(ACTIONS, behaviour(history)))
      assert abs(v[s] - want) < 2e-3, history


def test_ilql_without_cql_reaches_the_expectile_fixed_point(ilql_trained):
  batch, states, index, trained = ilql_trained
  q_want, v_want = np_ilql_fixed_point(batch, states, 0.8, rounds=6)
  q, v = tables(trained[0.0], states.max() + 1)
  for (s, a), want in q_want.items():
    for j in range(2):
      assert abs(q[j, s, a] - want) < 5e-3, (s, a, j)
    assert abs(v[s] - v_want[s]) < 5e-3, s
  # the expectile above 0.5 lies above the behaviour's mean: V is no longer V^beta
  assert any(v_want[s] > np.mean([q_want[k] for k in q_want if k[0] == s]) + 0.01 for s, _ in q_want)


def test_ilql_cql_pushes_unseen_actions_down(ilql_trained):
  batch, states, index, trained = ilql_trained
  q_want, _ = np_ilql_fixed_point(batch, states, 0.8, rounds=6)
  seen_states = sorted({s for s, _ in q_want})
  unseen = [t for t in range(VOCAB) if t not in ACTIONS]
  q0, _ = tables(trained[0.0], states.max() + 1)
  q1, _ = tables(trained[0.1], states.max() + 1)
  for s in seen_states:
    assert np.all(q1[:, s, unseen] < q0[:, s, unseen] - 0.1), s
    assert np.all(q1[:, s, unseen] < q1[:, s, list(ACTIONS)].min(-1, keepdims=True)), s


# ------------------------------------------------------------------------------------------------
# 3. The train step

CONFIG = get_preset("tiny-llama", vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64, init_std=0.4)


@jax.jit
def _init(rng):
  d = np.zeros((1, 1), np.int32)
  return nn.unbox(Transformer(CONFIG).init(rng, d, d, d + 1))


@pytest.fixture(scope="module")
def lm():
  return _init(jax.random.key(0)), _init(jax.random.key(1))


@pytest.mark.parametrize("trunk", ["phi", "train"])
def test_ilql_step_updates_heads_targets_and_trunk_as_configured(lm, trunk):
  phi, _ = lm
  model = Transformer(CONFIG)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  settings = train_steps.HeadsSettings(method="ilql", trunk=trunk, expectile=0.7, cql_alpha=0.05, tau=0.25)
  opt = optax.sgd(0.1)
  heads = jax.tree.map(jnp.asarray, random_heads(np.random.default_rng(1), 2, CONFIG.d_model,
                                                 CONFIG.padded_vocab_size, 0.05))
  state = train_steps.init_heads_state(phi, heads, opt, settings)
  before = jax.tree.map(np.asarray, state)
  batch = {k: jnp.asarray(v) for k, v in
           mdp_utils.random_batch(np.random.default_rng(2), 2, 24, CONFIG.vocab_size).items()}
  step = train_steps.make_heads_step(model, CONFIG, opt, mesh, rules, settings)
  new, metrics = step(state, batch)
  hidden = model.apply(phi, batch["tokens"], batch["positions"], batch["segment_ids"], method="hidden_states")
  normaliser = losses.action_token_count(batch["action_mask"])
  want_loss, _ = losses.ilql_loss(hidden, heads, heads_lib.q_part(heads), batch, normaliser,
                                  vocab_size=CONFIG.vocab_size, expectile=0.7, cql_alpha=0.05, chunk_size=128)
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
  new_heads = jax.tree.map(np.asarray, new["params"]["heads"])
  moved = heads_lib.q_part(new_heads)["params"]
  for k, old in before["target_params"]["params"].items():  # Polyak with tau = 0.25
    np.testing.assert_allclose(np.asarray(new["target_params"]["params"][k]), 0.75 * old + 0.25 * moved[k],
                               rtol=1e-6, atol=1e-7)
  assert not np.allclose(new_heads["params"]["v_kernel"], before["params"]["heads"]["params"]["v_kernel"])
  if trunk == "phi":
    assert set(new) == {"step", "params", "opt_state", "target_params", "trunk"}
    for a, b in zip(jax.tree.leaves(new["trunk"]), jax.tree.leaves(before["trunk"])):
      np.testing.assert_array_equal(np.asarray(a), b)
  else:
    changed = [not np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree.leaves(new["params"]["trunk"]), jax.tree.leaves(before["params"]["trunk"]))]
    assert all(changed)


# ------------------------------------------------------------------------------------------------
# 4. Acting

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 4, 4, 4, 30, 31, 32, 33]]


@jax.jit
def _hidden(params, tokens, segments):
  return Transformer(CONFIG).apply(params, tokens, np.arange(tokens.shape[1])[None], segments,
                                   method="hidden_states")


@pytest.mark.parametrize("trunk", ["phi", "train"])
def test_sampler_heads_scores_equal_a_full_forward(lm, trunk):
  phi, other = lm
  heads = random_heads(np.random.default_rng(3), 2, CONFIG.d_model, CONFIG.padded_vocab_size, 0.3)
  trunk_params = None if trunk == "phi" else other
  beta, v = 2.5, CONFIG.vocab_size
  out = Sampler(CONFIG, cache_len=64, min_prompt_bucket=16).decode(
      phi, trunk_params, PROMPTS, mode="heads", heads=heads, beta=beta, temperature=1.3, max_new_tokens=7,
      rng=5, record=True)
  for i, prompt in enumerate(PROMPTS):
    seq = prompt + out.sequences()[i]
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :len(seq)] = seq
    segments = (np.arange(32) < len(seq))[None].astype(np.int32)
    h_phi = np.asarray(_hidden(phi, tokens, segments), np.float64)[0]
    h_heads = h_phi if trunk == "phi" else np.asarray(_hidden(other, tokens, segments), np.float64)[0]
    unembed = np.asarray(phi["params"]["embed"]["embedding"], np.float64).T
    p = heads["params"]
    for t in range(out.num_generated[i]):
      row = len(prompt) - 1 + t
      z = h_phi[row] @ unembed[:, :v]
      log_pi = z - z.max() - np.log(np.exp(z - z.max()).sum())
      q = (np.einsum("d,jdv->jv", h_heads[row], p["q_kernel"].astype(np.float64)) + p["q_bias"])[:, :v]
      value = h_heads[row] @ p["v_kernel"] + p["v_bias"]
      np.testing.assert_allclose(out.scores[i, t, :v], log_pi + beta * (q.min(0) - value), atol=5e-4,
                                 rtol=1e-4)
      np.testing.assert_allclose(out.advantages[i, t, :v], q.min(0) - value, atol=5e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# 5. Config checks


@pytest.mark.parametrize("phases, field, value, message", [
    (("mc", "bc"), None, None, "config.phases: the mc phase trains value heads on phi from the bc phase"),
    (("bc", "ilql"), "trunk", "frozen", "config.ilql.trunk: 'frozen' is not one of"),
    (("bc", "ilql"), "expectile", 1.0, r"config.ilql.expectile: must be in \(0, 1\)"),
    (("bc", "ilql"), "cql_alpha", -0.1, "config.ilql.cql_alpha: must be >= 0"),
])
def test_config_refuses_bad_value_head_settings(phases, field, value, message):
  from qsft_jax import config_lib
  from qsft_jax.errors import ConfigError
  c = config_lib.base_config()
  c.phases = phases
  if field is not None:
    c.ilql[field] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.check_config(c, 1)


def test_config_refuses_value_heads_over_lora():
  from qsft_jax import config_lib
  from qsft_jax.errors import ConfigError
  c = config_lib.base_config()
  c.phases = ("bc", "qsft", "mc")
  c.model.lora.rank = 4
  with pytest.raises(ConfigError, match="the mc phase does not run over LoRA adapters"):
    config_lib.check_config(c, 1)
