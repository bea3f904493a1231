"""Sharding on 8 simulated CPU devices: meshes, rule resolution, sharded init, batches."""
import math
import re
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qsft_jax import sharding
from qsft_jax.models import sharded
from qsft_jax.models.config import get_preset
from qsft_jax.models.transformer import Transformer, init_cache, stack_layers

# heads=4 and kv_heads=2 divide tensor=2; vocab 128 and d_model 32 divide every mesh below.
# One layer keeps the 8-device compiles short; layer stacking is covered by test_transformer.
CONFIG = get_preset("tiny-llama", d_model=32, head_dim=8, mlp_dim=64, vocab_size=50, pad_vocab_multiple=64,
                    tie_embeddings=False, num_layers=1)
RULES = sharding.DEFAULT_RULES

# The parameter table of the model contract, written out independently of the model code:
# leaf path pattern -> logical axes.
CONTRACT_AXES = [
    (r"embed/embedding", ("vocab", "embed")),
    (r"pos_embed/embedding", (None, "embed")),
    (r".*norm/(scale|bias)", ("embed",)),
    (r".*attn/q/kernel", ("embed", "heads", "head_dim")),
    (r".*attn/q/bias", ("heads", "head_dim")),
    (r".*attn/[kv]/kernel", ("embed", "kv_heads", "head_dim")),
    (r".*attn/[kv]/bias", ("kv_heads", "head_dim")),
    (r".*attn/o/kernel", ("heads", "head_dim", "embed")),
    (r".*attn/o/bias", ("embed",)),
    (r".*mlp/(gate|up)/kernel", ("embed", "mlp")),
    (r".*mlp/up/bias", ("mlp",)),
    (r".*mlp/down/kernel", ("mlp", "embed")),
    (r".*mlp/down/bias", ("embed",)),
    (r"lm_head/kernel", ("embed", "vocab")),
]
# DEFAULT_RULES for parameters (no "batch" dimension in a parameter): logical -> mesh axes.
PARAM_RULES = {"vocab": ("tensor",), "embed": ("fsdp",), "heads": ("tensor",), "kv_heads": ("tensor",),
               "mlp": ("tensor",)}

MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]


def _contract_axes(path: str):
  if path.startswith("layers/"):  # scanned layout: a leading "layers" axis
    return ("layers",) + _contract_axes("layers_0/" + path[len("layers/"):])
  for pattern, axes in CONTRACT_AXES:
    if re.fullmatch(pattern, path):
      return axes
  raise AssertionError(f"parameter {path} is not in the contract table")


def _path(keypath) -> str:
  return "/".join(k.key for k in keypath)


def _batch(seed=0, rows=8, length=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CONFIG.vocab_size, size=(rows, length)).astype(np.int32)
  # Two packed episodes per row plus padding, so segment masking is exercised under sharding too.
  segments = np.where(np.arange(length) < 5, 1, np.where(np.arange(length) < 10, 2, 0))
  segments = np.broadcast_to(segments, (rows, length)).astype(np.int32)
  positions = np.where(segments == 2, np.arange(length) - 5, np.arange(length) * (segments == 1))
  return {"tokens": tokens, "positions": positions.astype(np.int32), "segment_ids": segments}


def _loss(params, batch, config=CONFIG):
  logits = Transformer(config).apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
  logp = jax.nn.log_softmax(logits[..., :config.vocab_size])
  picked = jnp.take_along_axis(logp[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
  weights = (batch["segment_ids"][:, 1:] != 0).astype(jnp.float32)
  return -(picked * weights).sum() / weights.sum(), logits


def _single_device_reference(config=CONFIG):
  dummy = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(lambda r: nn.unbox(Transformer(config).init(r, dummy, dummy, dummy + 1)))(jax.random.key(0))
  batch = _batch()
  (loss, logits), grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=2)(
      params, batch, config)
  return params, batch, loss, logits, grad


def _check_shard_shapes_follow_rule_table(params, mesh):
  """Each parameter's shards have the shapes the contract's axes + DEFAULT_RULES imply."""
  sizes = dict(mesh.shape)
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(params["params"]):
    axes = _contract_axes(_path(keypath))
    used = set()
    expected = []
    for dim, name in zip(leaf.shape, axes):
      mesh_axes = PARAM_RULES.get(name, ())
      n = math.prod(sizes[a] for a in mesh_axes)
      if mesh_axes and not used.intersection(mesh_axes) and dim % n == 0:
        used.update(mesh_axes)
        dim //= n
      expected.append(dim)
    assert len(leaf.addressable_shards) == mesh.size
    for shard in leaf.addressable_shards:
      assert shard.data.shape == tuple(expected), (_path(keypath), shard.data.shape, expected)


@pytest.fixture(scope="module")
def reference():
  return _single_device_reference()


def test_make_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh({"data": -1}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match=r"mesh shape \{'data': 3\} needs 3 devices, but there are 8 devices"):
    sharding.make_mesh({"data": 3})
  with pytest.raises(ValueError, match=r"does not fit 8 devices"):
    sharding.make_mesh({"data": -1, "tensor": 3})
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.make_mesh({"model": 8})
  assert dict(sharding.make_mesh({"data": 4}, devices=jax.devices()[:4]).shape)["data"] == 4


def test_rule_resolution_divisibility_and_used_axes():
  sizes = {"data": 2, "fsdp": 2, "tensor": 2}
  spec = sharding.logical_to_mesh_spec
  assert spec(("embed", "heads", "head_dim"), (32, 4, 8), sizes, RULES) == P("fsdp", "tensor", None)
  # kv_heads=3 does not divide tensor=2: that dimension is replicated, the others still sharded.
  assert spec(("embed", "kv_heads", "head_dim"), (32, 3, 8), sizes, RULES) == P("fsdp", None, None)
  # batch takes (data, fsdp) first, so an activation's embed dim cannot reuse fsdp.
  assert spec(("batch", "length", "embed"), (8, 5, 32), sizes, RULES) == P(("data", "fsdp"), None, None)
  # A later rule for the same logical name is the fallback when the first does not divide.
  rules = (("batch", ("data", "fsdp")), ("batch", "data"))
  assert spec(("batch",), (2,), sizes, rules) == P("data")
  assert spec(("batch",), (3,), sizes, rules) == P(None)
  with pytest.raises(ValueError, match="names mesh axes \\['model'\\]"):
    spec(("embed",), (4,), sizes, (("embed", "model"),))


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_init_forward_and_gradient_match_single_device(mesh_shape, reference):
  params_ref, batch, loss_ref, logits_ref, grad_ref = reference
  mesh = sharding.make_mesh(mesh_shape)
  params = sharded.init_params_sharded(CONFIG, jax.random.key(0), mesh, RULES)
  # Sharded init draws the same numbers as the single-device init (up to float rounding of the
  # normal sampler, which XLA may fuse differently per sharding).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), params, params_ref)
  _check_shard_shapes_follow_rule_table(params, mesh)
  global_batch = sharding.global_batch_from_host_local(batch, mesh, RULES)
  shardings = sharded.param_shardings(Transformer(CONFIG), CONFIG, mesh, RULES)
  step = jax.jit(jax.value_and_grad(_loss, has_aux=True), out_shardings=((None, None), shardings))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    (loss, logits), grad = step(params, global_batch)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(logits, logits_ref, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grad, grad_ref)
  # Gradients come back sharded like the params (what the optimizer update expects).
  jax.tree.map(lambda g, s: (g.sharding.is_equivalent_to(s, g.ndim) or pytest.fail(str(g.sharding))),
               grad, shardings)


def test_indivisible_kv_heads_fall_back_to_replication_scanned_remat():
  # kv_heads=3 over tensor=2; also the scanned + rematerialised layout under a mesh.
  config = CONFIG.replace(num_heads=6, num_kv_heads=3, num_layers=2, scan_layers=True, remat_policy="full")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params_ref, batch, loss_ref, logits_ref, grad_ref = _single_device_reference(config)
  params = sharded.shard_params(jax.tree.map(np.asarray, params_ref), config, mesh, RULES)
  layers = params["params"]["layers"]["attn"]
  assert layers["k"]["kernel"].addressable_shards[0].data.shape == (2, 16, 3, 8)  # kv_heads replicated
  assert layers["q"]["kernel"].addressable_shards[0].data.shape == (2, 16, 3, 8)  # 6 heads / tensor 2
  _check_shard_shapes_follow_rule_table(params, mesh)
  global_batch = sharding.global_batch_from_host_local(batch, mesh, RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    (loss, logits), grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=2)(
        params, global_batch, config)
  np.testing.assert_allclose(logits, logits_ref, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grad, grad_ref)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_kv_cache_decoding_matches_full_forward(reference, scan_layers):
  params_ref, batch, _, _, _ = reference
  config = CONFIG.replace(scan_layers=scan_layers)
  if scan_layers:
    params_ref = stack_layers(params_ref, config.num_layers)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params = sharded.shard_params(jax.tree.map(np.asarray, params_ref), config, mesh, RULES)
  tokens = batch["tokens"][:4, :7]  # 4 rows over data x fsdp; prefill 5, then 2 decode steps
  cache_sharding = sharded.cache_shardings(config, 4, 8, mesh, RULES)
  layer_spec = (("data", "fsdp"), "tensor", None, None)  # [B, K, S, Dh]
  if scan_layers:
    assert cache_sharding["k"].spec == P(None, *layer_spec)  # stacked [layers, B, K, S, Dh]
  else:
    assert len(cache_sharding["k"]) == config.num_layers
    assert all(s.spec == P(*layer_spec) for s in cache_sharding["k"] + cache_sharding["v"])
  cache = jax.device_put(init_cache(config, 4, 8), cache_sharding)
  model = Transformer(config)
  step = jax.jit(lambda p, c, t, pos: model.apply(p, t, pos, jnp.ones_like(t), cache=c),
                 out_shardings=(None, cache_sharding), donate_argnums=1)
  positions = np.broadcast_to(np.arange(7), (4, 7)).astype(np.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    prefill, cache = step(params, cache, tokens[:, :5], positions[:, :5])
    decoded = [prefill]
    for t in (5, 6):
      logits, cache = step(params, cache, tokens[:, t:t + 1], positions[:, t:t + 1])
      decoded.append(logits)
  jax.tree.map(lambda c, s: np.testing.assert_(c.sharding.is_equivalent_to(s, c.ndim)), cache["k"], cache_sharding["k"])
  full = model.apply(params_ref, tokens, positions, np.ones_like(tokens))
  np.testing.assert_allclose(np.concatenate(decoded, 1), full, atol=1e-5, rtol=1e-5)


def test_fsdp_parameter_bytes_shrink_as_one_over_n():
  dummy = jnp.zeros((1, 1), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: Transformer(CONFIG).init(jax.random.key(0), dummy, dummy, dummy + 1)))
  host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)

  def bytes_on_first_device(n):
    devices = jax.devices()[:n]
    params = sharded.shard_params(host, CONFIG, sharding.make_mesh({"fsdp": n}, devices=devices), RULES)
    return sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards
               if s.device == devices[0])

  full = bytes_on_first_device(1)
  assert full == 4 * sum(x.size for x in jax.tree.leaves(host))
  for n in (2, 4, 8):
    # Every leaf has an embed (fsdp) dimension that divides 8, so the split is exact.
    assert bytes_on_first_device(n) * n == full, n


def test_shard_params_from_host_tree():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  dummy = jnp.zeros((1, 1), jnp.int32)
  host = jax.tree.map(np.asarray, nn.unbox(Transformer(CONFIG).init(jax.random.key(3), dummy, dummy, dummy + 1)))
  expected = sharded.param_shardings(Transformer(CONFIG), CONFIG, mesh, RULES)
  for tree, want in ((host, expected), (host["params"], expected["params"])):
    placed = sharded.shard_params(tree, CONFIG, mesh, RULES)
    jax.tree.map(lambda x, h: np.testing.assert_array_equal(np.asarray(x), h), placed, tree)
    jax.tree.map(lambda x, s: (x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(x.sharding))),
                 placed, want)
  bad = jax.tree.map(lambda x: x, host)
  bad["params"]["final_norm"]["scale"] = np.ones(7, np.float32)
  with pytest.raises(ValueError, match=r"\['params'\]\['final_norm'\]\['scale'\] has shape \(7,\)"):
    sharded.shard_params(bad, CONFIG, mesh, RULES)
  del bad["params"]["final_norm"]
  with pytest.raises(ValueError, match="params tree does not match"):
    sharded.shard_params(bad, CONFIG, mesh, RULES)


def test_global_batch_from_host_local_round_trip():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  batch = {**_batch(rows=16, length=6), "done": np.arange(16) % 2 == 0, "rewards": np.random.rand(16, 6).astype(np.float32)}
  out = sharding.global_batch_from_host_local(batch, mesh, RULES)
  for key, value in batch.items():
    assert out[key].shape == value.shape and out[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(out[key]), value)
    # Rows split over data x fsdp = 8 devices: 2 rows each, each device holding its own rows.
    for shard in out[key].addressable_shards:
      assert shard.data.shape[0] == 2
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
  assert sharding.batch_sharding(mesh, RULES).spec == P(("data", "fsdp"), None)


_TWO_PROCESS_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from qsft_jax import sharding
    mesh = sharding.make_mesh({"data": -1})  # the 4 devices of both processes
    full = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    local = full[pid * 4:(pid + 1) * 4]  # this process's rows of the global batch
    x = sharding.global_batch_from_host_local({"tokens": local}, mesh, sharding.DEFAULT_RULES)["tokens"]
    assert x.shape == (8, 3), x.shape
    # A computation over the global array sees every row in its global place.
    total = jax.jit(lambda a: (a * jax.numpy.arange(1, 9)[:, None]).sum())(x)
    assert int(total) == int((full * np.arange(1, 9)[:, None]).sum()), int(total)
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
      assert shard.index[0].start // 4 == pid
    print("OK", pid, jax.process_count(), len(jax.devices()))
""")


def test_global_batch_from_host_local_two_processes(tmp_path):
  """Two local processes joined by jax.distributed (gloo on the CPU) build one global batch."""
  script = tmp_path / "worker.py"
  script.write_text(_TWO_PROCESS_WORKER)
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = str(sock.getsockname()[1])
  procs = [subprocess.Popen([sys.executable, str(script), port, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
    outputs.append(out)
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and f"OK {i} 2 4" in out, out[-3000:]
