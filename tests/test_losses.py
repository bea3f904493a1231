"""qsft_jax.losses against plain numpy references written here (dense log-softmax, explicit loops)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsft_jax import losses
import mdp_utils  # tests/mdp_utils.py (pytest puts tests/ on sys.path)

jax.config.update("jax_enable_x64", False)

VOCAB, V_PAD = 13, 16


# ------------------------------------------------------------------ numpy references


# V and the one-step targets (tests/mdp_utils.py: shared with tests/test_train_steps.py)
np_log_softmax_real = mdp_utils.np_log_softmax_real
np_values = mdp_utils.np_bellman_values
np_targets = mdp_utils.np_bellman_targets


def np_turn_rewards(batch):
  """Reward from token i to the end of its turn: explicit walk along the turn's tokens."""
  out = np.zeros(batch["rewards"].shape)
  mask, turn = batch["action_mask"], batch["turn_index"]
  for b in range(out.shape[0]):
    for i in range(out.shape[1]):
      if not mask[b, i]:
        continue
      total, factor, j = 0.0, 1.0, i
      while True:
        total += factor * batch["rewards"][b, j]
        nxt = j + 1
        if (nxt < out.shape[1] and mask[b, nxt] and turn[b, nxt] == turn[b, i]
            and batch["segment_ids"][b, nxt] == batch["segment_ids"][b, i]):
          factor *= batch["discounts"][b, j]
          j = nxt
        else:
          break
      out[b, i] = total
  return out


def np_wce(z, label, w, vocab, dummy=None):
  lp = np_log_softmax_real(z, vocab)
  if dummy is None:
    others = [a for a in range(vocab) if a != label]
    return -(w * lp[label] + (1 - w) / (vocab - 1) * sum(lp[a] for a in others))
  return -(w * lp[label] + (1 - w) * lp[dummy])


def np_soft_target(label, w, vocab, v_pad, dummy=None):
  t = np.zeros(v_pad)
  if dummy is None:
    t[:vocab] = (1 - w) / (vocab - 1)
    t[label] = w
  else:
    t[dummy] += 1 - w
    t[label] += w
  return t


def np_softmax_real(z, vocab, v_pad):
  p = np.zeros(v_pad)
  p[:vocab] = np.exp(np_log_softmax_real(z, vocab))
  return p


# ------------------------------------------------------------------ values and targets


def random_logits(rng, shape, scale=2.0):
  z = rng.normal(size=shape + (V_PAD,)) * scale
  z[..., VOCAB:] = rng.normal(size=shape + (V_PAD - VOCAB,)) * 50 + 30  # junk in padded columns
  return z.astype(np.float32)


@pytest.mark.parametrize("support_min", [0.0, 1e-2, 0.05])
def test_bellman_values_match_numpy(support_min):
  rng = np.random.default_rng(0)
  z_bar, z_phi = random_logits(rng, (3, 7)), random_logits(rng, (3, 7), scale=3.0)
  got = losses.bellman_values(z_bar, z_phi, VOCAB, support_min)
  np.testing.assert_allclose(got, np_values(z_bar, z_phi, VOCAB, support_min), rtol=2e-5)
  assert got.dtype == jnp.float32 and got.shape == (3, 7)


def test_bellman_values_exclude_the_dummy_token():
  # theta_bar puts most of its mass on the dummy token (1 - w goes there in training) while pi_phi
  # gives it just enough to pass the support threshold: its huge ratio must not become V.
  rng = np.random.default_rng(3)
  z_bar, z_phi = random_logits(rng, (4, 5)), random_logits(rng, (4, 5))
  dummy = 3
  z_bar[..., dummy] = 8.0
  z_phi[..., dummy] = np.log(2e-2) + np.log(np.exp(z_phi[..., :VOCAB]).sum(-1))  # pi_phi(dummy) ~ 2%
  with_dummy = losses.bellman_values(z_bar, z_phi, VOCAB, 1e-2)
  np.testing.assert_allclose(with_dummy, np_values(z_bar, z_phi, VOCAB, 1e-2), rtol=2e-5)
  assert (np.asarray(with_dummy) > 10).all()  # the dummy's ratio dominates when it is not excluded
  got = losses.bellman_values(z_bar, z_phi, VOCAB, 1e-2, exclude_token=dummy)
  want = np_values(z_bar, z_phi, VOCAB, 1e-2, exclude=dummy)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  assert (np.asarray(got) < np.asarray(with_dummy)).all()
  h = rng.normal(size=(1, 6, 5)).astype(np.float32)
  u_bar, u_phi = (rng.normal(size=(2, 5, V_PAD)) * 0.8).astype(np.float32)
  u_bar[:, dummy] += 3.0
  labels = np.zeros((1, 6), np.int32)
  v, _, _ = losses.chunked_bellman_values(h, u_bar, h, u_phi, labels, vocab_size=VOCAB, support_min=0.0,
                                          chunk_size=4, exclude_token=dummy)
  np.testing.assert_allclose(v, np_values(h @ u_bar, h @ u_phi, VOCAB, 0.0, exclude=dummy), rtol=3e-5)


def test_bellman_support_is_never_empty_when_the_dummy_is_phis_likeliest_token():
  """The excluded dummy holds most of pi_phi and no other token reaches support_min: the support is
  phi's most likely eligible token, not the empty set (whose max made V = 0)."""
  dummy = 3
  z_phi = np.zeros((2, V_PAD), np.float32)
  z_phi[:, dummy] = 6.0                    # pi_phi(dummy) ~ 0.97, every other token < 0.01
  z_phi[0, 5] = 1.0                        # row 0: token 5 the likeliest eligible one
  z_phi[1, 9], z_phi[1, 2] = 0.5, 0.5      # row 1: a tie between tokens 2 and 9
  z_bar = np.zeros((2, V_PAD), np.float32)
  z_bar[:, 7] = 4.0                        # a large ratio outside the support
  z_bar[1, 2] = 1.0
  want = np_values(z_bar, z_phi, VOCAB, 0.05, exclude=dummy)
  lp_bar, lp_phi = np_log_softmax_real(z_bar, VOCAB), np_log_softmax_real(z_phi, VOCAB)
  np.testing.assert_allclose(want, [np.exp(lp_bar[0, 5] - lp_phi[0, 5]),
                                    np.exp(lp_bar[1, 2] - lp_phi[1, 2])], rtol=1e-12)
  got = losses.bellman_values(z_bar, z_phi, VOCAB, 0.05, exclude_token=dummy)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  assert (np.asarray(got) > 0).all()
  # random rows where the dummy dominates phi: the same support rule, row by row
  rng = np.random.default_rng(11)
  z_bar, z_phi = random_logits(rng, (5, 6)), random_logits(rng, (5, 6))
  z_phi[..., dummy] += 8.0
  for support_min in (0.0, 0.02, 0.5):
    got = losses.bellman_values(z_bar, z_phi, VOCAB, support_min, exclude_token=dummy)
    np.testing.assert_allclose(got, np_values(z_bar, z_phi, VOCAB, support_min, exclude=dummy),
                               rtol=2e-5)
  with pytest.raises(ValueError, match="exclude_token"):
    losses.bellman_values(z_bar, z_phi, VOCAB, 0.0, exclude_token=VOCAB)


def test_bellman_values_support_fallback_and_cap():
  # support_min above every probability: only the behaviour's most likely token counts.
  z_phi = np.zeros((1, V_PAD), np.float32)
  z_phi[0, 4] = 0.5  # most likely, but below 0.9
  z_bar = np.zeros((1, V_PAD), np.float32)
  z_bar[0, 7] = 10.0
  lp_bar, lp_phi = np_log_softmax_real(z_bar, VOCAB), np_log_softmax_real(z_phi, VOCAB)
  got = losses.bellman_values(z_bar, z_phi, VOCAB, support_min=0.9)
  np.testing.assert_allclose(got, np.exp(lp_bar[:, 4] - lp_phi[:, 4]), rtol=1e-5)
  # with the threshold off, the unsupported token 7 wins
  got0 = losses.bellman_values(z_bar, z_phi, VOCAB, support_min=0.0)
  np.testing.assert_allclose(got0, np.exp(lp_bar[:, 7] - lp_phi[:, 7]), rtol=1e-5)
  # an enormous ratio stays finite and gives a clipped target of 1; a zero discount silences it
  z_phi2 = np.zeros((1, V_PAD), np.float32)
  z_phi2[0, 3] = -200.0
  z_bar2 = np.zeros((1, V_PAD), np.float32)
  z_bar2[0, 3] = 200.0
  v = losses.bellman_values(z_bar2, z_phi2, VOCAB, 0.0)
  assert np.isfinite(v).all() and v[0] > 1e30
  values = jnp.concatenate([v, jnp.zeros(1)])[None]  # row 0 has the huge value
  targets, clipped = losses.bellman_targets(values, jnp.array([[0.2, 0.0]]), jnp.array([[1.0, 0.0]]),
                                            jnp.array([[0, 0]]), jnp.array([[True, True]]))
  np.testing.assert_array_equal(targets, [[1.0, 0.0]])
  np.testing.assert_array_equal(clipped, [[True, False]])
  with pytest.raises(ValueError, match="support_min"):
    losses.bellman_values(z_bar, z_phi, VOCAB, -1.0)


def test_bellman_targets_match_numpy_on_packed_episodes():
  rng = np.random.default_rng(1)
  batch = mdp_utils.random_batch(rng, num_rows=6, length=40, vocab_size=VOCAB)
  assert (~batch["done"] & batch["action_mask"]).any(), "need truncated episodes"
  assert (batch["next_action_row"][batch["action_mask"]] == -1).any(), "need done episodes"
  crosses = batch["action_mask"] & (batch["next_action_row"] >= 0) & (
      batch["next_action_row"] != np.arange(40)[None])
  assert crosses.any(), "need turn boundaries"
  values = rng.uniform(0, 1.2, size=(6, 40)).astype(np.float32)
  got_t, got_c = losses.bellman_targets(values, batch["rewards"], batch["discounts"],
                                        batch["next_action_row"], batch["action_mask"])
  want_t, want_c = np_targets(values, batch["rewards"], batch["discounts"], batch["next_action_row"],
                              batch["action_mask"])
  np.testing.assert_allclose(got_t, want_t, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got_c, want_c)
  assert want_c.any() and not want_c.all()


def test_compute_targets_turn_and_ones_modes():
  rng = np.random.default_rng(2)
  batch = mdp_utils.random_batch(rng, num_rows=6, length=40, vocab_size=VOCAB)
  values = rng.uniform(0, 1.1, size=(6, 40)).astype(np.float32)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  # per-turn: the reward to the end of the turn, bootstrapped from the next turn's first action
  turn_r = np_turn_rewards(batch)
  np.testing.assert_allclose(
      losses.turn_rewards(jbatch["rewards"], jbatch["discounts"], jbatch["next_action_row"],
                          jbatch["action_mask"], jbatch["turn_index"]), turn_r, rtol=1e-6, atol=1e-7)
  want_t, want_c = np_targets(values, turn_r, batch["turn_discounts"], batch["next_turn_row"],
                              batch["action_mask"])
  got_t, got_c = losses.compute_targets(values, jbatch, losses.TargetConfig(mode="turn"))
  np.testing.assert_allclose(got_t, want_t, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got_c, want_c)
  # with gamma_token = 1 and one reward per turn, the two modes agree on each turn's last token
  got_tok, _ = losses.compute_targets(values, jbatch, losses.TargetConfig(mode="token"))
  last = batch["action_mask"] & (batch["next_action_row"] != np.arange(40)[None])
  np.testing.assert_allclose(np.asarray(got_tok)[last], np.asarray(got_t)[last], rtol=1e-6)
  ones_t, ones_c = losses.compute_targets(values, jbatch, losses.TargetConfig(mode="ones"))
  np.testing.assert_array_equal(ones_t, batch["action_mask"].astype(np.float32))
  assert not np.asarray(ones_c).any()
  with pytest.raises(ValueError, match=r"qsft\.targets_mode: 'nstep' is not one of"):
    losses.TargetConfig(mode="nstep")


def test_target_config_from_config_and_checks():
  import ml_collections
  from qsft_jax import config_lib
  c = config_lib.base_config()
  c.qsft.update(dict(targets_mode="turn", support_min=0.01, dummy_token=3, mc_mix=0.5, n_step=2))
  want = dict(support_min=0.01, dummy_token=3, mc_mix=0.5, n_step=2)
  assert losses.TargetConfig.from_config(c, "qsft") == losses.TargetConfig(mode="turn", **want)
  assert losses.TargetConfig.from_config(c, "control") == losses.TargetConfig(mode="ones", **want)
  assert losses.TargetConfig.from_config(c, "control").bellman().mode == "token"
  c.qsft.dummy_token = -1  # the config's "none"
  assert losses.TargetConfig.from_config(c).dummy_token is None
  # a config.json written before a field existed takes its default
  partial = ml_collections.ConfigDict({"qsft": {"support_min": 1e-3}})
  assert losses.TargetConfig.from_config(partial) == losses.TargetConfig(support_min=1e-3)
  for kwargs, message in [(dict(support_min=1.0), r"qsft\.support_min: must be in \[0, 1\)"),
                          (dict(support_min=-0.1), r"qsft\.support_min"),
                          (dict(dummy_token=-1), r"qsft\.dummy_token"),
                          (dict(dummy_token=2.0), r"qsft\.dummy_token")]:  # mc_mix, n_step: test_propagation
    with pytest.raises(ValueError, match=message):
      losses.TargetConfig(**kwargs)


# ------------------------------------------------------------------ per-token WCE / BC


@pytest.mark.parametrize("dummy", [None, 11])
def test_wce_value_and_gradient_match_numpy(dummy):
  rng = np.random.default_rng(3)
  z = random_logits(rng, (4, 5))
  labels = rng.integers(0, VOCAB, size=(4, 5))
  labels[0, 0] = dummy if dummy is not None else 0  # the label may be the dummy token itself
  w = rng.uniform(size=(4, 5)).astype(np.float32)
  got = losses.wce_per_token(z, labels, w, VOCAB, dummy_token=dummy)
  grad = jax.grad(lambda z: jnp.sum(losses.wce_per_token(z, labels, w, VOCAB, dummy_token=dummy)))(z)
  for idx in np.ndindex(4, 5):
    np.testing.assert_allclose(got[idx], np_wce(z[idx], labels[idx], w[idx], VOCAB, dummy), rtol=2e-5)
    want_g = np_softmax_real(z[idx], VOCAB, V_PAD) - np_soft_target(labels[idx], w[idx], VOCAB, V_PAD, dummy)
    np.testing.assert_allclose(grad[idx], want_g, atol=2e-6)
    assert np.all(np.asarray(grad[idx])[VOCAB:] == 0)  # padded columns get no gradient
  np.testing.assert_allclose(
      losses.soft_targets(labels, w, V_PAD, VOCAB, dummy),
      np.stack([np_soft_target(labels[i], w[i], VOCAB, V_PAD, dummy) for i in np.ndindex(4, 5)]).reshape(4, 5, V_PAD),
      atol=1e-7)


def test_bc_is_cross_entropy():
  rng = np.random.default_rng(4)
  z = random_logits(rng, (3, 4))
  labels = rng.integers(0, VOCAB, size=(3, 4))
  want = -np.take_along_axis(np_log_softmax_real(z, VOCAB), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.bc_per_token(z, labels, VOCAB), want, rtol=2e-5)


# ------------------------------------------------------------------ chunked drivers


def make_driver_inputs(rng, b=3, length=37, d=8, dtype=np.float32):
  batch = mdp_utils.random_batch(rng, num_rows=b, length=length, vocab_size=VOCAB)
  hidden = rng.normal(size=(b, length, d)).astype(dtype)
  unembed = (rng.normal(size=(d, V_PAD)) * 0.7).astype(np.float32)
  targets = rng.uniform(size=(b, length)).astype(np.float32)
  return batch, hidden, unembed, targets


def np_chunk_reference(batch, hidden, unembed, targets, dummy):
  """Loss, d loss/d hidden, d loss/d unembed of the WCE over action tokens, dense in numpy."""
  h = hidden.astype(np.float64)
  z = h @ unembed.astype(np.float64)
  n = max(batch["action_mask"].sum(), 1)
  loss, dz = 0.0, np.zeros_like(z)
  bsz, length = batch["tokens"].shape
  for b in range(bsz):
    for i in range(1, length):  # token i through row i - 1
      if batch["action_mask"][b, i]:
        x, w = batch["tokens"][b, i], targets[b, i]
        loss += np_wce(z[b, i - 1], x, w, VOCAB, dummy) / n
        dz[b, i - 1] = (np_softmax_real(z[b, i - 1], VOCAB, V_PAD)
                        - np_soft_target(x, w, VOCAB, V_PAD, dummy)) / n
  return loss, dz @ unembed.T.astype(np.float64), h.reshape(-1, h.shape[-1]).T @ dz.reshape(-1, V_PAD)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("dummy", [None, 12])
def test_chunked_wce_matches_dense_numpy(chunk_size, dummy):
  rng = np.random.default_rng(5)
  batch, hidden, unembed, targets = make_driver_inputs(rng)
  n = losses.action_token_count(batch["action_mask"])

  def loss_fn(h, u):
    return losses.chunked_wce_loss(
        h, u, losses.to_rows(batch["tokens"]), losses.to_rows(targets),
        losses.to_rows(batch["action_mask"], False), n, vocab_size=VOCAB, chunk_size=chunk_size,
        dummy_token=dummy)

  (loss, logp), grads = jax.jit(jax.value_and_grad(loss_fn, (0, 1), has_aux=True))(hidden, unembed)
  want_loss, want_dh, want_du = np_chunk_reference(batch, hidden, unembed, targets, dummy)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grads[0], want_dh, atol=1e-6)
  np.testing.assert_allclose(grads[1], want_du, atol=1e-6)
  assert np.all(np.asarray(grads[1])[:, VOCAB:] == 0)
  # the forward-only path (no custom VJP involved) gives the same loss and log-probs
  loss2, logp2 = jax.jit(loss_fn)(hidden, unembed)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  np.testing.assert_allclose(logp2, logp, rtol=1e-6)
  z = hidden.astype(np.float64) @ unembed
  lp = np_log_softmax_real(z, VOCAB)
  want_logp = np.take_along_axis(lp, losses.to_rows(batch["tokens"])[..., None].__array__(), -1)[..., 0]
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)


def test_chunked_wce_second_order_cotangent_and_bf16_hidden():
  rng = np.random.default_rng(6)
  batch, hidden, unembed, targets = make_driver_inputs(rng, length=20)
  n = losses.action_token_count(batch["action_mask"])
  args = (losses.to_rows(batch["tokens"]), losses.to_rows(targets), losses.to_rows(batch["action_mask"], False))

  def loss_fn(h, u, scale):
    return scale * losses.chunked_wce_loss(h, u, *args, n, vocab_size=VOCAB, chunk_size=6)[0]

  # the upstream cotangent (here 2.5) multiplies the stored gradient
  g = jax.grad(loss_fn, (0, 1))(hidden, unembed, 2.5)
  g1 = jax.grad(loss_fn, (0, 1))(hidden, unembed, 1.0)
  np.testing.assert_allclose(g[0], 2.5 * np.asarray(g1[0]), rtol=1e-6)
  # bf16 hidden states: gradient dtype follows the input, values close to the f32 computation
  gb = jax.grad(loss_fn, (0, 1))(jnp.asarray(hidden, jnp.bfloat16), unembed, 1.0)
  assert gb[0].dtype == jnp.bfloat16 and gb[1].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(gb[0], np.float32), g1[0], atol=3e-3)


def test_chunked_bellman_values_match_numpy():
  rng = np.random.default_rng(7)
  b, length, d = 2, 19, 6
  h_bar, h_phi = rng.normal(size=(2, b, length, d)).astype(np.float32)
  u_bar, u_phi = (rng.normal(size=(2, d, V_PAD)) * 0.8).astype(np.float32)
  labels = rng.integers(0, VOCAB, size=(b, length))
  z_bar, z_phi = h_bar @ u_bar, h_phi @ u_phi
  want_v = np_values(z_bar, z_phi, VOCAB, 0.02)
  want_lp = np.take_along_axis(np_log_softmax_real(z_phi, VOCAB), labels[..., None], -1)[..., 0]
  for chunk in (1, 4, 19, 50):
    v, lp_phi, lp_bar = losses.chunked_bellman_values(
        h_bar, u_bar, h_phi, u_phi, labels, vocab_size=VOCAB, support_min=0.02, chunk_size=chunk)
    np.testing.assert_allclose(v, want_v, rtol=3e-5)
    np.testing.assert_allclose(lp_phi, want_lp, rtol=1e-5, atol=1e-5)
    want_bar = np.take_along_axis(np_log_softmax_real(z_bar, VOCAB), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp_bar, want_bar, rtol=1e-5, atol=1e-5)


def test_qsft_loss_end_to_end_matches_numpy():
  """values from (theta_bar, phi) -> targets at next-action rows -> WCE on theta, all in numpy."""
  rng = np.random.default_rng(8)
  batch, h_theta, u_theta, _ = make_driver_inputs(rng, b=4, length=30)
  h_bar, h_phi = rng.normal(size=(2,) + h_theta.shape).astype(np.float32)
  u_bar, u_phi = (rng.normal(size=(2,) + u_theta.shape) * 0.5).astype(np.float32)
  n = losses.action_token_count(batch["action_mask"])
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

  def loss_fn(h, u):
    return losses.qsft_loss(h, u, h_bar, u_bar, h_phi, u_phi, jbatch, n, vocab_size=VOCAB,
                            targets=losses.TargetConfig(support_min=1e-3), chunk_size=7)

  (loss, aux), grads = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(h_theta, u_theta)
  values = np_values(h_bar @ u_bar, h_phi @ u_phi, VOCAB, 1e-3)
  targets, clipped = np_targets(values, batch["rewards"], batch["discounts"], batch["next_action_row"],
                                batch["action_mask"])
  np.testing.assert_allclose(aux["targets"], targets, rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(aux["clipped"], clipped)
  want_loss, want_dh, want_du = np_chunk_reference(batch, h_theta, u_theta, targets, None)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grads[0], want_dh, atol=2e-6)
  np.testing.assert_allclose(grads[1], want_du, atol=2e-6)


def test_driver_shape_errors():
  h = jnp.zeros((2, 5, 4))
  u = jnp.zeros((4, V_PAD))
  bad = jnp.zeros((2, 6))
  with pytest.raises(ValueError, match="row_labels"):
    losses.chunked_wce_loss(h, u, bad, jnp.zeros((2, 5)), jnp.zeros((2, 5)), 1.0, vocab_size=VOCAB)
  with pytest.raises(ValueError, match="vocab_size"):
    losses.wce_per_token(jnp.zeros((2, V_PAD)), jnp.zeros(2, int), jnp.zeros(2), V_PAD + 1)
  with pytest.raises(ValueError, match="dummy_token"):
    losses.wce_per_token(jnp.zeros((2, V_PAD)), jnp.zeros(2, int), jnp.zeros(2), VOCAB, dummy_token=VOCAB)


def test_test_arrays_agree_with_the_data_layer():
  """The arrays these tests build (tests/mdp_utils.py, written from docs/architecture.md) are the
  data layer's: the losses are tested on the layout they will be fed."""
  from qsft_jax.data import mdp as data_mdp
  rng = np.random.default_rng(9)
  for _ in range(30):
    turns = [([1], False, 0.0)]  # BOS
    for t in range(int(rng.integers(1, 6))):
      act = bool(rng.random() < 0.6)
      ids = [int(x) for x in rng.integers(2, VOCAB, size=int(rng.integers(1, 4)))]
      turns.append((ids, act, float(rng.uniform(0, 0.5)) if act else 0.0))
    if not any(a for _, a, _ in turns):
      turns.append(([3], True, 0.2))
    done = True if turns[-1][1] else bool(rng.random() < 0.5)
    gamma, gamma_token = 0.9, 0.95
    ours = mdp_utils.episode_arrays(turns, done, gamma, gamma_token)
    episode = data_mdp.TokenizedEpisode(
        tokens=np.array([1] + [i for ids, _, _ in turns[1:] for i in ids], np.int32),
        turn_lengths=np.array([len(ids) for ids, _, _ in turns[1:]]),
        turn_is_action=np.array([a for _, a, _ in turns[1:]]),
        turn_rewards=np.array([r for _, _, r in turns[1:]]), done=done)
    theirs = data_mdp.episode_arrays(episode, gamma, gamma_token)
    for key, value in ours.items():
      np.testing.assert_allclose(theirs[key], value, rtol=1e-6, err_msg=key)


def test_qsft_loss_ones_and_turn_modes_match_numpy():
  """"ones": the loss and gradient of BC (every target 1) from the dense numpy reference; "turn":
  values from numpy, turn rewards by an explicit walk, targets bootstrapped at the next turn's row,
  then the numpy WCE: nothing of the library's targets feeds the expected values."""
  rng = np.random.default_rng(10)
  batch, h, u, _ = make_driver_inputs(rng, b=3, length=24)
  h_bar, h_phi = rng.normal(size=(2,) + h.shape).astype(np.float32)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  n = losses.action_token_count(batch["action_mask"])
  mask = batch["action_mask"]

  def qsft(h, u, mode):
    return losses.qsft_loss(h, u, h_bar, u, h_phi, u * 0.5, jbatch, n, vocab_size=VOCAB,
                            targets=losses.TargetConfig(mode=mode, support_min=1e-3), chunk_size=5)

  values = np_values(h_bar @ u, h_phi @ (u * 0.5), VOCAB, 1e-3)
  turn_targets, turn_clipped = np_targets(values, np_turn_rewards(batch), batch["turn_discounts"],
                                          batch["next_turn_row"], mask)
  assert 0 < turn_targets[mask].mean() < 1 and not turn_clipped.all()
  token_targets, _ = np_targets(values, batch["rewards"], batch["discounts"], batch["next_action_row"],
                                mask)
  assert np.abs(token_targets - turn_targets).max() > 1e-3  # the modes are told apart
  for mode, targets in (("ones", mask.astype(np.float64)), ("turn", turn_targets)):
    (loss, aux), grads = jax.value_and_grad(lambda h, u: qsft(h, u, mode), (0, 1), has_aux=True)(h, u)
    np.testing.assert_allclose(aux["targets"], targets, rtol=2e-5, atol=1e-6, err_msg=mode)
    if mode == "turn":
      np.testing.assert_array_equal(aux["clipped"], turn_clipped)
    want_loss, want_dh, want_du = np_chunk_reference(batch, h, u, targets, None)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=mode)
    np.testing.assert_allclose(grads[0], want_dh, atol=2e-6, err_msg=mode)
    np.testing.assert_allclose(grads[1], want_du, atol=2e-6, err_msg=mode)


# ------------------------------------------------------------------ soft-capped logits (Gemma 2)


CAP = 1.5  # raw logits here have std ~2: the cap bites


def jnp_capped_wce(hidden, unembed, row_labels, row_weights, row_mask, n, cap, dummy=None):
  """Reference: full logits hidden @ unembed, capped, log-softmax over the real vocabulary, soft-target CE."""
  u = jnp.einsum("bld,dv->blv", hidden.astype(jnp.float32), unembed)[..., :VOCAB]
  lp = jax.nn.log_softmax(cap * jnp.tanh(u / cap), axis=-1)
  onehot = jax.nn.one_hot(row_labels, VOCAB)
  w = row_weights[..., None]
  rest = jax.nn.one_hot(dummy, VOCAB) if dummy is not None else (1.0 - onehot) / (VOCAB - 1)
  t = w * onehot + (1.0 - w) * rest
  return jnp.sum(-jnp.sum(t * lp, -1) * row_mask) / n


def capped_driver_inputs(rng, length=23):
  batch, hidden, unembed, targets = make_driver_inputs(rng, length=length)
  unembed[:, VOCAB:] *= 1e3  # huge raw logits in the padded columns: they must stay out (and not give nan)
  rows = (losses.to_rows(batch["tokens"]), losses.to_rows(targets),
          losses.to_rows(batch["action_mask"], False))
  return batch, hidden, unembed, rows, losses.action_token_count(batch["action_mask"])


@pytest.mark.parametrize("dummy", [None, 12])
def test_chunked_wce_and_bc_with_softcap_match_jnp_reference(dummy):
  rng = np.random.default_rng(11)
  batch, hidden, unembed, (labels, weights, mask), n = capped_driver_inputs(rng)

  def ours(h, u):
    return losses.chunked_wce_loss(h, u, labels, weights, mask, n, vocab_size=VOCAB, chunk_size=5,
                                   dummy_token=dummy, softcap=CAP)

  def ours_bc(h, u):
    return losses.chunked_bc_loss(h, u, labels, mask, n, vocab_size=VOCAB, chunk_size=5, softcap=CAP)[0]

  ref = lambda h, u, w: jnp_capped_wce(h, u, labels, w, mask.astype(jnp.float32), n, CAP, dummy)
  (loss, logp), grads = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(hidden, unembed)
  want_loss, want_grads = jax.value_and_grad(ref, (0, 1))(hidden, unembed, weights)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.all(np.asarray(grads[1])[:, VOCAB:] == 0)
  z = CAP * np.tanh(hidden.astype(np.float64) @ unembed.astype(np.float64) / CAP)
  want_logp = np.take_along_axis(np_log_softmax_real(z, VOCAB), np.asarray(labels)[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  # the forward-only path (no custom VJP) gives the same loss; BC is the reference with w = 1
  np.testing.assert_allclose(jax.jit(ours)(hidden, unembed)[0], loss, rtol=1e-6)
  ones = jnp.ones(weights.shape)
  bc_loss, bc_grads = jax.value_and_grad(ours_bc, (0, 1))(hidden, unembed)
  want_bc, want_bc_grads = jax.value_and_grad(ref, (0, 1))(hidden, unembed, ones)
  np.testing.assert_allclose(bc_loss, want_bc, rtol=1e-5)
  for got, want in zip(bc_grads, want_bc_grads):
    np.testing.assert_allclose(got, want, atol=1e-6)
  # the cap changes the loss (the test above would not see a dropped cap otherwise)
  uncapped = jnp_capped_wce(hidden, unembed, labels, weights, mask, n, 1e6, dummy)
  assert abs(float(uncapped) - float(loss)) > 1e-2


def test_chunked_bellman_values_and_qsft_loss_with_softcap_match_reference():
  rng = np.random.default_rng(12)
  batch, h_theta, u_theta, (labels, _, mask), n = capped_driver_inputs(rng, length=19)
  h_bar, h_phi = rng.normal(size=(2,) + h_theta.shape).astype(np.float32)
  u_bar, u_phi = (rng.normal(size=(2,) + u_theta.shape) * 0.8).astype(np.float32)
  u_bar[:, VOCAB:] = u_phi[:, VOCAB:] = 1e3
  cap = lambda z: CAP * np.tanh(z.astype(np.float64) / CAP)
  z_bar, z_phi = cap(h_bar @ u_bar), cap(h_phi @ u_phi)
  want_v = np_values(z_bar, z_phi, VOCAB, 0.02)
  assert not np.allclose(want_v, np_values(h_bar @ u_bar, h_phi @ u_phi, VOCAB, 0.02), rtol=1e-2)
  v, lp_phi, lp_bar = losses.chunked_bellman_values(
      h_bar, u_bar, h_phi, u_phi, labels, vocab_size=VOCAB, support_min=0.02, chunk_size=4, softcap=CAP)
  np.testing.assert_allclose(v, want_v, rtol=3e-5)
  for got, z in ((lp_phi, z_phi), (lp_bar, z_bar)):
    want = np.take_along_axis(np_log_softmax_real(z, VOCAB), np.asarray(labels)[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the whole Q-SFT loss: capped values -> targets -> capped WCE on theta
  jbatch = {k: jnp.asarray(x) for k, x in batch.items()}
  targets_cfg = losses.TargetConfig(support_min=0.02)

  def ours(h, u):
    return losses.qsft_loss(h, u, h_bar, u_bar, h_phi, u_phi, jbatch, n, vocab_size=VOCAB,
                            targets=targets_cfg, chunk_size=6, softcap=CAP)

  (loss, aux), grads = jax.value_and_grad(ours, (0, 1), has_aux=True)(h_theta, u_theta)
  targets, _ = np_targets(want_v, batch["rewards"], batch["discounts"], batch["next_action_row"],
                          batch["action_mask"])
  np.testing.assert_allclose(aux["targets"], targets, rtol=2e-5, atol=1e-6)
  ref = lambda h, u: jnp_capped_wce(h, u, labels, losses.to_rows(jnp.asarray(targets, jnp.float32)),
                                    mask.astype(jnp.float32), n, CAP)
  want_loss, want_grads = jax.value_and_grad(ref, (0, 1))(h_theta, u_theta)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_softcap_must_be_positive():
  h, u, rows = jnp.zeros((2, 5, 4)), jnp.zeros((4, V_PAD)), jnp.zeros((2, 5))
  for bad in (0.0, -1.0, "30"):
    with pytest.raises(ValueError, match="softcap"):
      losses.chunked_bc_loss(h, u, rows.astype(int), rows, 1.0, vocab_size=VOCAB, softcap=bad)
