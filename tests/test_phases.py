"""The trainer's phase programs (qsft_jax.phases) honour the state storage options of the config:
bc.mu_dtype / qsft.mu_dtype (AdamW's first moment) and qsft.frozen_dtype (theta_bar and phi)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsft_jax import config_lib, phases, sharding
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


def adam_moments(opt_state):
  """(mu, nu) of the AdamW state inside optax.chain(clip, adamw)."""
  adam = next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
  return adam.mu, adam.nu


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def test_storage_dtypes_reach_the_abstract_state(mesh):
  c = config(mu_dtype="bfloat16", frozen_dtype="bfloat16")
  program = phases.build(c, "qsft", MODEL, mesh, sharding.DEFAULT_RULES)
  shapes = sharded.param_shapes(program.model, MODEL)
  state = program.abstract_state(shapes)
  assert dtypes(shapes) == {"float32"}
  assert dtypes(state["params"]) == {"float32"}
  assert dtypes(state["target_params"]) == dtypes(state["behaviour_params"]) == {"bfloat16"}
  mu, nu = adam_moments(state["opt_state"])
  assert dtypes(mu) == {"bfloat16"} and dtypes(nu) == {"float32"}
  # the defaults ("") keep every set and both moments in the parameters' dtype
  plain = phases.build(config(), "control", MODEL, mesh, sharding.DEFAULT_RULES).abstract_state(shapes)
  assert dtypes(plain) == {"float32"}
  bc = config_lib.base_config()
  bc.bc.mu_dtype = "bfloat16"
  mu, _ = adam_moments(phases.build(bc, "bc", MODEL, mesh, sharding.DEFAULT_RULES).abstract_state(
      shapes)["opt_state"])
  assert dtypes(mu) == {"bfloat16"}


def test_qsft_step_runs_with_bf16_frozen_sets(mesh):
  c = config(mu_dtype="bfloat16", frozen_dtype="bfloat16", tau=0.1)
  program = phases.build(c, "qsft", MODEL, mesh, sharding.DEFAULT_RULES)
  theta = sharded.init_params_sharded(MODEL, jax.random.key(0), mesh, sharding.DEFAULT_RULES)
  phi = sharded.init_params_sharded(MODEL, jax.random.key(1), mesh, sharding.DEFAULT_RULES)
  with jax.set_mesh(mesh):
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)((theta, phi))
  np.testing.assert_array_equal(  # phi stored in bf16 = phi rounded to bf16
      np.asarray(state["behaviour_params"]["params"]["embed"]["embedding"], np.float32),
      np.asarray(phi["params"]["embed"]["embedding"].astype(jnp.bfloat16), np.float32))
  batch = mdp_utils.random_batch(np.random.default_rng(0), 8, 32, MODEL.vocab_size)
  batch = sharding.global_batch_from_host_local(batch, mesh, sharding.DEFAULT_RULES)
  before = np.asarray(state["target_params"]["params"]["embed"]["embedding"], np.float32)
  state, metrics = program.step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert dtypes(state["target_params"]) == dtypes(state["behaviour_params"]) == {"bfloat16"}
  assert dtypes(state["params"]) == {"float32"}
  after = np.asarray(state["target_params"]["params"]["embed"]["embedding"], np.float32)
  assert not np.array_equal(before, after)  # the Polyak update moved theta_bar (tau = 0.1)


@pytest.mark.parametrize("field", ["bc.mu_dtype", "qsft.mu_dtype", "qsft.frozen_dtype"])
def test_storage_dtypes_are_checked(field):
  c = config_lib.base_config()
  section, name = field.split(".")
  c[section][name] = "float16"
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.{field}: 'float16' is not one of"):
    config_lib.check_config(c, device_count=8)
