"""Transformer: masking, padded vocabulary, layouts (scan/remat/bf16), KV cache, configs.

Golden references: Hugging Face's PyTorch Llama / Qwen2 / GPT-2 with the same (random) weights, and
transformers' own config classes and parameter counts.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsft_jax.models import config as config_lib
from qsft_jax.models.config import ModelConfig, flops_per_token, from_hf_config, get_preset, param_count
from qsft_jax.models.transformer import (PAD_LOGIT, Transformer, init_cache, logits_from_hidden, rotary_inv_freq,
                                         stack_layers, unembedding, unstack_layers)
from qsft_jax.sampler import DECODE_ATTENTION  # the decode-step plug-ins, held against full forwards

# Small enough to compile in about a second; GQA (4 query heads over 2 kv heads) in the llama one.
LLAMA = get_preset("tiny-llama", d_model=32, head_dim=8, mlp_dim=64, vocab_size=50, pad_vocab_multiple=64)
GPT2 = get_preset("tiny-gpt2", d_model=32, head_dim=8, mlp_dim=64, vocab_size=50, pad_vocab_multiple=64)
CONFIGS = {"llama": LLAMA, "gpt2": GPT2}


def randomized_params(config, seed=0, scale=0.1):
  """Init, then perturb every leaf (biases and norm scales included) so no term is trivially 0/1."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(Transformer(config).init(jax.random.key(seed), tokens, tokens, tokens + 1))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def apply(config, method=None):
  """model.apply, run op by op: for these tiny one-off calls that beats compiling each shape."""
  return functools.partial(Transformer(config).apply, method=method)


def forward(config, params, tokens, positions=None, segment_ids=None):
  tokens = jnp.asarray(tokens, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  return apply(config)(params, tokens, jnp.asarray(positions, jnp.int32),
                              jnp.asarray(segment_ids, jnp.int32))


def random_tokens(shape, config, seed=0):
  return np.random.default_rng(seed).integers(1, config.vocab_size, size=shape).astype(np.int32)


# ---------------------------------------------------------------- golden PyTorch references


def _to_torch_state(config, params):
  """Our param tree -> HF PyTorch state dict (written independently of the weights module)."""
  import torch
  p = jax.tree.map(np.asarray, params["params"])
  d, v = config.d_model, config.vocab_size
  t = lambda x: torch.tensor(np.ascontiguousarray(x))
  sd = {}
  if config.family == "llama":
    sd["model.embed_tokens.weight"] = t(p["embed"]["embedding"][:v])
    sd["model.norm.weight"] = t(p["final_norm"]["scale"])
    sd["lm_head.weight"] = t((p["lm_head"]["kernel"] if "lm_head" in p else p["embed"]["embedding"].T)[:, :v].T)
    for i in range(config.num_layers):
      lp, pre = p[f"layers_{i}"], f"model.layers.{i}."
      for n in "qkv":
        sd[pre + f"self_attn.{n}_proj.weight"] = t(lp["attn"][n]["kernel"].reshape(d, -1).T)
        if "bias" in lp["attn"][n]:
          sd[pre + f"self_attn.{n}_proj.bias"] = t(lp["attn"][n]["bias"].reshape(-1))
      sd[pre + "self_attn.o_proj.weight"] = t(lp["attn"]["o"]["kernel"].reshape(-1, d).T)
      for n in ("gate", "up", "down"):
        sd[pre + f"mlp.{n}_proj.weight"] = t(lp["mlp"][n]["kernel"].T)
      sd[pre + "input_layernorm.weight"] = t(lp["attn_norm"]["scale"])
      sd[pre + "post_attention_layernorm.weight"] = t(lp["mlp_norm"]["scale"])
  else:
    sd["transformer.wte.weight"] = t(p["embed"]["embedding"][:v])
    sd["transformer.wpe.weight"] = t(p["pos_embed"]["embedding"])
    sd["transformer.ln_f.weight"] = t(p["final_norm"]["scale"])
    sd["transformer.ln_f.bias"] = t(p["final_norm"]["bias"])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    for i in range(config.num_layers):
      lp, pre = p[f"layers_{i}"], f"transformer.h.{i}."
      a = lp["attn"]
      sd[pre + "attn.c_attn.weight"] = t(np.concatenate([a[n]["kernel"].reshape(d, -1) for n in "qkv"], 1))
      sd[pre + "attn.c_attn.bias"] = t(np.concatenate([a[n]["bias"].reshape(-1) for n in "qkv"]))
      sd[pre + "attn.c_proj.weight"] = t(a["o"]["kernel"].reshape(-1, d))
      sd[pre + "attn.c_proj.bias"] = t(a["o"]["bias"])
      sd[pre + "mlp.c_fc.weight"] = t(lp["mlp"]["up"]["kernel"])
      sd[pre + "mlp.c_fc.bias"] = t(lp["mlp"]["up"]["bias"])
      sd[pre + "mlp.c_proj.weight"] = t(lp["mlp"]["down"]["kernel"])
      sd[pre + "mlp.c_proj.bias"] = t(lp["mlp"]["down"]["bias"])
      for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        sd[pre + f"{theirs}.weight"] = t(lp[ours]["scale"])
        sd[pre + f"{theirs}.bias"] = t(lp[ours]["bias"])
  return sd


def _torch_model(kind, config):
  import transformers
  c = config
  if kind == "gpt2":
    hf = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_position_embeddings,
                                 n_embd=c.d_model, n_layer=c.num_layers, n_head=c.num_heads,
                                 n_inner=c.mlp_dim, layer_norm_epsilon=c.norm_eps,
                                 activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0)
    cls = transformers.GPT2LMHeadModel
  else:
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_dim,
              num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
              num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
              max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_embeddings,
              rope_theta=c.rope_theta)
    if kind == "qwen2":
      hf, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    else:
      hf, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
  hf._attn_implementation = "eager"
  return hf, cls(hf).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_logits_match_pytorch_reference(kind):
  torch = pytest.importorskip("torch", reason="PyTorch is the golden reference (test-only dependency)")
  config = {"llama": LLAMA.replace(tie_embeddings=False, rope_theta=500.0),
            "qwen2": LLAMA.replace(qkv_bias=True, tie_embeddings=False),
            "gpt2": GPT2}[kind]
  hf_config, torch_model = _torch_model(kind, config)
  # Our config derived from the HF one must be the same model.
  assert from_hf_config(hf_config.to_dict(), pad_vocab_multiple=config.pad_vocab_multiple) == config
  params = randomized_params(config)
  missing, unexpected = torch_model.load_state_dict(_to_torch_state(config, params), strict=False)
  assert not unexpected and all("rotary" in m or "attn.bias" in m for m in missing), (missing, unexpected)
  tokens = random_tokens((2, 11), config)
  with torch.no_grad():
    expected = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  logits = np.asarray(forward(config, params, tokens))
  np.testing.assert_allclose(logits[..., :config.vocab_size], expected, atol=2e-5, rtol=1e-4)


def test_llama3_rope_scaling_matches_transformers():
  pytest.importorskip("torch", reason="transformers' RoPE reference computes with PyTorch (test-only dependency)")
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}
  hf = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=500000.0,
                   max_position_embeddings=512, rope_scaling=scaling)
  ours = from_hf_config(hf.to_dict())
  assert dict(ours.rope_scaling)["factor"] == 8.0
  expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  np.testing.assert_allclose(rotary_inv_freq(ours), expected.numpy(), rtol=1e-6)
  # The scaling really changes something for this context length.
  assert not np.allclose(rotary_inv_freq(ours.replace(rope_scaling=None)), expected.numpy(), rtol=1e-3)


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packing_equals_running_each_sequence_alone(family):
  config = CONFIGS[family]
  params = randomized_params(config)
  lengths = [5, 4, 3]  # three episodes packed into a row of 14, two pads at the end
  seqs = [random_tokens((1, n), config, seed=i) for i, n in enumerate(lengths)]
  tokens = np.concatenate([s[0] for s in seqs] + [np.zeros(2, np.int32)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(2, int)])[None]
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(2, int)])[None]
  packed = np.asarray(forward(config, params, tokens, positions, segments))
  start = 0
  for seq, n in zip(seqs, lengths):
    alone = np.asarray(forward(config, params, seq))
    np.testing.assert_allclose(packed[0, start:start + n], alone[0], atol=1e-5, rtol=1e-5)
    start += n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_future_tokens_do_not_change_past_logits(family):
  config = CONFIGS[family]
  params = randomized_params(config)
  tokens = random_tokens((1, 9), config)
  changed = tokens.copy()
  changed[0, 6] = (changed[0, 6] % (config.vocab_size - 1)) + 1
  a, b = np.asarray(forward(config, params, tokens)), np.asarray(forward(config, params, changed))
  np.testing.assert_array_equal(a[0, :6], b[0, :6])
  assert np.abs(a[0, 6:] - b[0, 6:]).max(axis=-1).min() > 1e-4  # every later row sees the change


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
def test_padded_vocab_masked_and_logits_equal_hidden_times_unembedding(family, tied):
  config = CONFIGS[family].replace(tie_embeddings=tied)
  params = randomized_params(config)
  tokens = random_tokens((2, 6), config)
  positions = np.broadcast_to(np.arange(6), (2, 6))
  logits = np.asarray(forward(config, params, tokens))
  assert logits.dtype == np.float32 and logits.shape == (2, 6, config.padded_vocab_size)
  assert np.all(logits[..., config.vocab_size:] == PAD_LOGIT)
  assert np.all(np.isfinite(logits)) and np.abs(logits[..., :config.vocab_size]).max() < 100
  hidden = apply(config, "hidden_states")(params, tokens, positions, np.ones_like(tokens))
  assert hidden.shape == (2, 6, config.d_model)
  unembed = unembedding(params, config)
  assert unembed.shape == (config.d_model, config.padded_vocab_size)
  np.testing.assert_array_equal(unembed, unembedding(params))  # tying read off the tree agrees
  np.testing.assert_allclose(np.asarray(hidden @ unembed)[..., :config.vocab_size],
                             logits[..., :config.vocab_size], atol=1e-5, rtol=1e-5)
  # A vocabulary chunk (columns 40..63, straddling vocab_size=50) is masked by its global ids.
  chunk = np.asarray(logits_from_hidden(hidden, unembed[:, 40:], config.vocab_size, vocab_offset=40))
  np.testing.assert_allclose(chunk, logits[..., 40:], atol=1e-5, rtol=1e-5)
  assert np.all(chunk[..., 10:] == PAD_LOGIT) and np.all(chunk[..., :10] > PAD_LOGIT)


# ---------------------------------------------------------------- layouts and numerics


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scan_layers_matches_unrolled(family):
  config = CONFIGS[family].replace(num_layers=3)
  params = randomized_params(config)
  scanned_config = config.replace(scan_layers=True)
  stacked = stack_layers(params, config.num_layers)
  # Same tree as the scanned model's own init.
  dummy = jnp.zeros((1, 2), jnp.int32)
  scanned_shapes = jax.eval_shape(lambda: nn.unbox(Transformer(scanned_config).init(
      jax.random.key(0), dummy, dummy, dummy + 1)))
  assert jax.tree.structure(scanned_shapes) == jax.tree.structure(stacked)
  assert jax.tree.map(lambda x: x.shape, scanned_shapes) == jax.tree.map(lambda x: x.shape, stacked)
  tokens = random_tokens((2, 7), config)
  np.testing.assert_allclose(forward(scanned_config, stacked, tokens), forward(config, params, tokens),
                             atol=1e-5, rtol=1e-5)
  back = unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def _loss_and_grad(config, params, tokens):
  def loss(p):
    logits = forward(config, p, tokens)[..., :config.vocab_size]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan,policies", [(False, ("full", "minimal")), (True, ("dots_saveable", "full"))])
def test_remat_gives_same_gradient(scan, policies):
  config = LLAMA.replace(scan_layers=scan)
  params = randomized_params(LLAMA)
  if scan:
    params = stack_layers(params, config.num_layers)
  tokens = jnp.asarray(random_tokens((2, 8), config))
  value, grad = _loss_and_grad(config, params, tokens)
  for policy in policies:
    value_r, grad_r = _loss_and_grad(config.replace(remat_policy=policy), params, tokens)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grad_r, grad)
    # Remat really is in the program: the differentiated jaxpr contains a checkpoint (remat) primitive.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: Transformer(config.replace(remat_policy=policy)).apply(
        p, tokens, tokens, tokens).sum()))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_compute_close_to_fp32(family):
  config = CONFIGS[family]
  params = randomized_params(config)
  tokens = random_tokens((2, 8), config)
  bf16 = config.replace(dtype="bfloat16")
  hidden = apply(bf16, "hidden_states")(params, tokens, np.broadcast_to(np.arange(8), (2, 8)),
                                               np.ones_like(tokens))
  assert hidden.dtype == jnp.bfloat16  # really computing in bf16
  assert jax.tree.leaves(params)[0].dtype == jnp.float32  # master weights stay fp32
  v = config.vocab_size
  p32 = jax.nn.softmax(forward(config, params, tokens)[..., :v])
  logits16 = forward(bf16, params, tokens)
  assert logits16.dtype == jnp.float32 and np.all(logits16[..., v:] == PAD_LOGIT)
  p16 = jax.nn.softmax(logits16[..., :v])
  diff = float(jnp.abs(p16 - p32).max())
  assert 0 < diff < 2e-2, diff


# ---------------------------------------------------------------- KV cache


def _decode_matches_full_forward(config, params, padding, decode_attention=None):
  """Ragged prefill (left or right padded) + teacher-forced one-token steps, their attention by the
  `decode_attention` plug-in (None: the model's einsums), vs a full forward without a plug-in."""
  prompt_lengths = [3, 6, 1]
  num_steps = 4
  batch, width = len(prompt_lengths), max(prompt_lengths)
  cache_len = width + num_steps + 2
  full = [random_tokens((1, n + num_steps), config, seed=10 + i)[0] for i, n in enumerate(prompt_lengths)]

  tokens = np.zeros((batch, width), np.int32)
  positions = np.zeros((batch, width), np.int32)
  segments = np.zeros((batch, width), np.int32)
  for b, n in enumerate(prompt_lengths):
    cols = slice(width - n, width) if padding == "left" else slice(0, n)
    tokens[b, cols], positions[b, cols], segments[b, cols] = full[b][:n], np.arange(n), 1

  model = Transformer(config, decode_attention=decode_attention)
  traces = []

  @jax.jit
  def step(params, cache, tokens, positions, segments):
    traces.append(1)  # runs only when jax traces (compiles) the function
    return model.apply(params, tokens, positions, segments, cache=cache)

  cache = init_cache(config, batch, cache_len)
  prefill_logits, cache = jax.jit(model.apply)(params, tokens, positions, segments, cache=cache)
  assert int(cache["index"]) == width
  np.testing.assert_array_equal(cache["valid"][:, :width], segments != 0)
  decoded = []
  for t in range(num_steps):
    step_tokens = np.array([[full[b][n + t]] for b, n in enumerate(prompt_lengths)], np.int32)
    step_positions = np.array([[n + t] for n in prompt_lengths], np.int32)
    logits, cache = step(params, cache, step_tokens, step_positions, np.ones((batch, 1), np.int32))
    decoded.append(np.asarray(logits[:, 0]))
  assert len(traces) == 1, "the decode step must compile once, not once per step"

  for b, n in enumerate(prompt_lengths):
    reference = np.asarray(forward(config, params, full[b][None]))[0]
    cols = np.arange(width - n, width) if padding == "left" else np.arange(n)
    np.testing.assert_allclose(np.asarray(prefill_logits)[b, cols], reference[:n], atol=1e-5, rtol=1e-5)
    for t in range(num_steps):
      np.testing.assert_allclose(decoded[t][b], reference[n + t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("decode_attention", list(DECODE_ATTENTION))
def test_kv_cache_decoding_matches_full_forward(family, padding, decode_attention):
  config = CONFIGS[family]
  _decode_matches_full_forward(config, randomized_params(config), padding, DECODE_ATTENTION[decode_attention])


def test_kv_cache_decoding_with_scanned_remat_layers_and_qkv_bias():
  # Decoding uses the training config as is, remat included (a no-op without gradients).
  config = LLAMA.replace(qkv_bias=True, num_layers=3)
  params = stack_layers(randomized_params(config), config.num_layers)
  for plugin in DECODE_ATTENTION.values():
    _decode_matches_full_forward(config.replace(scan_layers=True, remat_policy="full"), params, "left", plugin)


def test_decode_attention_plugin_runs_for_one_token_steps_only():
  # The plug-in gets each layer's decode step with the documented shapes, never a prefill or an
  # uncached forward; what it returns is what the layer uses.
  config = LLAMA
  params = randomized_params(config)
  calls = []

  def plugin(q, k_cache, v_cache, cache_mask, k_new, v_new, scale):
    calls.append((q.shape, k_cache.shape, v_cache.shape, cache_mask.shape, k_new.shape, v_new.shape, scale))
    return jnp.zeros_like(q)

  model = Transformer(config, decode_attention=plugin)
  tokens = random_tokens((2, 5), config)
  positions = np.broadcast_to(np.arange(5), (2, 5)).astype(np.int32)
  ones = np.ones((2, 5), np.int32)
  model.apply(params, tokens, positions, ones)
  cache = init_cache(config, 2, 8)
  _, cache = model.apply(params, tokens[:, :4], positions[:, :4], ones[:, :4], cache=cache)
  assert not calls
  step, _ = model.apply(params, tokens[:, 4:], positions[:, 4:], ones[:, 4:], cache=cache)
  k, g, dh = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
  assert calls == [((2, k, g, dh), (2, k, 8, dh), (2, k, 8, dh), (2, 8), (2, k, dh), (2, k, dh),
                    pytest.approx(1 / np.sqrt(dh)))] * config.num_layers
  reference = np.asarray(forward(config, params, tokens))[:, 4]
  assert np.abs(np.asarray(step)[:, 0] - reference).max() > 1e-3  # zero attention output changed it


def test_model_config_from_dict_reads_saved_configs_with_removed_fields():
  import json
  config = LLAMA.replace(rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                       ("original_max_position_embeddings", 64), ("rope_type", "llama3")))
  saved = json.loads(json.dumps(config.to_dict()))
  assert ModelConfig.from_dict(saved) == config
  saved["decode_attention"] = "cpu_kernel"  # a field older model_config.json files hold
  assert ModelConfig.from_dict(saved) == config
  with pytest.raises(ValueError, match=r"unknown fields \['num_experts'\]"):
    ModelConfig.from_dict({**saved, "num_experts": 4})


def test_kv_cache_multi_token_chunks_and_bf16_cache_dtype():
  """Prefill and extension by a chunk of several tokens share the cache code path."""
  config = LLAMA
  params = randomized_params(config)
  tokens = random_tokens((2, 9), config)
  model = Transformer(config)
  cache = init_cache(config, 2, 12)
  ones = np.ones((2, 4), np.int32)
  apply = jax.jit(model.apply)
  first, cache = apply(params, tokens[:, :4], np.broadcast_to(np.arange(4), (2, 4)), ones, cache=cache)
  second, cache = apply(params, tokens[:, 4:], np.broadcast_to(np.arange(4, 9), (2, 5)),
                              np.ones((2, 5), np.int32), cache=cache)
  reference = np.asarray(forward(config, params, tokens))
  np.testing.assert_allclose(np.concatenate([first, second], 1), reference, atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == 9 and not np.asarray(cache["valid"][:, 9:]).any()
  cache16 = init_cache(config, 2, 12, dtype="bfloat16")
  layer_shape = (2, config.num_kv_heads, 12, config.head_dim)  # heads-major
  # Unscanned layers: one array per layer (no per-step slice copies); scanned: one stacked array.
  assert not config.scan_layers and len(cache16["k"]) == config.num_layers
  assert all(k.dtype == jnp.bfloat16 and k.shape == layer_shape for k in cache16["k"] + cache16["v"])
  stacked = init_cache(config.replace(scan_layers=True), 2, 12, dtype="bfloat16")
  assert stacked["k"].dtype == jnp.bfloat16 and stacked["k"].shape == (config.num_layers,) + layer_shape


# ---------------------------------------------------------------- configs


def test_param_count_matches_init_and_pytorch():
  for config in (LLAMA, GPT2, LLAMA.replace(tie_embeddings=False, qkv_bias=True)):
    shapes = jax.eval_shape(lambda c=config: Transformer(c).init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32),
        jnp.ones((1, 2), jnp.int32)))
    assert param_count(config) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  # Full-size presets against PyTorch models built on the meta device (no memory, no weights).
  torch = pytest.importorskip("torch", reason="PyTorch is the reference for full-size presets (test-only dependency)")
  import transformers
  for name, cls, hf_config in (
      ("smollm2-135m", transformers.LlamaForCausalLM, transformers.LlamaConfig(
          vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
      ("gpt2-small", transformers.GPT2LMHeadModel, transformers.GPT2Config())):
    with torch.device("meta"):
      model = cls(hf_config)
    expected = sum(p.numel() for p in model.parameters())
    assert param_count(get_preset(name, pad_vocab_multiple=1)) == expected, name


def test_flops_per_token_matches_compiled_forward():
  """Analytic FLOPs against XLA's cost analysis of the compiled forward (matmul-dominated shapes)."""
  config = LLAMA.replace(d_model=256, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=1024,
                         vocab_size=1000, pad_vocab_multiple=128)
  batch, length = 2, 128
  params = jax.eval_shape(lambda: nn.unbox(Transformer(config).init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32),
      jnp.ones((1, 2), jnp.int32))))
  tok = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = jax.jit(Transformer(config).apply).lower(params, tok, tok, tok).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = flops_per_token(config, length) * batch * length
  assert abs(cost["flops"] / analytic - 1) < 0.1, (cost["flops"], analytic)


def test_from_hf_config_gpt2_llama_qwen2_fields():
  from transformers import GPT2Config, LlamaConfig, Qwen2Config
  gpt2 = from_hf_config(GPT2Config().to_dict())
  assert gpt2 == get_preset("gpt2-small")
  llama = from_hf_config(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     max_position_embeddings=8192, rope_theta=500000.0,
                                     rms_norm_eps=1e-5).to_dict(),
                         dtype="bfloat16", scan_layers=True)
  assert llama == get_preset("llama3-8b")
  # Old-style config.json (rope_theta at top level, no head_dim).
  old = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
         "rope_theta": 1234.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
  c = from_hf_config(old)
  assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.norm_eps, c.tie_embeddings) == (16, 1, 1234.0, 1e-6, True)
  qwen = from_hf_config(Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                    tie_word_embeddings=True).to_dict())
  assert qwen.qkv_bias and qwen.head_dim == 64 and qwen.num_kv_heads == 2 and qwen.family == "llama"
  with pytest.raises(ValueError, match="model_type='bert'"):
    from_hf_config({"model_type": "bert"})
  with pytest.raises(ValueError, match="missing field 'hidden_size'"):
    from_hf_config({"model_type": "llama"})
  with pytest.raises(ValueError, match="sliding-window attention"):
    from_hf_config({**old, "model_type": "mistral", "sliding_window": 4096})
  assert from_hf_config({**old, "model_type": "mistral", "sliding_window": None}).family == "llama"
  with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
    from_hf_config({**old, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_config_validation_and_presets():
  for name in config_lib.preset_names():
    c = get_preset(name)
    assert c.padded_vocab_size % c.pad_vocab_multiple == 0 and c.padded_vocab_size >= c.vocab_size
  assert get_preset("tiny-llama").padded_vocab_size == 128
  assert get_preset("gpt2-small").padded_vocab_size == 50304
  assert 1e5 < param_count(get_preset("tiny-llama")) < 1e6
  assert 1e5 < param_count(get_preset("tiny-gpt2")) < 1e6
  with pytest.raises(ValueError, match="unknown model preset 'nope'"):
    get_preset("nope")
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    ModelConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="remat_policy='some'"):
    LLAMA.replace(remat_policy="some")
  with pytest.raises(ValueError, match="tokens, positions, segment_ids must all be"):
    forward(LLAMA, randomized_params(LLAMA), np.ones((2, 3)), np.zeros((2, 4)))
