"""BC and Q-SFT train steps: sharding invariance, gradient accumulation, target updates, donation,
and the step's loss/gradient against a dense (unchunked) computation from the model's full logits."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from qsft_jax import losses, sharding, train_steps
from qsft_jax.models import sharded
from qsft_jax.models.config import get_preset
from qsft_jax.models.transformer import Transformer
import mdp_utils  # tests/mdp_utils.py (pytest puts tests/ on sys.path)

CONFIG = get_preset("tiny-llama")
MODEL = Transformer(CONFIG)
RULES = sharding.DEFAULT_RULES
MESHES = {"data8": {"data": 8}, "data2-fsdp2-tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
TARGETS = losses.TargetConfig(support_min=1e-3)
UPDATE = train_steps.TargetUpdate(tau=0.1)


def optimizer():
  # eps well above float32 rounding of tiny gradients, so Adam does not amplify rounding noise
  return optax.adam(3e-3, eps=1e-4)


@functools.lru_cache(maxsize=None)
def host_params(seed):
  one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  params = sharded.init_params_sharded(CONFIG, jax.random.key(seed), one, RULES)
  return jax.tree.map(np.asarray, params)


@functools.lru_cache(maxsize=None)
def host_batch(rows=16, length=32, seed=0):
  return mdp_utils.random_batch(np.random.default_rng(seed), rows, length, CONFIG.vocab_size)


def mesh_of(shape):
  if shape == "one":
    return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  return sharding.make_mesh(MESHES[shape])


def make_state(mesh, kind, opt):
  shardings = train_steps.state_shardings(MODEL, CONFIG, opt, mesh, RULES, kind)
  theta = sharded.shard_params(host_params(0), CONFIG, mesh, RULES)
  if kind == "bc":
    return jax.jit(lambda p: train_steps.init_bc_state(p, opt), out_shardings=shardings)(theta)
  phi = sharded.shard_params(host_params(1), CONFIG, mesh, RULES)
  bar = sharded.shard_params(host_params(2), CONFIG, mesh, RULES)
  init = lambda p, f, t: train_steps.init_qsft_state(p, f, opt, target_params=t)
  return jax.jit(init, out_shardings=shardings)(theta, phi, bar)


def put_batch(mesh, batch):
  return sharding.global_batch_from_host_local(batch, mesh, RULES)


@functools.lru_cache(maxsize=None)
def get_step(mesh_shape, kind, microbatches=1, update=UPDATE, skip_nonfinite=False):
  """Steps are cached: each distinct one costs a compilation (seconds on 2 cores)."""
  mesh, opt = mesh_of(mesh_shape), optimizer()
  options = train_steps.StepOptions(chunk_size=8, microbatches=microbatches,
                                    skip_nonfinite=skip_nonfinite)
  if kind == "bc":
    step = train_steps.make_bc_step(MODEL, CONFIG, opt, mesh, RULES, options)
  else:
    step = train_steps.make_qsft_step(MODEL, CONFIG, opt, mesh, RULES, TARGETS, update, options)
  return step, mesh, opt


@functools.lru_cache(maxsize=None)
def run(mesh_shape, kind, steps=3, microbatches=1):
  step, mesh, opt = get_step(mesh_shape, kind, microbatches)
  state, batch = make_state(mesh, kind, opt), put_batch(mesh, host_batch())
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(jax.tree.map(float, metrics))
  return jax.tree.map(np.asarray, state), history


def assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5), a, b)


@pytest.fixture(scope="module")
def single_device():
  return {kind: run("one", kind) for kind in ("bc", "qsft")}


@pytest.mark.parametrize("mesh_shape", list(MESHES))
@pytest.mark.parametrize("kind", ["bc", "qsft"])
def test_sharded_steps_match_one_device(single_device, mesh_shape, kind):
  state, history = run(mesh_shape, kind)
  want_state, want_history = single_device[kind]
  assert_trees_close(state["params"], want_state["params"], atol=2e-5)
  if kind == "qsft":
    assert_trees_close(state["target_params"], want_state["target_params"], atol=2e-5)
  for got, want in zip(history, want_history):
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert int(state["step"]) == 3
  assert history[-1]["loss"] < history[0]["loss"]  # the steps do train


@pytest.mark.parametrize("kind,microbatches", [("bc", 2), ("qsft", 2), ("qsft", 4)])
def test_gradient_accumulation_matches_full_batch(kind, microbatches):
  shape = "data8" if microbatches == 2 else "data2-fsdp2-tensor2"  # 16 rows / M over the batch axes
  full_state, full_history = run(shape, kind)
  acc_state, acc_history = run(shape, kind, microbatches=microbatches)
  assert_trees_close(acc_state["params"], full_state["params"], atol=2e-5)
  for got, want in zip(acc_history, full_history):
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


def dense_qsft_loss(params, phi, bar, batch):
  """The Q-SFT loss from full [B, L, V] logits, written here from the formulas: V and the targets
  by the numpy loops of tests/mdp_utils.py, then the even-spread WCE
  -[w log p(x) + (1 - w) / (V - 1) sum_{a != x} log p(a)] from jax.nn.log_softmax, averaged over
  action tokens (differentiable in params; nothing of qsft_jax.losses is used)."""
  logits = lambda p: MODEL.apply(p, batch["tokens"], batch["positions"], batch["segment_ids"])
  vocab = CONFIG.vocab_size
  host = {k: np.asarray(v) for k, v in batch.items()}
  values = mdp_utils.np_bellman_values(np.asarray(logits(bar)), np.asarray(logits(phi)), vocab,
                                       1e-3)
  targets, _ = mdp_utils.np_bellman_targets(values, host["rewards"], host["discounts"],
                                            host["next_action_row"], host["action_mask"])
  logp = jax.nn.log_softmax(logits(params)[:, :-1, :vocab].astype(jnp.float32), axis=-1)
  labels = batch["tokens"][:, 1:]  # row i - 1 predicts token i
  w = jnp.asarray(targets[:, 1:], jnp.float32)
  logp_label = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  logp_others = jnp.sum(logp, axis=-1) - logp_label
  per_token = -(w * logp_label + (1.0 - w) / (vocab - 1) * logp_others)
  mask = batch["action_mask"][:, 1:]
  return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.sum(mask), targets


def test_qsft_step_loss_gradient_and_metrics_match_dense_computation():
  """With SGD(lr=1), params_new = params - grad: compare to jax.grad of the dense loss."""
  mesh, opt = mesh_of("data2-fsdp2-tensor2"), optax.sgd(1.0)
  step = train_steps.make_qsft_step(MODEL, CONFIG, opt, mesh, RULES, TARGETS, UPDATE,
                                    train_steps.StepOptions(chunk_size=8))
  state = make_state(mesh, "qsft", opt)
  batch = host_batch()
  params, phi, bar = host_params(0), host_params(1), host_params(2)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  (want_loss, targets), grads = jax.value_and_grad(dense_qsft_loss, has_aux=True)(params, phi, bar, jb)
  new_state, metrics = step(state, put_batch(mesh, batch))
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  want_params = jax.tree.map(lambda p, g: p - g, params, grads)
  assert_trees_close(jax.tree.map(np.asarray, new_state["params"]), want_params, atol=1e-6)
  mask = batch["action_mask"]
  np.testing.assert_allclose(metrics["mean_target"], np.asarray(targets)[mask].mean(), rtol=1e-5)
  assert metrics["action_tokens"] == mask.sum() and metrics["tokens"] == (batch["segment_ids"] > 0).sum()
  assert 0 < metrics["mean_p_theta"] < 1 and 0 < metrics["mean_pi_phi"] < 1
  # Polyak with tau = 0.1 from theta_bar towards the new theta
  want_bar = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, bar, want_params)
  assert_trees_close(jax.tree.map(np.asarray, new_state["target_params"]), want_bar, atol=1e-6)
  # phi never moves
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_state["behaviour_params"]), phi)


def test_qsft_metrics_when_all_three_models_coincide():
  step, mesh, opt = get_step("data8", "qsft")
  theta = sharded.shard_params(host_params(0), CONFIG, mesh, RULES)
  state = train_steps.init_qsft_state(theta, theta, opt)  # copies: no buffer donated twice
  _, metrics = step(state, put_batch(mesh, host_batch()))
  np.testing.assert_allclose(metrics["mean_ratio"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["mean_p_theta"], metrics["mean_pi_phi"], rtol=1e-5)
  assert 0 <= metrics["clipped_above"] <= 1 and metrics["clipped_below"] == 0  # rewards >= 0


def test_polyak_and_hard_updates_are_exact():
  rng = np.random.default_rng(0)
  target = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
  online = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), target)
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), b)
  same(train_steps.polyak_update(target, online, 0.0), target)
  same(train_steps.polyak_update(target, online, 1.0), online)
  tau = np.float32(0.005)
  want = jax.tree.map(lambda t, o: (np.float32(1) - tau) * t + tau * o, target, online)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-7, atol=1e-8),
               train_steps.polyak_update(target, online, tau), want)
  for step in range(1, 7):
    got = train_steps.update_target(target, online, jnp.int32(step),
                                    train_steps.TargetUpdate(tau=0.5, every=3))
    same(got, online if step % 3 == 0 else target)
  with pytest.raises(ValueError, match=r"qsft\.target_update_every: must be >= 0"):
    train_steps.TargetUpdate(tau=0.5, every=-1)
  with pytest.raises(ValueError, match=r"qsft\.tau: must be in \[0, 1\]"):
    train_steps.TargetUpdate(tau=1.5)


def test_hard_target_updates_inside_the_step_and_donation():
  step, mesh, opt = get_step("data8", "qsft", update=train_steps.TargetUpdate(tau=0.1, every=2),
                             skip_nonfinite=True)
  state = make_state(mesh, "qsft", opt)
  bar0 = jax.tree.map(np.array, state["target_params"])  # a copy: a numpy view would pin the buffer
  batch = put_batch(mesh, host_batch())
  old = state
  state, _ = step(state, batch)
  leaves = jax.tree.leaves(old)
  assert all(x.is_deleted() for x in leaves), "the state must be donated"
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["target_params"]), bar0)
  state, _ = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["target_params"]),
               jax.tree.map(np.asarray, state["params"]))
  assert int(state["step"]) == 2


def test_nonfinite_step_is_skipped():
  step, mesh, opt = get_step("data8", "qsft", update=train_steps.TargetUpdate(tau=0.1, every=2),
                             skip_nonfinite=True)
  state = make_state(mesh, "qsft", opt)
  before = jax.tree.map(np.array, state)
  bad = dict(host_batch())
  bad["rewards"] = np.where(bad["action_mask"], np.nan, 0.0).astype(np.float32)
  state, metrics = step(state, put_batch(mesh, bad))
  assert metrics["skipped"] == 1.0 and not np.isfinite(metrics["loss"])
  for key in ("params", "opt_state", "target_params"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state[key]), before[key])
  state, metrics = step(state, put_batch(mesh, host_batch()))
  assert metrics["skipped"] == 0.0 and np.isfinite(metrics["loss"])


def test_bad_arguments():
  mesh = mesh_of("data8")
  with pytest.raises(TypeError, match="targets must be a TargetConfig"):
    train_steps.make_qsft_step(MODEL, CONFIG, optimizer(), mesh, RULES, "nstep")
  with pytest.raises(ValueError, match="state kind"):
    train_steps.state_shardings(MODEL, CONFIG, optimizer(), mesh, RULES, "ppo")
  with pytest.raises(ValueError, match="microbatches"):
    train_steps.StepOptions(microbatches=0)
  step = train_steps.make_bc_step(MODEL, CONFIG, optimizer(), mesh, RULES,
                                  train_steps.StepOptions(microbatches=3))
  with pytest.raises(ValueError, match="microbatches"):
    step(make_state(mesh, "bc", optimizer()), put_batch(mesh, host_batch()))


def test_gemma2_final_logit_softcap_trains():
  """A tiny Gemma 2-shaped model (final-logit and attention soft-caps, a sliding layer): the BC step's
  first loss is the cross-entropy of the model's own (capped) logits, and a few BC and Q-SFT steps
  train with finite losses that fall."""
  config = CONFIG.replace(family="gemma", activation="gelu_new", d_model=64, mlp_dim=128, head_dim=16,
                          query_pre_attn_scalar=32, attn_logit_softcap=5.0, final_logit_softcap=1.0,
                          init_std=0.1, layer_types=("sliding_attention", "full_attention"), sliding_window=8)
  model, mesh, opt = Transformer(config), mesh_of("one"), optax.adam(1e-2)
  dummy = jnp.zeros((1, 1), jnp.int32)
  both = jax.jit(jax.vmap(lambda r: nn.unbox(model.init(r, dummy, dummy, dummy + 1))))(
      jax.random.split(jax.random.key(0)))
  theta, phi = (jax.tree.map(lambda x, i=i: np.asarray(x[i]), both) for i in range(2))
  batch = host_batch(rows=4, length=16)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  logits = model.apply(theta, jb["tokens"], jb["positions"], jb["segment_ids"])[..., :config.vocab_size]
  assert float(jnp.max(jnp.abs(logits))) > 0.8  # the cap (1.0) bites
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  logp_label = jnp.take_along_axis(logp, jb["tokens"][:, 1:, None], axis=-1)[..., 0]
  mask = batch["action_mask"][:, 1:]
  want_bc = -jnp.sum(jnp.where(mask, logp_label, 0.0)) / mask.sum()
  options = train_steps.StepOptions(chunk_size=8)
  put = lambda p: sharded.shard_params(p, config, mesh, RULES)
  for kind in ("bc", "qsft"):
    shardings = train_steps.state_shardings(model, config, opt, mesh, RULES, kind)
    if kind == "bc":
      step = train_steps.make_bc_step(model, config, opt, mesh, RULES, options)
      state = jax.jit(lambda p: train_steps.init_bc_state(p, opt), out_shardings=shardings)(put(theta))
    else:
      step = train_steps.make_qsft_step(model, config, opt, mesh, RULES, TARGETS, UPDATE, options)
      init = lambda p, f: train_steps.init_qsft_state(p, f, opt)
      state = jax.jit(init, out_shardings=shardings)(put(theta), put(phi))
    batch_on_mesh, history = put_batch(mesh, batch), []
    for _ in range(3):
      state, metrics = step(state, batch_on_mesh)
      history.append(float(metrics["loss"]))
    assert np.all(np.isfinite(history)) and history[-1] < history[0], (kind, history)
    if kind == "bc":
      np.testing.assert_allclose(history[0], want_bc, rtol=1e-5)
