"""Quantised frozen base (qsft_jax.models.quant, quant_base): the NF4 table, int8 / nf4 codes against numpy
references written here, round-trip error bounds, the model on a quantised base, sharding on 8 devices."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy.stats import norm

from qsft_jax import sharding
from qsft_jax.models import quant, quant_base
from qsft_jax.models.config import get_preset
from qsft_jax.models.transformer import Transformer, stack_layers, unstack_layers

# QLoRA's NF4 data type as published (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 constants).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]

TARGETS = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")
# d_model 96 = 1.5 nf4 blocks (a padded block); attn/o's input H * Dh = 4 * 24 = 96 too.
CONFIG = get_preset("tiny-llama", d_model=96, head_dim=24, mlp_dim=128, vocab_size=50, pad_vocab_multiple=64,
                    tie_embeddings=False)


def lora(quantization, base_dtype="float32", targets=TARGETS):
  return types.SimpleNamespace(rank=4, targets=targets, base_dtype=base_dtype, quantization=quantization)


def init_params(config, seed=0):
  dummy = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda r: nn.unbox(Transformer(config).init(r, dummy, dummy, dummy + 1)))
  return init(jax.random.key(seed))


def batch(rows=2, length=7):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CONFIG.vocab_size, size=(rows, length)).astype(np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
  return tokens, positions, np.ones((rows, length), np.int32)


def quantize_base(params, config, lora_config):
  return jax.jit(lambda p: quant_base.quantize_base(p, config, lora_config))(params)


def is_q(x):
  return isinstance(x, quant.QuantizedArray)


def dequantize_tree(tree, dtype=None):
  return jax.tree.map(lambda x: quant.dequantize(x, dtype) if is_q(x) else x, tree, is_leaf=is_q)


# ---------------------------------------------------------------------------------------------------
# numpy references, written from the format's description (kernel [in..., out...], no leading dims)


def np_int8(w, in_ndim):
  """Per output channel: scale = absmax * float32(1 / 127), code = round-half-even(w / scale)."""
  n_in = int(np.prod(w.shape[:in_ndim]))
  flat = w.astype(np.float32).reshape(n_in, -1)
  codes = np.zeros(flat.shape, np.int8)
  scales = np.zeros(flat.shape[1], np.float32)
  for j in range(flat.shape[1]):
    scales[j] = np.float32(np.abs(flat[:, j]).max()) * np.float32(1 / 127)
    if scales[j] > 0:
      codes[:, j] = np.clip(np.round(flat[:, j] / scales[j]), -127, 127)
  return codes.reshape(w.shape), scales.reshape(w.shape[in_ndim:])


def np_nf4_codes(w, in_ndim):
  """Per output channel, blocks of 64 consecutive (row-major) input values, the last zero-padded:
  codes [n_blocks * 64, n_out] (nearest NF4 entry of w / absmax) and absmax [n_blocks, n_out]."""
  table = np.asarray(PUBLISHED_NF4, np.float32)
  n_in = int(np.prod(w.shape[:in_ndim]))
  flat = w.astype(np.float32).reshape(n_in, -1)
  n_blocks = -(-n_in // 64)
  padded = np.zeros((n_blocks * 64, flat.shape[1]), np.float32)
  padded[:n_in] = flat
  codes = np.zeros(padded.shape, np.int64)
  absmax = np.zeros((n_blocks, flat.shape[1]), np.float32)
  for j in range(flat.shape[1]):
    for b in range(n_blocks):
      block = padded[b * 64:(b + 1) * 64, j]
      absmax[b, j] = np.abs(block).max()
      normed = block / absmax[b, j] if absmax[b, j] > 0 else block
      codes[b * 64:(b + 1) * 64, j] = np.abs(normed[:, None] - table[None, :]).argmin(axis=1)
  return codes, absmax


def np_nf4_unpack(values, n_out):
  """uint8 [n_blocks, 32, out...] -> codes [n_blocks * 64, n_out]: the high nibble holds the even
  position of each pair, the low nibble the odd one."""
  v = values.reshape(values.shape[0], 32, n_out).astype(np.int64)
  codes = np.zeros((values.shape[0], 64, n_out), np.int64)
  codes[:, 0::2] = v >> 4
  codes[:, 1::2] = v & 15
  return codes.reshape(-1, n_out)


# (kernel shape [in..., out...], in_ndim): q [D, H, Dh]; o [H, Dh, D] with 90 inputs (a padded block);
# down [F, D]; and a 1-input-dim kernel whose input is shorter than a block.
SHAPES = [((128, 4, 16), 1), ((3, 30, 40), 2), ((192, 24), 1), ((20, 8), 1)]


def random_kernel(shape, seed):
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal(shape) * rng.uniform(0.01, 0.2)).astype(np.float32)
  w.reshape(-1, w.shape[-1])[:, 0] = 0.0  # an all-zero output channel (zero scale / absmax)
  w.reshape(-1, w.shape[-1])[:64, 1] = 0.0  # an all-zero nf4 block
  return w


def test_nf4_codebook_is_the_published_table():
  np.testing.assert_array_equal(quant.NF4_CODEBOOK, np.asarray(PUBLISHED_NF4, np.float32))
  # And its construction (bitsandbytes' create_normal_map): 8 positive and 7 negative normal quantiles
  # between 1 - offset and offset, exact zero, scaled to [-1, 1].
  offset = 0.9677083
  positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  values = np.sort(np.concatenate([positive, [0.0], negative]))
  np.testing.assert_allclose(quant.NF4_CODEBOOK, values / values.max(), atol=2e-7)


@pytest.mark.parametrize("shape,in_ndim", SHAPES)
def test_int8_codes_and_scales_equal_numpy(shape, in_ndim):
  w = random_kernel(shape, seed=len(shape) + shape[0])
  q = jax.jit(lambda x: quant.quantize(x, "int8", in_ndim))(w)
  codes, scales = np_int8(w, in_ndim)
  assert q.values.dtype == jnp.int8 and q.scales.dtype == jnp.float32 and q.shape == shape
  np.testing.assert_array_equal(np.asarray(q.values), codes)
  np.testing.assert_array_equal(np.asarray(q.scales), scales)
  # Round trip: within half a step of each channel's scale, exactly 0 on the zero channel.
  deq = np.asarray(quant.dequantize(q, jnp.float32))
  np.testing.assert_array_equal(deq, codes.astype(np.float32) * scales)
  bound = np.broadcast_to(scales / 2, shape) * (1 + 1e-6) + 1e-12
  assert (np.abs(deq - w) <= bound).all()


@pytest.mark.parametrize("shape,in_ndim", SHAPES)
def test_nf4_codes_are_the_nearest_entry_and_round_trip_is_bounded(shape, in_ndim):
  w = random_kernel(shape, seed=len(shape) + shape[0])
  q = jax.jit(lambda x: quant.quantize(x, "nf4", in_ndim))(w)
  codes, absmax = np_nf4_codes(w, in_ndim)
  n_out = int(np.prod(shape[in_ndim:]))
  n_blocks = absmax.shape[0]
  assert q.values.dtype == jnp.uint8 and q.values.shape == (n_blocks, 32) + shape[in_ndim:]
  assert q.scales.dtype == jnp.float32 and q.shape == shape
  np.testing.assert_array_equal(np_nf4_unpack(np.asarray(q.values), n_out), codes)
  np.testing.assert_array_equal(np.asarray(q.scales).reshape(n_blocks, n_out), absmax)
  # Dequantised: table[code] * absmax, cut back to the real input length.
  table = np.asarray(PUBLISHED_NF4, np.float32)
  n_in = int(np.prod(shape[:in_ndim]))
  expected = (table[codes].reshape(n_blocks, 64, n_out) * absmax[:, None]).reshape(-1, n_out)[:n_in]
  deq = np.asarray(quant.dequantize(q, jnp.float32))
  np.testing.assert_array_equal(deq, expected.reshape(shape))
  # Each value within half the widest gap of the table (times its block's absmax) of the original.
  per_value_absmax = np.repeat(absmax, 64, axis=0)[:n_in].reshape(shape)
  half_gap = np.diff(table).max() / 2
  assert (np.abs(deq - w) <= half_gap * per_value_absmax * (1 + 1e-6)).all()
  # And on average much closer (normal data): about 5% of the block absmax.
  assert np.abs(deq - w).mean() < 0.1 * np.abs(w).max()


def test_dequantize_casts_once_and_dense_is_astype_for_plain_arrays():
  w = random_kernel((128, 24), seed=3)
  for mode in quant.MODES:
    q = quant.quantize(w, mode)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q, jnp.bfloat16)),
                                  np.asarray(quant.dequantize(q, jnp.float32).astype(jnp.bfloat16)))
    assert quant.dense(q, jnp.bfloat16).dtype == jnp.bfloat16
  assert quant.dense(jnp.asarray(w), jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="mode"):
    quant.quantize(w, "int4")


def test_leading_axis_slices_and_stacks():
  """A stack of kernels (scanned layers) quantises each independently; slicing / stacking the stored
  arrays gives the per-kernel QuantizedArrays (what nn.scan and stack_layers do)."""
  ws = np.stack([random_kernel((3, 30, 40), seed=s) for s in range(3)])
  quantize = jax.jit(quant.quantize, static_argnums=(1, 2, 3))
  for mode in quant.MODES:
    stacked = quantize(ws, mode, 2, 1)
    assert stacked.shape == ws.shape
    singles = [quantize(w, mode, 2, 0) for w in ws]
    for i, single in enumerate(singles):
      sliced = jax.tree.map(lambda x: x[i], stacked)
      assert jax.tree.structure(sliced) == jax.tree.structure(single)
      np.testing.assert_array_equal(np.asarray(sliced.values), np.asarray(single.values))
      np.testing.assert_array_equal(np.asarray(sliced.scales), np.asarray(single.scales))
    restacked = jax.tree.map(lambda *xs: jnp.stack(xs), *singles)
    dequantize = jax.jit(quant.dequantize)
    np.testing.assert_array_equal(np.asarray(dequantize(restacked)), np.asarray(dequantize(stacked)))


@pytest.mark.parametrize("mode,scan", [("int8", False), ("nf4", True)])
def test_transformer_on_quantised_base_equals_dequantised_weights(mode, scan):
  """Logits on the quantised base are exactly those on its dequantised float weights (bf16 compute,
  remat in the scanned case); only the targeted kernels are quantised, the rest is in base_dtype."""
  config = CONFIG.replace(dtype="bfloat16", scan_layers=scan, remat_policy="full" if scan else "none")
  params = init_params(config)
  base = quantize_base(params, config, lora(mode, base_dtype="bfloat16"))
  leaves = jax.tree_util.tree_leaves_with_path(base, is_leaf=is_q)
  paths = {jax.tree_util.keystr(k): x for k, x in leaves}
  quantised = sorted(p for p, x in paths.items() if is_q(x))
  assert len(quantised) == 7 * (1 if scan else config.num_layers)
  assert all(p.endswith("['kernel']") and "lm_head" not in p for p in quantised)
  assert all(x.dtype == jnp.bfloat16 for x in paths.values() if not is_q(x))
  assert all(x.dtype == "bfloat16" for x in paths.values() if is_q(x))

  tokens, positions, segments = batch()
  run = jax.jit(lambda p: Transformer(config).apply(p, tokens, positions, segments))
  got = np.asarray(run(base))
  # (dequantize(q, bf16) is dequantize(q, float32) cast: test_dequantize_casts_once...)
  np.testing.assert_array_equal(got, np.asarray(run(dequantize_tree(base, jnp.bfloat16))))


def test_lora_merge_reads_a_quantised_base_as_its_dequantised_weights():
  from qsft_jax.models import lora as lora_lib
  lc = lora_lib.LoraConfig(rank=4, quantization="int8")
  config = CONFIG.replace(scan_layers=True)
  dummy = jnp.zeros((1, 1), jnp.int32)
  variables = jax.jit(lambda r: nn.unbox(Transformer(config, lora=lc).init(r, dummy, dummy, dummy + 1)))(
      jax.random.key(0))
  variables["lora"] = jax.tree.map(lambda x: x + 0.1, variables["lora"])
  base = quantize_base(variables["params"], config, lc)
  merged = lora_lib.merge({"params": base, "lora": variables["lora"]}, config, lc)
  # W + scale * A.B from the float32 dequantised kernel, stored in the base's dtype (bf16).
  expected = lora_lib.merge({"params": dequantize_tree(base, jnp.float32), "lora": variables["lora"]}, config,
                            lc)
  assert jax.tree.structure(merged) == jax.tree.structure(expected)
  jax.tree.map(lambda m, e: np.testing.assert_array_equal(m, e.astype(m.dtype)), merged, expected)
  assert merged["params"]["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16


def test_quantize_base_targets_and_layouts():
  """Only kernels whose module path a target pattern matches; eval_shape gives the same tree;
  unstack_layers / stack_layers carry a quantised base between layouts."""
  params = init_params(CONFIG)
  base = quantize_base(params, CONFIG, lora("nf4", targets=("attn/q$",)))
  quantised = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(base, is_leaf=is_q)
               if is_q(x)]
  assert quantised == [f"['params']['layers_{i}']['attn']['q']['kernel']" for i in range(CONFIG.num_layers)]
  abstract = jax.eval_shape(lambda p: quant_base.quantize_base(p, CONFIG, lora("nf4")), params)
  concrete = quantize_base(params, CONFIG, lora("nf4"))
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
  layout = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
  assert layout(abstract) == layout(concrete)
  assert jax.tree.structure(quant_base.base_shapes(CONFIG, lora("nf4"))) == jax.tree.structure(concrete)
  scanned = stack_layers(concrete, CONFIG.num_layers)
  scan_base = quantize_base(stack_layers(params, CONFIG.num_layers), CONFIG.replace(scan_layers=True),
                                  lora("nf4"))
  assert jax.tree.structure(scanned) == jax.tree.structure(scan_base)
  jax.tree.map(np.testing.assert_array_equal, scanned, scan_base)
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(scan_base), concrete)


def test_quantised_base_shards_by_the_rule_table():
  """On a data x fsdp x tensor = 2 x 2 x 2 mesh: the stored arrays' shards follow the kernel's axis
  names (blocked input axis: the first input dim's name; within-block axis replicated), and the
  sharded forward on the nf4 base equals the single-device one."""
  assert len(jax.devices()) == 8
  config = CONFIG.replace(d_model=128, head_dim=32)  # nf4 blocks of D: 2, divisible by fsdp = 2
  params = init_params(config)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  tokens, positions, segments = batch(rows=4)
  for mode in quant.MODES:
    lc = lora(mode)
    shardings = quant_base.base_shardings(config, lc, mesh, rules)
    base = jax.jit(lambda p: quant_base.quantize_base(p, config, lc), out_shardings=shardings)(params)
    layer = base["params"]["layers_0"]
    # Expected PartitionSpecs from DEFAULT_RULES (embed -> fsdp, heads / kv_heads / mlp -> tensor).
    if mode == "int8":
      expected = {"attn/q": (P("fsdp", "tensor", None), P("tensor", None)),
                  "attn/o": (P("tensor", None, "fsdp"), P("fsdp")),
                  "mlp/down": (P("tensor", "fsdp"), P("fsdp"))}
    else:
      expected = {"attn/q": (P("fsdp", None, "tensor", None), P("fsdp", "tensor", None)),
                  "attn/o": (P("tensor", None, "fsdp"), P("tensor", "fsdp")),
                  "mlp/down": (P("tensor", None, "fsdp"), P("tensor", "fsdp"))}
    for name, (values_spec, scales_spec) in expected.items():
      module, proj = name.split("/")
      q = layer[module][proj]["kernel"]
      assert q.values.sharding.spec == values_spec, (mode, name, q.values.sharding.spec)
      assert q.scales.sharding.spec == scales_spec, (mode, name, q.scales.sharding.spec)
    assert layer["attn_norm"]["scale"].sharding.spec == P("fsdp")
    if mode == "int8":
      continue
    single = jax.device_get(base)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      sharded = jax.jit(lambda p: Transformer(config).apply(p, tokens, positions, segments))(base)
    reference = jax.jit(lambda p: Transformer(config).apply(p, tokens, positions, segments))(single)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(reference), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# QLoRA train states (phases.build with model.lora.quantization)


ONE_LAYER = CONFIG.replace(num_layers=1)


def qlora_program(quantization, mesh, phase="qsft"):
  from qsft_jax import config_lib, phases
  c = config_lib.base_config()
  c.loss.chunk_size = 8
  c.model.lora.update(rank=4, quantization=quantization)
  return phases.build(c, phase, ONE_LAYER, mesh, sharding.DEFAULT_RULES)


def test_qlora_step_runs_on_the_quantised_base_as_on_its_dequantised_weights():
  """phases.build with model.lora.quantization = "nf4": the state's base holds the targeted kernels as
  QuantizedArrays (with the shardings of quant_base.base_shardings, tested above) in both phases; the BC
  step returns the base unchanged, and its loss equals the plain LoRA step's on the dequantised base
  (float32, the compute dtype here)."""
  from qsft_jax.models.lora import LoraConfig
  import mdp_utils  # tests/mdp_utils.py
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  qsft = qlora_program("nf4", mesh, "qsft")
  abstract = qsft.abstract_state(sharded_shapes(qsft))
  assert jax.tree.structure(abstract["base"]) == jax.tree.structure(qsft.state_shardings["base"])
  kernels = [x for x in jax.tree.leaves(abstract["base"], is_leaf=is_q) if is_q(x)]
  assert len(kernels) == 7 * ONE_LAYER.num_layers and all(k.mode == "nf4" for k in kernels)

  program, plain = qlora_program("nf4", mesh, "bc"), qlora_program("none", mesh, "bc")
  dummy = jnp.zeros((1, 1), jnp.int32)
  variables = jax.jit(lambda r: nn.unbox(Transformer(ONE_LAYER, lora=LoraConfig(rank=4)).init(
      r, dummy, dummy, dummy + 1)))(jax.random.key(0))
  rng = np.random.default_rng(0)
  variables["lora"] = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                                   variables["lora"])
  with jax.set_mesh(mesh):
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)(variables)
  assert jax.tree.structure(state["base"]) == jax.tree.structure(abstract["base"])
  host = jax.device_get(state)  # (the steps donate their state)
  dequantised = {**host, "base": dequantize_tree(host["base"], jnp.float32)}
  batch = sharding.global_batch_from_host_local(
      mdp_utils.random_batch(np.random.default_rng(0), 4, 16, ONE_LAYER.vocab_size), mesh,
      sharding.DEFAULT_RULES)
  before = host["base"]
  _, plain_metrics = plain.step(dequantised, batch)
  new_state, metrics = program.step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["loss"]) == float(plain_metrics["loss"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state["base"]), before)


def sharded_shapes(program):
  from qsft_jax.models import sharded
  return sharded.param_shapes(program.model, ONE_LAYER)


def test_trainer_and_run_load_build_the_same_quantised_base():
  """The trainer (main: its base, then quant_base.quantized_base) and run.load (run.lora_base) store
  the same QLoRA base: same checksum (what a restore checks), QuantizedArrays in the rule table's shards."""
  from qsft_jax import config_lib, main, run
  from qsft_jax.models import lora as lora_lib
  from qsft_jax.models import sharded
  c = config_lib.base_config()
  c.model.lora.update(rank=4, quantization="int8")
  lc = lora_lib.LoraConfig.from_config(c.model.lora)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  rules = sharding.DEFAULT_RULES
  fresh = lambda offset: sharded.init_params_sharded(ONE_LAYER, jax.random.key(c.seed + offset), mesh, rules)
  trained_over = quant_base.quantized_base(main.lora_base(c, lc, None, fresh), ONE_LAYER, lc, mesh, rules)
  loaded = run.lora_base(c, ONE_LAYER, lc, mesh, rules)
  assert lora_lib.base_checksum(trained_over) == lora_lib.base_checksum(loaded)
  q = loaded["params"]["layers_0"]["mlp"]["down"]["kernel"]
  assert is_q(q) and q.values.sharding.spec == P("tensor", "fsdp")  # (mlp, embed)
