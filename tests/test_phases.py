"""The trainer's phase programs (qsft_jax.phases) store each set of the state in its configured dtype:
theta in model param_dtype, AdamW's moments in bc/qsft.mu_dtype and nu_dtype, theta_bar in
qsft.target_dtype and phi in qsft.behaviour_dtype; a step and a checkpoint restore keep them."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsft_jax import checkpoints, cli, config_lib, phases, sharding
from qsft_jax import run as run_lib
from qsft_jax.aot import __main__ as aot_main
from qsft_jax.models import sharded
from qsft_jax.models.config import get_preset
import mdp_utils  # tests/mdp_utils.py

MODEL = get_preset("tiny-llama")


def config(**qsft):
  c = config_lib.base_config()
  c.loss.chunk_size = 8
  c.qsft.update(qsft)
  return c


def dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def adam_state(opt_state):
  """The ScaleByAdamState inside optax.chain(clip, adamw)."""
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))


def assert_storage(state: dict, params: str, mu: str, nu: str, target: str | None = None,
                   behaviour: str | None = None) -> None:
  """Every leaf of every set has exactly its dtype (the moments mirror the parameter tree)."""
  adam = adam_state(state["opt_state"])
  sets = {"params": (state["params"], params), "mu": (adam.mu, mu), "nu": (adam.nu, nu)}
  if target is not None:
    sets.update(target_params=(state["target_params"], target),
                behaviour_params=(state["behaviour_params"], behaviour))
  structure = jax.tree.structure(state["params"])
  for name, (tree, dtype) in sets.items():
    assert jax.tree.structure(tree) == structure, name
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      assert str(leaf.dtype) == dtype, f"{name}{jax.tree_util.keystr(path)}: {leaf.dtype}, expected {dtype}"
  assert adam.count.dtype == jnp.int32


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def test_storage_dtypes_reach_the_abstract_state(mesh):
  shapes = sharded.param_shapes(phases.Transformer(MODEL), MODEL)
  assert dtypes(shapes) == {"float32"}
  for target, behaviour, mu, nu in (("bfloat16", "float32", "bfloat16", "float32"),
                                    ("float32", "bfloat16", "float32", "bfloat16")):
    c = config(target_dtype=target, behaviour_dtype=behaviour, mu_dtype=mu, nu_dtype=nu)
    state = phases.build(c, "qsft", MODEL, mesh, sharding.DEFAULT_RULES).abstract_state(shapes)
    assert_storage(state, "float32", mu, nu, target, behaviour)
  # the defaults ("") keep every set and both moments in the parameters' dtype, float32 or bf16
  plain = phases.build(config(), "control", MODEL, mesh, sharding.DEFAULT_RULES).abstract_state(shapes)
  assert_storage(plain, "float32", "float32", "float32", "float32", "float32")
  bf16_model = get_preset("tiny-llama", param_dtype="bfloat16")
  bf16_shapes = sharded.param_shapes(phases.Transformer(bf16_model), bf16_model)
  bf16 = phases.build(config(), "qsft", bf16_model, mesh, sharding.DEFAULT_RULES).abstract_state(bf16_shapes)
  assert_storage(bf16, "bfloat16", "bfloat16", "bfloat16", "bfloat16", "bfloat16")
  bc = config_lib.base_config()
  bc.bc.mu_dtype, bc.bc.nu_dtype = "float32", "bfloat16"
  assert_storage(phases.build(bc, "bc", MODEL, mesh, sharding.DEFAULT_RULES).abstract_state(shapes),
                 "float32", "float32", "bfloat16")


def test_qsft_state_keeps_its_dtypes_through_a_step_and_a_restore(mesh, tmp_path):
  c = config(target_dtype="bfloat16", behaviour_dtype="float32", mu_dtype="float32", nu_dtype="bfloat16",
             tau=0.1)
  program = phases.build(c, "qsft", MODEL, mesh, sharding.DEFAULT_RULES)
  theta = sharded.init_params_sharded(MODEL, jax.random.key(0), mesh, sharding.DEFAULT_RULES)
  phi = sharded.init_params_sharded(MODEL, jax.random.key(1), mesh, sharding.DEFAULT_RULES)
  with jax.set_mesh(mesh):
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)((theta, phi))
  expected = ("float32", "float32", "bfloat16", "bfloat16", "float32")
  assert_storage(state, *expected)
  np.testing.assert_array_equal(  # theta_bar stored in bf16 = theta rounded to bf16
      np.asarray(state["target_params"]["params"]["embed"]["embedding"], np.float32),
      np.asarray(theta["params"]["embed"]["embedding"].astype(jnp.bfloat16), np.float32))
  batch = mdp_utils.random_batch(np.random.default_rng(0), 8, 32, MODEL.vocab_size)
  batch = sharding.global_batch_from_host_local(batch, mesh, sharding.DEFAULT_RULES)
  before = np.asarray(state["target_params"]["params"]["embed"]["embedding"], np.float32)
  state, metrics = program.step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert_storage(state, *expected)
  after = np.asarray(state["target_params"]["params"]["embed"]["embedding"], np.float32)
  assert not np.array_equal(before, after)  # the Polyak update moved theta_bar (tau = 0.1)

  manager = checkpoints.make_manager(str(tmp_path), "qsft", c)
  checkpoints.save(manager, 1, state)
  manager.wait_until_finished()
  abstract = program.abstract_state(sharded.param_shapes(program.model, MODEL))
  restored = checkpoints.restore(manager, 1, abstract)
  manager.close()
  assert_storage(restored, *expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("mu_dtype, nu_dtype", [(None, None), ("bfloat16", "bfloat16"),
                                                (None, "bfloat16"), ("bfloat16", None)])
def test_adamw_moments_in_their_storage_dtypes(mu_dtype, nu_dtype):
  """phases.adamw against optax.adamw with float32 moments: the same with float32 storage; with a bf16
  moment the first update is the same (computed from the float32 moments, which are rounded only for
  storage) and later ones differ by the rounding bf16 implies (2^-9 relative per rounding, a few
  roundings per step, carried into later steps by the moments)."""
  rng = np.random.default_rng(0)
  params = rng.normal(size=(64, 32)).astype(np.float32)
  scale = rng.normal(size=params.shape) * 10.0 ** rng.uniform(-3, 1, size=params.shape)
  grads = [(scale * (1 + 0.2 * rng.normal(size=params.shape))).astype(np.float32) for _ in range(6)]
  lr, kw = 1e-2, dict(b1=0.9, b2=0.95, weight_decay=0.01)
  ours = phases.adamw(lr, **kw, mu_dtype=mu_dtype and jnp.dtype(mu_dtype),
                      nu_dtype=nu_dtype and jnp.dtype(nu_dtype))

  def run(opt, steps):
    p, state = jnp.asarray(params), opt.init(jnp.asarray(params))
    for g in grads[:steps]:
      updates, state = jax.jit(opt.update)(jnp.asarray(g), state, p)
      p = optax.apply_updates(p, updates)
    return np.asarray(p, np.float64), state

  for steps in (1, len(grads)):
    got, state = run(ours, steps)
    want, _ = run(optax.adamw(lr, **kw), steps)
    adam = adam_state(state)
    assert (str(adam.mu.dtype), str(adam.nu.dtype)) == (mu_dtype or "float32", nu_dtype or "float32")
    if steps == 1 or (mu_dtype is None and nu_dtype is None):
      np.testing.assert_array_equal(got, want)
    else:  # step t's update is off by at most (t - 1) x 2^-8 of its size (each at most lr)
      difference = np.max(np.abs(got - want))
      assert 0 < difference <= lr * 2.0**-8 * steps * (steps - 1) / 2, difference / lr


@pytest.mark.parametrize("field", ["bc.mu_dtype", "bc.nu_dtype", "qsft.mu_dtype", "qsft.nu_dtype",
                                   "qsft.target_dtype", "qsft.behaviour_dtype"])
def test_storage_dtypes_are_checked(field):
  c = config_lib.base_config()
  section, name = field.split(".")
  c[section][name] = "float16"
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.{field}: 'float16' is not one of"):
    config_lib.check_config(c, device_count=8)


def test_frozen_dtype_names_its_replacements(capsys):
  c = config_lib.base_config()
  c.qsft.frozen_dtype = "bfloat16"
  with pytest.raises(config_lib.ConfigError, match=r"^config\.qsft\.frozen_dtype: was replaced by "
                     r"config\.qsft\.target_dtype and config\.qsft\.behaviour_dtype"):
    config_lib.check_config(c, device_count=8)
  tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
  argv = ["aot", f"--config={tiny}", "--config.qsft.frozen_dtype=bfloat16"]
  fv, _ = aot_main.define_flags(argv)
  with pytest.raises(SystemExit) as e:
    cli.parse(fv, argv, prog="aot")
  assert e.value.code == 2
  assert "'qsft.frozen_dtype'; it was replaced by qsft.target_dtype and qsft.behaviour_dtype" in (
      capsys.readouterr().err)


@pytest.mark.parametrize("value, new, refused", [("", {}, False),
                                                 ("bfloat16", {"target_dtype": "bfloat16",
                                                               "behaviour_dtype": "bfloat16"}, False),
                                                 ("bfloat16", {}, True)])
def test_a_workdir_with_frozen_dtype_resumes_with_the_fields_that_replaced_it(tmp_path, value, new, refused):
  from test_faults_workdir import FINISHED, lay_out, tiny
  old = tiny().to_dict()
  old["qsft"]["frozen_dtype"] = value
  for field in ("target_dtype", "behaviour_dtype"):
    del old["qsft"][field]
  workdir = lay_out(str(tmp_path), tiny(), FINISHED)
  run_lib.write_json_atomic(f"{workdir}/config.json", old)
  config = tiny()
  config.qsft.update(new)
  if refused:
    with pytest.raises(run_lib.ConfigDriftError, match=r'qsft.target_dtype: "bfloat16" -> ""'):
      run_lib.check_workdir_config(workdir, config)
  else:
    assert run_lib.check_workdir_config(workdir, config) == []
