"""Value-propagation settings (docs/value_propagation.md) against independent references.

1. Target arithmetic: `compute_targets` with n_step / mc_mix, in "token" and "turn" mode, against
   explicit Python walks along the next-action (next-turn) chain on random packed batches.
2. Fixed points: on the exact-proportion tabular MDPs of test_qstar.py (one-hot "model" trained
   through `qsft_loss` and `train_steps.update_target`, dummy-token WCE), every setting reaches
   its documented fixed point: p_theta / pi_phi -> Q_set computed by dynamic programming on the MDP
   (`TokenMDP.propagation_q`), and p_theta -> the closed-form WCE iteration on a dataset that
   also holds truncated episodes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsft_jax import losses, train_steps
from qsft_jax.models import sharded
import mdp_utils  # tests/mdp_utils.py (pytest puts tests/ on sys.path)
import test_qstar as qs  # the MDPs, BC training and state tables of the core Q* tests

VOCAB, V_PAD = 13, 16


# ------------------------------------------------------------------ Python references


def np_link(batch, mode, turn_r):
  """(rewards, discounts, next rows) of one link in `mode` (turn_r: reward to the end of the turn)."""
  if mode == "token":
    return batch["rewards"], batch["discounts"], batch["next_action_row"]
  return turn_r, batch["turn_discounts"], batch["next_turn_row"]


def np_chain_return(batch, values, b, i, n, mode, turn_r):
  """Unclipped return of n links from token i (n = None: to the episode's end), then V."""
  rewards, discounts, rows = np_link(batch, mode, turn_r)
  seg, length = batch["segment_ids"][b], rewards.shape[1]
  total, scale, j, k = 0.0, 1.0, i, 0
  while True:
    total += scale * rewards[b, j]
    row, k = rows[b, j], k + 1
    if row < 0:
      return total
    nxt = row + 1
    chain_goes_on = nxt < length and seg[nxt] == seg[i] and batch["action_mask"][b, nxt]
    if not chain_goes_on or k == n:
      return total + scale * discounts[b, j] * values[b, row]
    scale *= discounts[b, j]
    j = nxt


def np_targets(batch, values, mode, n, lam, turn_r):
  out, clipped = np.zeros(values.shape), np.zeros(values.shape, bool)
  for b, i in zip(*np.nonzero(batch["action_mask"])):
    raw = (1 - lam) * np_chain_return(batch, values, b, i, n, mode, turn_r)
    if lam:  # Monte Carlo: the whole token chain (completed by V where the episode was truncated)
      raw += lam * np_chain_return(batch, values, b, i, None, "token", turn_r)
    out[b, i] = min(max(raw, 0.0), 1.0)
    clipped[b, i] = raw > 1 or raw < 0
  return out, clipped


@pytest.fixture(scope="module")
def random_batch():
  rng = np.random.default_rng(7)
  batch = mdp_utils.random_batch(rng, 4, 40, VOCAB)
  values = rng.uniform(0.0, 1.6, size=batch["tokens"].shape)  # some targets clip at 1
  import test_losses  # its explicit walk for the reward to the end of a turn
  return batch, values, test_losses.np_turn_rewards(batch)


@pytest.mark.parametrize("mode", ["token", "turn"])
@pytest.mark.parametrize("n_step,mc_mix", [(1, 0.0), (2, 0.0), (3, 0.0), (7, 0.0), (1, 0.3), (2, 0.7),
                                            (1, 1.0)])
def test_targets_match_python_chain_walk(random_batch, mode, n_step, mc_mix):
  batch, values, turn_r = random_batch
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  targets, clipped = losses.compute_targets(jnp.asarray(values, jnp.float32), jb,
                                            losses.TargetConfig(mode=mode, mc_mix=mc_mix, n_step=n_step))
  want, want_clipped = np_targets(batch, values, mode, n_step, mc_mix, turn_r)
  np.testing.assert_allclose(np.asarray(targets), want, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(clipped), want_clipped)
  if n_step > 1 and mc_mix == 0:  # the walk really went further than one link somewhere
    one, _ = np_targets(batch, values, mode, 1, 0.0, turn_r)
    assert np.abs(one - want).max() > 0.05


def test_generic_paths_agree_with_one_step_and_monte_carlo(random_batch):
  batch, values, _ = random_batch
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  v = jnp.asarray(values, jnp.float32)
  mask = jb["action_mask"]
  # n_step_returns with one link is the one-step target, bit for bit
  one = losses.bellman_targets(v, jb["rewards"], jb["discounts"], jb["next_action_row"], mask)[0]
  raw = losses.n_step_returns(v, jb["rewards"], jb["discounts"], jb["next_action_row"], mask, 1)
  np.testing.assert_array_equal(np.asarray(jnp.where(mask, jnp.clip(raw, 0, 1), 0)), np.asarray(one))
  # the Monte Carlo return (returns_to_go + truncation bootstrap) is the infinite-step return
  mc = losses.monte_carlo_returns(v, jb)
  inf = losses.n_step_returns(v, jb["rewards"], jb["discounts"], jb["next_action_row"], mask, 40)
  np.testing.assert_allclose(np.asarray(mc), np.asarray(inf), atol=2e-6)
  # done episodes: exactly the observed return-to-go; truncated ones add a bootstrap
  done = batch["done"] & batch["action_mask"]
  np.testing.assert_allclose(np.asarray(mc)[done], batch["returns_to_go"][done], atol=1e-6)
  trunc = ~batch["done"] & batch["action_mask"]
  assert trunc.any() and (np.asarray(mc)[trunc] > batch["returns_to_go"][trunc] + 1e-3).all()


def test_option_errors():
  for kwargs, msg in [(dict(mc_mix=1.5), r"qsft\.mc_mix: must be in \[0, 1\]; got 1\.5"),
                      (dict(mc_mix=-0.1), r"qsft\.mc_mix"), (dict(n_step=0), r"qsft\.n_step: must be >= 1"),
                      (dict(n_step=2.0), r"qsft\.n_step: must be an int"),
                      (dict(n_step=True), r"qsft\.n_step: must be an int")]:
    with pytest.raises(ValueError, match=msg):  # before any array, model or mesh is touched
      losses.TargetConfig(**kwargs)
  with pytest.raises(ValueError, match="n_step"):
    losses.n_step_returns(*([jnp.zeros((1, 4))] * 4), jnp.ones((1, 4), bool), 0)


# ------------------------------------------------------------------ fixed points on tabular MDPs

STEPS_PER_ROUND, ROUNDS = 200, 4  # two_turns: 3 action tokens per episode, so 4 hard rounds suffice


@functools.partial(jax.jit, static_argnames=("steps", "tau", "every", "mode", "mc_mix", "n_step"))
def train_theta(batch, one_hot, phi_table, theta0, steps, tau, every, mode, mc_mix, n_step):
  """Q-SFT on a one-hot tabular model through `qsft_loss`, theta_bar by `update_target`."""
  n = losses.action_token_count(batch["action_mask"])
  opt = optax.adam(optax.cosine_decay_schedule(0.1, steps, alpha=0.01), b2=0.99)

  def loss_fn(table, target_table):
    targets = losses.TargetConfig(mode=mode, support_min=qs.SUPPORT_MIN, dummy_token=qs.DUMMY,
                                  mc_mix=mc_mix, n_step=n_step)
    return losses.qsft_loss(one_hot, table, one_hot, target_table, one_hot, phi_table, batch, n,
                            vocab_size=qs.VOCABS["vocab8"][0], targets=targets, chunk_size=4)[0]

  def step(carry, i):
    table, target_table, opt_state = carry
    grads = jax.grad(loss_fn)(table, target_table)
    updates, opt_state = opt.update(grads, opt_state)
    table = optax.apply_updates(table, updates)
    target_table = train_steps.update_target(target_table, table, i + 1,
                                             train_steps.TargetUpdate(tau=tau, every=every))
    return (table, target_table, opt_state), None

  (table, _, _), _ = jax.lax.scan(step, (theta0, theta0, opt.init(theta0)), jnp.arange(steps))
  return table


@functools.lru_cache(maxsize=None)
def tabular(truncated: bool):
  """two_turns (vocab 8): batch, one-hot states, state index, BC table phi."""
  mdp, kwargs = qs.mdps()["two_turns"]
  batch, one_hot, index = qs.build(mdp, kwargs if truncated else {})
  phi = qs.train_bc(batch, one_hot, *qs.VOCABS["vocab8"])
  return mdp, batch, one_hot, index, phi


def run_setting(truncated, *, init="zeros", tau=0.0, every=STEPS_PER_ROUND, mode="token",
                mc_mix=0.0, n_step=1, steps=STEPS_PER_ROUND * ROUNDS):
  mdp, batch, one_hot, index, phi = tabular(truncated)
  theta0 = {"zeros": jnp.zeros_like(phi), "phi": phi,
            "random": jax.random.normal(jax.random.key(3), phi.shape)}[init]
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  table = train_theta(jb, one_hot, phi, theta0, steps, tau, every, mode, mc_mix, n_step)
  return qs.probs(table, qs.VOCABS["vocab8"][0]), qs.probs(phi, qs.VOCABS["vocab8"][0])


def covered_pairs(mdp, index, q):
  out = [(index[h], a, value) for (h, a), value in q.items() if h in index]
  assert len(out) > 10
  return out


def test_dp_reduces_to_q_star_and_settings_differ():
  mdp = qs.mdps()["two_turns"][0]
  q_star = mdp.q_star()
  assert mdp.propagation_q() == pytest.approx(q_star)
  q_beta = mdp.propagation_q(mc_mix=1.0)
  # Q^beta is the behaviour's value: the n-step return to the end under the behaviour is the same
  assert mdp.propagation_q(n_step=10) == pytest.approx(q_beta)
  for setting in (dict(mode="turn"), dict(mc_mix=0.5), dict(n_step=2), dict(mc_mix=1.0)):
    q = mdp.propagation_q(**setting)
    gaps = [q_star[k] - q[k] for k in q_star]
    assert min(gaps) > -1e-12 and max(gaps) > 0.02, setting  # below Q*, and not equal to it


SETTINGS = {  # name: (run_setting kwargs, DP kwargs)
    "token_hard": (dict(), dict()),
    "token_hard_from_phi": (dict(init="phi"), dict()),
    "token_hard_from_random": (dict(init="random"), dict()),
    "token_polyak": (dict(tau=0.05, every=0, steps=1000), dict()),
    "turn": (dict(mode="turn"), dict(mode="turn")),
    "mc_0.5": (dict(mc_mix=0.5), dict(mc_mix=0.5)),
    "mc_1": (dict(mc_mix=1.0), dict(mc_mix=1.0)),
    "n_step_2": (dict(n_step=2), dict(n_step=2)),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_training_reaches_the_settings_dp_fixed_point(name):
  run_kwargs, dp_kwargs = SETTINGS[name]
  mdp, batch, one_hot, index, phi = tabular(False)
  theta, pi = run_setting(False, **run_kwargs)
  q = mdp.propagation_q(**dp_kwargs)
  errors = np.array([theta[s, a] / pi[s, a] - value for s, a, value in covered_pairs(mdp, index, q)])
  assert np.abs(errors).max() < 0.01, (name, np.abs(errors).max())


# ------------------------------------------------------------------ with truncated episodes


def np_wce_fixed_point(batch, states, pi, mode, n, lam, rounds):
  """Closed-form WCE Bellman iteration on the dataset (dummy variant: p(a|s) = E_data[w 1{x = a}|s]),
  targets from the Python chain walk above. pi [S, V_real]."""
  tokens, mask = batch["tokens"], batch["action_mask"]
  num_states, vocab = pi.shape
  import test_losses
  turn_r = test_losses.np_turn_rewards(batch)
  p = np.full((num_states, vocab), 1.0 / vocab)
  supported = pi >= np.minimum(qs.SUPPORT_MIN, pi.max(-1, keepdims=True))
  for _ in range(rounds):
    value = np.where(supported, p / np.maximum(pi, 1e-30), -np.inf).max(-1)
    targets, _ = np_targets(batch, value[states], mode, n, lam, turn_r)
    new_p, count = np.zeros_like(p), np.zeros(num_states)
    for b, i in zip(*np.nonzero(mask)):
      s = states[b, i - 1]
      count[s] += 1
      new_p[s, tokens[b, i]] += targets[b, i]
      new_p[s, qs.DUMMY] += 1 - targets[b, i]
    seen = count > 0
    p[seen] = new_p[seen] / count[seen, None]
  return p


@pytest.mark.parametrize("mode,n_step,mc_mix", [("turn", 1, 0.5)])
def test_truncated_episodes_reach_the_closed_form_fixed_point(mode, n_step, mc_mix):
  """Truncated episodes bootstrap from their last row, in the per-turn chain and in the Monte Carlo
  return alike (the n-step walk through truncated episodes is checked on random batches above)."""
  mdp, batch, one_hot, index, phi = tabular(True)
  assert not batch["done"].all()
  theta, pi = run_setting(True, mode=mode, mc_mix=mc_mix, n_step=n_step)
  states = mdp_utils.state_ids(batch["tokens"], batch["segment_ids"], dict(index))
  want = np_wce_fixed_point(batch, states, pi, mode, n_step, mc_mix, ROUNDS)
  visited = sorted({index[h] for (h, _) in mdp.q_star() if h in index})
  np.testing.assert_allclose(theta[visited], want[visited], atol=3e-3)


# ------------------------------------------------------------------ the train step threads the options


def test_qsft_step_passes_the_propagation_options(monkeypatch):
  """make_qsft_step hands its TargetConfig (mode, n_step, mc_mix, ...) to qsft_loss (traced by
  lowering on abstract inputs, no compilation: numerics of the step itself are test_train_steps.py's)."""
  import test_train_steps as ts  # its tiny model and random batch
  seen = []
  real = losses.qsft_loss

  def spy(*args, **kwargs):
    seen.append(kwargs["targets"])
    return real(*args, **kwargs)

  monkeypatch.setattr(losses, "qsft_loss", spy)
  mesh, opt = ts.mesh_of("one"), optax.sgd(1.0)
  targets = losses.TargetConfig(mode="turn", support_min=1e-3, dummy_token=5, n_step=3, mc_mix=0.25)
  step = train_steps.make_qsft_step(ts.MODEL, ts.CONFIG, opt, mesh, ts.RULES, targets, ts.UPDATE,
                                    train_steps.StepOptions(chunk_size=8))
  params = sharded.param_shapes(ts.MODEL, ts.CONFIG)
  state = jax.eval_shape(lambda p: train_steps.init_qsft_state(p, p, opt), params)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ts.host_batch())
  step.lower(state, batch)
  assert seen == [losses.TargetConfig(mode="turn", support_min=1e-3, dummy_token=5, n_step=3,
                                      mc_mix=0.25)]
