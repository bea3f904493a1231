"""Value diagnostics against independent numpy computations."""
import jax
import numpy as np

from qsft_jax import diagnostics
from qsft_jax.data import DataConfig, episodes_to_batch
from qsft_jax.models.config import get_preset
from qsft_jax.models.transformer import Transformer
from qsft_jax.tokenizers import CharTokenizer


def _episode(actions, final_return, done=True):
  turns = [{"text": "go\n", "action": False}]
  for j, a in enumerate(actions):
    turns.append({"text": a + "\n", "action": True, "reward": final_return if j == len(actions) - 1 else 0.0})
    if j < len(actions) - 1:
      turns.append({"text": "ok\n", "action": False})
  return {"turns": turns, "done": done}


def _setup(seed=0):
  tok = CharTokenizer()
  cfg = get_preset("tiny-llama", vocab_size=tok.vocab_size, d_model=32, num_heads=2, num_kv_heads=1,
                   head_dim=16, mlp_dim=64)
  episodes = [_episode(["ab", "c", "dd"], 0.9), _episode(["x"], 0.1), _episode(["ab", "zz"], 0.5),
              _episode(["q", "r", "s"], 0.3)]
  batch = episodes_to_batch(episodes, DataConfig(max_length=64, pack=True), tok)
  model = Transformer(cfg)
  dummy = np.zeros((1, 1), np.int32)
  p1 = model.init(jax.random.key(seed), dummy, dummy, dummy + 1)
  p2 = model.init(jax.random.key(seed + 1), dummy, dummy, dummy + 1)
  return cfg, model, batch, p1, p2


def test_taken_logprobs_equal_numpy_log_softmax_of_previous_row():
  cfg, model, batch, p1, _ = _setup()
  got = diagnostics.taken_logprobs(cfg, p1, batch, rows_per_call=1)
  logits = np.asarray(model.apply(p1, batch["tokens"], batch["positions"], batch["segment_ids"]),
                      np.float64)[..., :cfg.vocab_size]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  B, L = batch["tokens"].shape
  for b in range(B):
    assert got[b, 0] == 0.0
    for i in range(1, L):
      np.testing.assert_allclose(got[b, i], logp[b, i - 1, batch["tokens"][b, i]], rtol=1e-5, atol=1e-5)


def test_first_action_tokens_mark_exactly_one_token_per_action_turn():
  _, _, batch, _, _ = _setup()
  first = diagnostics.first_action_tokens(batch)
  # 3 + 1 + 2 + 3 action turns in the four episodes.
  assert first.sum() == 9
  tok = CharTokenizer()
  texts = sorted(tok.decode([int(t)]) for t in batch["tokens"][first])
  assert texts == sorted(["a", "c", "d", "x", "a", "z", "q", "r", "s"])
  assert np.all(batch["action_mask"][first])


def test_identical_models_give_ratio_one_and_correlation_matches_numpy():
  cfg, _, batch, p1, p2 = _setup()
  same = diagnostics.value_diagnostics(cfg, p1, p1, batch)
  assert all(abs(r["mean_ratio"] - 1.0) < 1e-5 for r in same["by_turn"])
  d = diagnostics.value_diagnostics(cfg, p1, p2, batch, target_params=p2)
  first = diagnostics.first_action_tokens(batch)
  ratio = np.exp(diagnostics.taken_logprobs(cfg, p2, batch) - diagnostics.taken_logprobs(cfg, p1, batch))[first]
  rtg = batch["returns_to_go"][first]
  np.testing.assert_allclose(d["correlation"], np.corrcoef(ratio, rtg)[0, 1], rtol=1e-4)
  assert d["count"] == 9 and [r["count"] for r in d["by_turn"]] == [4, 3, 2]
  assert all(0.0 <= r["mean_target"] <= 1.0 and 0.0 <= r["clipped_fraction"] <= 1.0 for r in d["by_turn"])


def test_plot_writes_png(tmp_path):
  cfg, _, batch, p1, p2 = _setup()
  d = diagnostics.value_diagnostics(cfg, p1, p2, batch, target_params=p2)
  path = tmp_path / "diag.png"
  diagnostics.plot_value_diagnostics(d, str(path), "test")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
