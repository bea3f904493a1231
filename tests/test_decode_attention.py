"""Decode-attention plug-ins (qsft_jax.kernels) against a numpy reference, the C++ kernel's build, and
the Sampler's choice among them.

scripts/setup.sh installs g++, so the kernel must build here: these tests fail (not skip) without it.
"""
import jax
import numpy as np
import pytest

from qsft_jax import sharding
from qsft_jax.kernels import cpu_decode_attention, xla_decode_attention
from qsft_jax.models import get_preset
from qsft_jax.sampler import Sampler, choose_decode_attention


def numpy_attention(q, k_cache, v_cache, mask, k_new, v_new, scale):
  """Float64 loops over rows, kv heads and query heads: softmax over [valid slots, new token]."""
  b, kv, g, dh = q.shape
  out = np.zeros((b, kv, g, dh))
  for i in range(b):
    for h in range(kv):
      keys = np.concatenate([k_cache[i, h][mask[i]], k_new[i, h][None]]).astype(np.float64)
      values = np.concatenate([v_cache[i, h][mask[i]], v_new[i, h][None]]).astype(np.float64)
      for j in range(g):
        scores = keys @ q[i, h, j].astype(np.float64) * scale
        p = np.exp(scores - scores.max())
        out[i, h, j] = (p / p.sum()) @ values
  return out


def random_inputs(rng, b, kv, g, s, dh, valid=0.7):
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  mask = rng.random((b, s)) < valid
  mask[0] = False  # a row with an empty cache attends to its new token alone
  return f(b, kv, g, dh), f(b, kv, s, dh), f(b, kv, s, dh), mask, f(b, kv, dh), f(b, kv, dh)


def test_kernel_builds_here():
  assert cpu_decode_attention.available(), "scripts/setup.sh installs g++; the kernel must build"
  assert cpu_decode_attention.library_path().exists()


# Head dims 64 and 128 take the kernel's unrolled paths, 8 and 96 the generic one; G = 1..4; one or many
# rows and kv heads (several (row, head) items exercise the thread pool's work sharing).
@pytest.mark.parametrize("shape", [(8, 2, 2, 592, 64), (4, 3, 3, 144, 64), (2, 1, 4, 33, 128),
                                   (3, 2, 1, 17, 8), (1, 1, 3, 5, 96), (16, 4, 2, 64, 64)])
def test_kernel_matches_numpy(shape):
  rng = np.random.default_rng(sum(shape))
  args = random_inputs(rng, *shape)
  scale = 1 / np.sqrt(shape[-1])
  got = np.asarray(jax.jit(lambda *a: cpu_decode_attention.decode_attention(*a, scale))(*args))
  want = numpy_attention(*args, scale)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("shape", [(4, 3, 3, 144, 64), (3, 2, 1, 17, 8), (1, 1, 3, 5, 96)])
def test_multiply_reduce_matches_numpy(shape):
  rng = np.random.default_rng(sum(shape))
  args = random_inputs(rng, *shape)
  scale = 1 / np.sqrt(shape[-1])
  got = np.asarray(jax.jit(lambda *a: xla_decode_attention.multiply_reduce(*a, scale))(*args))
  np.testing.assert_allclose(got, numpy_attention(*args, scale), atol=2e-6, rtol=2e-5)


def test_kernel_masked_slots_have_no_influence():
  # Whatever a masked slot holds (here huge values) must not change the result.
  rng = np.random.default_rng(0)
  q, k, v, mask, kn, vn = random_inputs(rng, 4, 2, 2, 40, 64, valid=0.5)
  out = cpu_decode_attention.decode_attention(q, k, v, mask, kn, vn, 0.125)
  k2, v2 = k.copy(), v.copy()
  k2[~np.broadcast_to(mask[:, None], k.shape[:3])] = 1e4
  v2[~np.broadcast_to(mask[:, None], v.shape[:3])] = -1e4
  np.testing.assert_array_equal(np.asarray(cpu_decode_attention.decode_attention(q, k2, v2, mask, kn, vn, 0.125)),
                                np.asarray(out))


def test_kernel_rejects_other_dtypes():
  rng = np.random.default_rng(0)
  q, k, v, mask, kn, vn = random_inputs(rng, 2, 1, 1, 8, 8)
  with pytest.raises(TypeError, match="k_cache must be float32"):
    cpu_decode_attention.decode_attention(q, k.astype(np.float16), v, mask, kn, vn, 1.0)


def test_build_failure_names_the_source(tmp_path, monkeypatch):
  monkeypatch.setenv("QSFT_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
  with pytest.raises(RuntimeError, match="decode_attention.cc"):
    cpu_decode_attention.build()
  assert not list(tmp_path.glob("*.so"))  # nothing half-written is left to be loaded later


def test_sampler_picks_the_kernel_on_one_float32_cpu_device_only():
  config = get_preset("tiny-llama", vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64)
  sampler = Sampler(config, cache_len=32)
  assert sampler.decode_attention == "cpu_kernel"
  assert sampler.model.decode_attention is cpu_decode_attention.decode_attention
  assert sampler.config == config  # the model config is kept as given
  mesh = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
  assert Sampler(config, mesh=mesh, cache_len=32).decode_attention == "multiply_reduce"
  with pytest.raises(ValueError, match="runs on one device; this mesh has 2"):
    Sampler(config, mesh=mesh, cache_len=32, decode_attention="cpu_kernel")
  # bfloat16 models keep XLA's path; asking for the kernel there is an error.
  assert Sampler(config.replace(dtype="bfloat16"), cache_len=32).decode_attention == "multiply_reduce"
  with pytest.raises(ValueError, match="needs a float32 model"):
    Sampler(config.replace(dtype="bfloat16"), cache_len=32, decode_attention="cpu_kernel")
  # An explicit choice is kept; the dot is the model's own computation (no plug-in).
  dot = Sampler(config, cache_len=32, decode_attention="dot")
  assert dot.decode_attention == "dot" and dot.model.decode_attention is None
  with pytest.raises(ValueError, match=r"decode_attention='fast'; expected one of \('auto', 'dot'"):
    Sampler(config, cache_len=32, decode_attention="fast")


def test_auto_picks_the_dot_off_the_cpu():
  class Device:
    platform = "tpu"

  assert choose_decode_attention("auto", [Device()], "float32") == "dot"
  assert choose_decode_attention("multiply_reduce", [Device()], "bfloat16") == "multiply_reduce"
  with pytest.raises(ValueError, match="runs on the CPU; these devices are \\['tpu'\\]"):
    choose_decode_attention("cpu_kernel", [Device()], "float32")


def test_kernel_under_vmap_treats_leading_dims_as_rows():
  # jax.vmap passes a leading axis (e.g. [models, B, ...]); the kernel folds it into its rows.
  rng = np.random.default_rng(1)
  stacked = [np.stack(x) for x in zip(*(random_inputs(rng, 3, 2, 2, 9, 8) for _ in range(2)))]
  got = np.asarray(jax.vmap(lambda *a: cpu_decode_attention.decode_attention(*a, 0.3))(*stacked))
  for m in range(2):
    np.testing.assert_allclose(got[m], numpy_attention(*(x[m] for x in stacked), 0.3), atol=2e-6, rtol=2e-5)
