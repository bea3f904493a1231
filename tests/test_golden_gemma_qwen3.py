"""Golden tests for Gemma 2, Gemma 3 (text) and Qwen3: our Flax model against transformers' PyTorch model
built from a small random config (no downloads), read back with `weights.load_hf_folder`.

Each config has sliding layers whose window (4) is shorter than the sequence (12), so that the local
layers attend differently from full ones; Gemma 2 soft-caps attention scores and logits (caps small
enough to bite), Gemma 3 has a local rotary base and linear rope scaling on its full layers, Qwen3 a
head_dim independent of d_model / heads. Relative error := max |ours - ref| / max |ref| over the real
tokens and vocabulary (as in test_golden.py); the bar is < 1e-4 in float32.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the golden reference (test-only dependency)")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from qsft_jax.kernels import xla_decode_attention  # noqa: E402
from qsft_jax.models import weights  # noqa: E402
from qsft_jax.models.config import ModelConfig, from_hf_config, param_count  # noqa: E402
from qsft_jax.models.transformer import Transformer, init_cache  # noqa: E402
from qsft_jax.sampler import Sampler  # noqa: E402

MAX_REL_ERR = 1e-4
VOCAB = 300  # pads to 384: padded rows and columns exist
LENGTH, WINDOW = 12, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _gemma2():
  return transformers.Gemma2Config(
      num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
      attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **COMMON)


def _gemma3():
  return transformers.Gemma3TextConfig(
      num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=32, sliding_window=WINDOW,
      layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}, **COMMON)


def _qwen3():
  return transformers.Qwen3Config(
      num_hidden_layers=3, head_dim=24, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 100.0}, **COMMON)


MAKERS = {"gemma2": _gemma2, "gemma3_text": _gemma3, "qwen3": _qwen3}
CLASSES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def relative_error(ours, ref) -> float:
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def batch():
  """Token ids [2, L] and validity [2, L]: the second row right-padded after 9 tokens."""
  ids = np.random.default_rng(0).integers(3, VOCAB, (2, LENGTH)).astype(np.int32)
  valid = np.ones_like(ids, bool)
  valid[1, 9:] = False
  ids[~valid] = 0
  return ids, valid


def torch_logits(model, ids, valid):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(valid.astype(np.int64)))
  return out.logits.float().numpy()


def our_logits(config, params, ids, valid):
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  logits = jax.jit(Transformer(config).apply)({"params": params}, ids, positions, valid.astype(np.int32))
  return np.asarray(logits)[..., :config.vocab_size]


@pytest.fixture(scope="module", params=list(MAKERS))
def hf_model(request, tmp_path_factory):
  """(model_type, torch model, its saved folder)."""
  folder = tmp_path_factory.mktemp(request.param)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(MAKERS[request.param](), attn_implementation="eager")
  with torch.no_grad():  # random norm weights too, so that every tensor matters
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(str(folder), safe_serialization=True)
  return request.param, model, folder


def test_config_mapping(hf_model):
  model_type, model, folder = hf_model
  config, _ = weights.load_hf_folder(folder)
  assert model.config.model_type == model_type
  assert config.family == ("llama" if model_type == "qwen3" else "gemma")
  assert config.sliding_window == WINDOW and config.layer_types == tuple(model.config.layer_types)
  assert any(config.sliding_layers) and not all(config.sliding_layers)
  if model_type == "gemma2":
    assert (config.attn_logit_softcap, config.final_logit_softcap, config.query_pre_attn_scalar) == (2.0, 3.0, 24)
  if model_type == "gemma3_text":
    assert config.qk_norm and (config.rope_theta, config.rope_local_theta) == (1000.0, 10.0)
    assert dict(config.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
  if model_type == "qwen3":
    assert config.qk_norm and config.head_dim == 24 != config.d_model // config.num_heads
  assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # model_config.json
  # param_count counts the padded vocabulary rows (embedding, and lm_head when untied); torch does not.
  padding = (config.padded_vocab_size - config.vocab_size) * config.d_model * (1 if config.tie_embeddings else 2)
  assert param_count(config) - padding == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scanned"])
def test_logits_match_transformers(hf_model, scan_layers):
  model_type, model, folder = hf_model
  config, params = weights.load_hf_folder(folder, scan_layers=scan_layers)
  ids, valid = batch()
  ref = torch_logits(model, ids, valid)
  err = relative_error(our_logits(config, params, ids, valid)[valid], ref[valid])
  assert err < MAX_REL_ERR, f"{model_type} scan_layers={scan_layers}: relative error {err:.2e}"
  if scan_layers:
    return
  if model_type == "gemma2":
    assert np.max(np.abs(ref[valid])) < 3.0  # the final soft-cap is active ...
  # ... and the sliding window matters: a model with full attention everywhere differs.
  full = our_logits(config.replace(layer_types=None, sliding_window=None, rope_local_theta=None,
                                   rope_scaling=None), params, ids, valid)
  assert relative_error(full[valid], ref[valid]) > 100 * MAX_REL_ERR


def test_export_reloads_in_transformers(hf_model, tmp_path):
  model_type, model, folder = hf_model
  config, params = weights.load_hf_folder(folder, scan_layers=True)
  weights.export_hf_folder({"params": params}, config, tmp_path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
  assert type(reloaded).__name__ == CLASSES[model_type]
  ids, valid = batch()
  ref = torch_logits(model, ids, valid)
  err = relative_error(torch_logits(reloaded, ids, valid)[valid], ref[valid])
  assert err < MAX_REL_ERR, f"{model_type}: exported folder, relative error {err:.2e}"
  again, _ = weights.load_hf_folder(tmp_path, scan_layers=True)
  assert again == config


def test_unsupported_options_name_the_field():
  base = _gemma2().to_dict()
  for field, value in (("use_bidirectional_attention", True), ("attention_bias", True),
                       ("hidden_activation", "gelu")):
    with pytest.raises(ValueError, match=field):
      from_hf_config({**base, field: value})
  with pytest.raises(ValueError, match="attn_logit_softcapping"):
    from_hf_config({**_gemma3().to_dict(), "attn_logit_softcapping": 50.0})
  with pytest.raises(ValueError, match="layer_types entry 'chunked_attention'"):
    from_hf_config({**base, "layer_types": ["chunked_attention"] * 3})
  with pytest.raises(ValueError, match="attention_bias"):
    from_hf_config({**_qwen3().to_dict(), "attention_bias": True})
  with pytest.raises(ValueError, match="sliding_window"):
    ModelConfig(num_layers=2, layer_types=("sliding_attention", "full_attention"))


def test_export_refuses_what_the_hf_class_cannot_express(tmp_path):
  gemma2 = from_hf_config(_gemma2().to_dict())
  gemma3 = from_hf_config(_gemma3().to_dict())
  qwen3 = from_hf_config(_qwen3().to_dict())
  for config, field in ((gemma2.replace(rope_local_theta=10.0), "rope_local_theta"),
                        (gemma3.replace(attn_logit_softcap=5.0), "attn_logit_softcap"),
                        (gemma3.replace(qkv_bias=True), "qkv_bias"),
                        (qwen3.replace(qkv_bias=True), "qkv_bias"),
                        (qwen3.replace(final_logit_softcap=5.0), "final_logit_softcap"),
                        (qwen3.replace(qk_norm=False), "layer_types")):
    with pytest.raises(ValueError, match=field):
      weights.hf_config_dict(config)


def test_gemma3_multimodal_config_reads_its_text_config():
  text = _gemma3().to_dict()
  config = from_hf_config({"model_type": "gemma3", "text_config": text, "vision_config": {}})
  assert config == from_hf_config(text)
  # A Hub config's text_config holds only what differs from transformers' defaults (gemma-3-4b's):
  hub = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_attention_heads": 8,
         "num_hidden_layers": 34, "num_key_value_heads": 4, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
         "sliding_window": 1024}
  config = from_hf_config({"model_type": "gemma3", "text_config": hub})
  full = transformers.Gemma3TextConfig(**{k: v for k, v in hub.items() if k != "model_type"}).to_dict()
  assert config == from_hf_config(full)
  assert (config.vocab_size, config.head_dim, config.query_pre_attn_scalar, config.rope_local_theta) == (
      262208, 256, 256, 10_000.0)
  assert config.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
  assert dict(config.rope_scaling) == {"rope_type": "linear", "factor": 8.0}


def test_sampler_decode_matches_full_forward(hf_model):
  """KV-cache decoding by the sampler: ragged prompts left-padded, prefill, then greedy steps past the
  window, each step's logits equal to the full forward's over prompt + generated tokens (final soft-cap
  included for Gemma 2). The sampler's own pick of decode attention: a plug-in for Gemma 3 / Qwen3
  (which sees the sliding layers' narrowed cache mask), the einsums for Gemma 2, which soft-caps
  scores (the model refuses a plug-in, as does the sampler when asked for one). Gemma 3 runs
  scanned (per-layer flags traced), the others unscanned (flags static)."""
  model_type, _, folder = hf_model
  config, params = weights.load_hf_folder(folder, scan_layers=model_type == "gemma3_text")
  sampler = Sampler(config, cache_len=16, min_prompt_bucket=8)
  assert (sampler.decode_attention == "dot") == (model_type == "gemma2")
  if model_type == "gemma2":
    with pytest.raises(ValueError, match="attn_logit_softcap"):
      Sampler(config, cache_len=16, decode_attention="multiply_reduce")
    model = Transformer(config, decode_attention=xla_decode_attention.multiply_reduce)
    one = np.ones((1, 1), np.int32)
    with pytest.raises(ValueError, match="attn_logit_softcap"):
      jax.eval_shape(lambda: model.apply({"params": params}, one, one, one, init_cache(config, 1, 4)))
  prompts = [[1, 17, 42], [1, 250, 9, 33, 71, 5]]
  out = sampler.decode({"params": params}, None, prompts, mode="bc", greedy=True, max_new_tokens=7,
                       record=True)
  assert out.num_generated.tolist() == [7, 7]
  for row, prompt in enumerate(prompts):
    seq = np.asarray([prompt + out.tokens[row, :7].tolist()], np.int32)
    full = our_logits(config, params, seq, np.ones_like(seq, bool))[0, len(prompt) - 1:-1]
    err = relative_error(out.phi_logits[row, :7, :VOCAB], full)
    assert err < MAX_REL_ERR, f"{model_type} row {row}: sampler vs full forward, relative error {err:.2e}"


def test_gemma3_multimodal_folder_loads_its_text_model(tmp_path):
  """A Gemma3ForConditionalGeneration folder: config from text_config, the language model's tensors
  (under their language_model prefix) read, the vision tower and projector left out."""
  text = {k: v for k, v in _gemma3().to_dict().items() if k in COMMON or k in (
      "num_hidden_layers", "head_dim", "sliding_window", "layer_types", "rope_parameters")}
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                patch_size=14)
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(
      transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  config, params = weights.load_hf_folder(tmp_path)
  assert config == from_hf_config(transformers.Gemma3TextConfig(**text).to_dict())
  ours = weights.hf_tensors(params, config)
  language_model = model.model.language_model.state_dict()
  assert len(ours) == len(language_model)
  for name, array in ours.items():
    np.testing.assert_array_equal(array, language_model[name.removeprefix("model.")].numpy(), err_msg=name)
