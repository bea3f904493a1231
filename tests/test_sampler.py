"""Sampler: KV-cached two-model decoding against full forward passes and numpy references."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from qsft_jax import sharding
from qsft_jax.models import Transformer, get_preset, sharded
from qsft_jax.sampler import STOPPED, Sampler, cut_at_stop, filter_top_k_top_p, stop_automaton, stop_token_mask
from qsft_jax.tokenizers import CharTokenizer

# Real vocabulary 40 of 128 padded columns; a large init std so that distributions are peaked (greedy
# comparisons are not decided by float noise).
CONFIG = get_preset("tiny-llama", vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64, init_std=0.4)
V = CONFIG.vocab_size
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 4, 4, 4, 4, 4, 4, 30, 31, 32, 33], [1, 20, 21]]


@jax.jit
def _init(rng):
  d = np.zeros((1, 1), np.int32)
  return nn.unbox(Transformer(CONFIG).init(rng, d, d, d + 1))


@pytest.fixture(scope="module")
def params():
  return _init(jax.random.key(0)), _init(jax.random.key(1))


@pytest.fixture(scope="module")
def sampler():
  """One sampler for the module, so that tests share its compiled programs (trace counts are deltas)."""
  return Sampler(CONFIG, cache_len=64, min_prompt_bucket=16)


@jax.jit
def _forward(params, tokens, segments):
  return Transformer(CONFIG).apply(params, tokens, np.arange(tokens.shape[1])[None], segments)


def full_logits(params, seq):
  """Independent reference: one uncached forward pass over the whole sequence -> [n, V_pad].

  The sequence is right-padded to 32 tokens (segment 0; causal attention never looks right) so the
  reference compiles once.
  """
  n = len(seq)
  tokens = np.zeros((1, 32), np.int32)
  tokens[0, :n] = seq
  return np.asarray(_forward(params, tokens, (np.arange(32) < n)[None].astype(np.int32)))[0, :n]


def np_log_softmax(z):
  z = z.astype(np.float64)
  m = z.max()
  return z - m - np.log(np.exp(z - m).sum())


def test_decode_attention_resolves_from_the_devices(sampler):
  # The module's sampler runs on one CPU device: its steps attend by the C++ kernel (so the tests below
  # hold the kernel against the einsum-based full forward); an explicit choice is kept.
  assert sampler.decode_attention == "cpu_kernel"
  assert Sampler(CONFIG, cache_len=64, decode_attention="dot").decode_attention == "dot"
  with pytest.raises(ValueError, match="decode_attention='fast'"):
    Sampler(CONFIG, cache_len=64, decode_attention="fast")


def test_extraction_step_logits_equal_full_forward(params, sampler):
  phi, theta = params
  beta = 3.0
  out = sampler.decode(phi, theta, PROMPTS, mode="extract", beta=beta, temperature=1.5, max_new_tokens=9,
                       stop_token_ids=[11], rng=3, record=True)
  assert out.tokens.shape[0] == len(PROMPTS)
  for i, prompt in enumerate(PROMPTS):
    gen = out.sequences()[i]
    n = out.num_generated[i]
    assert 1 <= n <= 9 and len(gen) == n
    assert (n == 9) or gen[-1] == 11, "a row ends at max_new_tokens or at its stop token"
    assert 11 not in gen[:-1]
    assert all(0 <= t < V for t in gen), "padded vocabulary columns are never sampled"
    seq = prompt + gen
    z_phi, z_theta = full_logits(phi, seq), full_logits(theta, seq)
    for t in range(n):
      row = len(prompt) - 1 + t  # the row that predicts generated token t
      np.testing.assert_allclose(out.phi_logits[i, t], z_phi[row], atol=2e-4, rtol=1e-4)
      np.testing.assert_allclose(out.theta_logits[i, t], z_theta[row], atol=2e-4, rtol=1e-4)
      lp, lq = np_log_softmax(z_phi[row, :V]), np_log_softmax(z_theta[row, :V])
      expected = lp + beta * np.exp(lq)  # log_softmax(z_phi) + beta * softmax(z_theta), real vocab
      np.testing.assert_allclose(out.scores[i, t, :V], expected, atol=2e-4, rtol=1e-4)
      assert np.all(np.isneginf(out.scores[i, t, V:])), "padded columns excluded"


def test_greedy_beta_zero_equals_plain_greedy_of_pi_phi(params, sampler):
  phi, _ = params
  stop = 11
  got = sampler.generate(phi, None, PROMPTS, mode="extract", beta=0.0, greedy=True, max_new_tokens=8,
                         stop_token_ids=[stop])  # theta_params=None: beta = 0 never runs theta
  for prompt, gen in zip(PROMPTS, got):
    seq, expected = list(prompt), []
    for _ in range(8):  # plain Python greedy loop, full forward each step, real vocabulary only
      nxt = int(np.argmax(full_logits(phi, seq)[-1, :V]))
      expected.append(nxt)
      seq.append(nxt)
      if nxt == stop:
        break
    assert gen == expected
  with pytest.raises(ValueError, match="needs theta_params"):
    sampler.generate(phi, None, PROMPTS, mode="extract", beta=1.0)


def _allowed(scores, temperature, top_k, top_p):
  """numpy reference of the filter: the set of token ids that may be drawn. scores [V_real]."""
  s = scores.astype(np.float64) / temperature
  order = np.argsort(-s, kind="stable")
  if top_k > 0:
    order = order[:top_k]
  p = np.exp(s[order] - s[order].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  return set(order[before < top_p].tolist()) | {int(order[0])}


def test_top_k_top_p_never_emit_excluded_tokens_and_do_not_retrace(params, sampler):
  _, theta = params
  before = sampler.trace_count
  prompts = [[1, 2 + i, 7, 3 + 2 * i][: 1 + i % 4] for i in range(8)]
  counts = []
  for top_k, top_p, temperature in [(3, 1.0, 2.0), (0, 0.5, 1.0), (5, 0.7, 3.0)]:
    out = sampler.decode(None, theta, prompts, mode="theta", top_k=top_k, top_p=top_p, temperature=temperature,
                         max_new_tokens=10, rng=top_k, record=True, suppress_token_ids=[0, 1, 2])
    counts.append(sampler.trace_count - before)
    assert not np.isin(out.tokens, [1, 2]).any() and (out.tokens[:, :out.num_generated.min()] != 0).all()
    for i, prompt in enumerate(prompts):
      z_theta = full_logits(theta, prompt + out.sequences()[i])
      for t in range(out.num_generated[i]):
        row = len(prompt) - 1 + t
        expected = np_log_softmax(z_theta[row, :V])
        expected[[0, 1, 2]] = -np.inf  # suppressed
        np.testing.assert_allclose(out.scores[i, t, :V], expected, atol=2e-4, rtol=1e-4)
        allowed = _allowed(out.scores[i, t, :V], temperature, top_k, top_p)
        assert out.tokens[i, t] in allowed
        if top_k:
          assert len(allowed) <= top_k
  assert counts == [1, 1, 1], "top_k / top_p / temperature are traced values: one compilation"


def test_filter_function_matches_numpy():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(6, 50)).astype(np.float32) * 3
  for top_k, top_p in [(1, 1.0), (4, 1.0), (0, 0.3), (7, 0.6), (0, 1.0)]:
    got = np.asarray(filter_top_k_top_p(scores, np.int32(top_k), np.float32(top_p)))
    for r in range(6):
      kept = set(np.flatnonzero(np.isfinite(got[r])).tolist())
      assert kept == _allowed(scores[r], 1.0, top_k, top_p)


class _PieceTokenizer:
  """A tokenizer whose tokens are multi-character pieces (like BPE), for stop-string tests."""

  def __init__(self, pieces):
    self.pieces = pieces
    self.vocab_size = len(pieces)

  def decode(self, ids):
    return "".join(self.pieces[i] for i in ids)


def test_stop_strings_end_sequences(params, sampler):
  phi, theta = params
  pieces = ["", "<s>", "ab", ".\nx", "c", "\n", "d\n\n"] + [chr(ord("e") + i) for i in range(V - 7)]
  tok = _PieceTokenizer(pieces)
  mask = stop_token_mask(tok, ["\n"])
  assert np.flatnonzero(mask).tolist() == [3, 5, 6]
  assert cut_at_stop("ab.\nxc\nd", ["\n"]) == "ab.\n"
  assert cut_at_stop("abc", ["\n"]) == "abc"
  assert cut_at_stop("a;b\nc;", ["\n", ";"]) == "a;"
  # Every 3rd token stops: with sampling at a high temperature, rows stop early.
  many = [[1, 2 + i % 30] for i in range(16)]
  texts = sampler.generate_text(phi, theta, many, tok, stop_strings=["\n"], beta=1.0, temperature=5.0,
                                max_new_tokens=12, rng=1)
  seqs = sampler.generate(phi, theta, many, stop_mask=mask, beta=1.0, temperature=5.0, max_new_tokens=12, rng=1)
  stopped = 0
  for text, seq in zip(texts, seqs):
    assert [mask[t] for t in seq[:-1]] == [False] * (len(seq) - 1)
    if mask[seq[-1]]:
      stopped += 1
      assert text.endswith("\n") and text.count("\n") == 1  # cut right after the first stop string
      assert text == cut_at_stop(tok.decode(seq), ["\n"])
    else:
      assert len(seq) == 12 and "\n" not in text
  assert stopped >= 8

  char = CharTokenizer()
  char_mask = stop_token_mask(char, ["\n"])
  assert np.flatnonzero(char_mask).tolist() == char.encode("\n")


def test_stop_automaton_matches_a_search_of_the_decoded_bytes():
  e_acute = "\u00e9".encode()  # two bytes: tokens may hold half of it
  pieces = [b"", b"a", b"b", b"ab", b"ba", b"\n", b"a\n", b"\nb", b"aab", b"x", e_acute[:1], e_acute[1:], e_acute,
            b"b\n\n", b"zz"]
  stops = ["ab", "\n\n", "aab", "b\u00e9", "b\nb", "zzz"]
  table = stop_automaton(pieces, stops, num_columns=len(pieces) + 3, stop_token_ids=[9])
  assert table.shape[0] & (table.shape[0] - 1) == 0 and table.shape[1] == len(pieces) + 3
  assert (table[STOPPED] == STOPPED).all()
  padded = table[:, len(pieces):]  # columns beyond the vocabulary keep the state (rows past NS are STOPPED)
  assert ((padded == np.arange(table.shape[0])[:, None]) | (padded == STOPPED)).all() and (padded[0] == 0).all()
  rng = np.random.default_rng(0)
  for _ in range(3000):
    seq = rng.integers(0, len(pieces), size=rng.integers(1, 9)).tolist()
    state, got = 0, None
    for t, tok in enumerate(seq):
      state = table[state, tok]
      if state == STOPPED:
        got = t
        break
    # Reference: the first token after which the bytes decoded so far hold a stop string (or a stop token).
    want = next((t for t in range(len(seq)) if seq[t] == 9 or any(
        s.encode() in b"".join(pieces[i] for i in seq[:t + 1]) for s in stops)), None)
    assert got == want, (seq, got, want)
  # No stop strings: two states, and only stop tokens stop.
  plain = stop_automaton(pieces, [], num_columns=len(pieces), stop_token_ids=[3])
  assert plain.shape == (2, len(pieces)) and np.flatnonzero(plain[0] == STOPPED).tolist() == [3]


def test_stop_string_split_over_tokens_ends_decoding_on_device(params, sampler):
  phi, theta = params
  pieces = ["", "<s>", "a", "b", "\n", "ba", "b\n", "xa", "\nq"] + [chr(ord("c") + i) for i in range(V - 9)]
  tok = _PieceTokenizer(pieces)
  stops = ["aa", "b\n"]  # split as a|a, xa|a, b|\n, b|\nq, or inside b\n
  many = [[1, 2 + i % 9] for i in range(16)]
  kwargs = dict(beta=1.0, temperature=5.0, max_new_tokens=12, rng=1,
                suppress_token_ids=list(range(9, V)))  # only the pieces that can build the stop strings
  seqs = sampler.generate(phi, theta, many, stop_strings=stops, tokenizer=tok, **kwargs)
  texts = sampler.generate_text(phi, theta, many, tok, stop_strings=stops, **kwargs)
  stopped_split = 0
  for seq, text in zip(seqs, texts):
    full = tok.decode(seq)
    held = lambda t: any(s in t for s in stops)
    assert not held(tok.decode(seq[:-1])), "decoding went on past a stop string"
    if held(full):
      stopped_split += not held(pieces[seq[-1]])
      first = min(full.find(s) + len(s) for s in stops if s in full)
      assert text == full[:first] and held(text) and not held(text[:-1])
    else:
      assert len(seq) == 12 and text == full, "a row stopped without a stop string"
  assert stopped_split >= 4, "the test should see stop strings split over tokens"


@pytest.fixture
def smollm2(smollm2_tokenizer):
  return smollm2_tokenizer


def test_smollm2_newline_tokens_stop_and_the_text_after_the_newline_is_cut(smollm2):
  from qsft_jax.data import DataConfig, mdp
  from qsft_jax.data.episodes import Episode, Turn
  from qsft_jax.evaluate import history_tokens

  pieces = smollm2.token_bytes()
  newline = [i for i in range(smollm2.vocab_size) if "\n" in smollm2.decode([i])]  # reference: decoded alone
  table = stop_automaton(pieces, ["\n"], smollm2.vocab_size)
  assert np.flatnonzero(table[0] == STOPPED).tolist() == newline and len(newline) == 129
  config = get_preset("tiny-llama", vocab_size=smollm2.vocab_size, d_model=16, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, mlp_dim=32, init_std=0.4)
  d = np.zeros((1, 1), np.int32)
  phi = nn.unbox(jax.jit(Transformer(config).init)(jax.random.key(0), d, d, d + 1))
  crane, lone_space, after = smollm2.encode("cr") + smollm2.encode("ane"), 3805, 1004  # "\n ", "\n\n   "
  assert smollm2.decode([lone_space]) == "\n " and smollm2.decode([after]) == "\n\n   "
  allowed = set(crane + [lone_space, after])
  small = Sampler(config, cache_len=32, min_prompt_bucket=8)
  prompt = [smollm2.bos_id] + smollm2.encode("Guess:\n")
  texts = small.generate_text(phi, None, [prompt] * 8, smollm2, stop_strings=["\n"], beta=0.0, temperature=3.0,
                              max_new_tokens=6, rng=0, suppress_token_ids=sorted(set(range(smollm2.vocab_size)) - allowed))
  data = DataConfig(max_length=64)
  cut = [t for t in texts if t.endswith("\n")]
  assert len(cut) >= 4
  for text in cut:
    assert text.count("\n") == 1 and " " not in text, "the text after the newline is cut"
    # The environment echoes the cut text; the next prompt holds it as training tokenises that action.
    history = [{"text": "Guess:\n", "action": False}, {"text": text, "action": True},
               {"text": "bybbg\n", "action": False}]
    episode = Episode(tuple(Turn(h["text"], h["action"]) for h in history), done=False)
    tokenized, _ = mdp.tokenize_episode(episode, np.zeros(3), smollm2, data.mdp)
    start = 1 + tokenized.turn_lengths[0]
    action = tokenized.tokens[start:start + tokenized.turn_lengths[1]].tolist()
    assert action == smollm2.encode(text) and action[-1] == smollm2.encode("\n")[0]
    assert history_tokens(history, smollm2, data) == tokenized.tokens.tolist()
    assert history_tokens(history[:1], smollm2, data) == prompt


def test_no_retrace_within_a_bucket(params, sampler):
  phi, theta = params
  sampler.generate(phi, theta, PROMPTS, beta=1.0, max_new_tokens=5, rng=0)
  count = sampler.trace_count
  # Other prompt lengths (same 16-token bucket), batch 3 (bucket 4), beta, temperature, max_new, stops, rng.
  sampler.generate(phi, theta, [[1, 2, 3] * 5, [1], [1, 2]], beta=7.0, temperature=0.5, max_new_tokens=20,
                   stop_token_ids=[4, 5], rng=jax.random.key(9))
  assert sampler.trace_count == count
  assert sampler.buckets(3, 15, 20) == (4, 16)
  assert sampler.buckets(5, 17, 3) == (8, 32)  # the next buckets up: a new program
  assert sampler.buckets(1, 40, 20) == (1, 44)  # capped at cache_len - max_new_tokens
  with pytest.raises(ValueError, match="does not fit cache_len"):
    sampler.generate(phi, theta, [[1] * 60], max_new_tokens=5)


def test_fit_doubles_the_cache_up_to_the_models_positions(params):
  phi, theta = params
  fitted = Sampler(CONFIG, cache_len=32, min_prompt_bucket=16)
  assert fitted.fit(10, 8) is fitted and fitted.cache_len == 32  # 18 slots fit: unchanged
  with pytest.raises(ValueError, match="does not fit cache_len=32"):
    fitted.generate(phi, theta, [[1] * 30], max_new_tokens=8)
  assert fitted.fit(30, 8).cache_len == 76  # 2 * (30 + 8)
  assert fitted.buckets(1, 30, 8) == (1, 32)
  assert fitted.fit(250, 10).cache_len == CONFIG.max_position_embeddings == 512  # 2 * 260 capped
  assert fitted.fit(600, 10).cache_len == 512  # beyond the positions: left for decode to refuse
  with pytest.raises(ValueError, match="does not fit cache_len=512"):
    fitted.generate(phi, theta, [[1] * 600], max_new_tokens=10)


@pytest.mark.slow
def test_ratio_greedy_on_a_mesh_matches_numpy_and_unsharded(params, sampler):
  phi, theta = params
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  phi_s = sharded.shard_params(jax.tree.map(np.asarray, phi), CONFIG, mesh, rules)
  theta_s = sharded.shard_params(jax.tree.map(np.asarray, theta), CONFIG, mesh, rules)
  mesh_sampler = Sampler(CONFIG, mesh=mesh, rules=rules, cache_len=64, min_prompt_bucket=16)
  support_min = 0.02
  out = mesh_sampler.decode(phi_s, theta_s, PROMPTS, mode="ratio", support_min=support_min, max_new_tokens=6)
  assert mesh_sampler.buckets(len(PROMPTS), 11, 6)[0] == 4  # batch bucket divisible by data x fsdp
  for i, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for t in range(6):  # plain loop: argmax of log p_theta - log pi_phi over pi_phi's support
      lp = np_log_softmax(full_logits(phi, seq)[-1, :V])
      lq = np_log_softmax(full_logits(theta, seq)[-1, :V])
      supported = lp >= min(np.log(support_min), lp.max())
      nxt = int(np.argmax(np.where(supported, lq - lp, -np.inf)))
      assert out.tokens[i, t] == nxt
      seq.append(nxt)
  # Sharded extraction sampling equals the unsharded sampler's (same rng, same program up to sharding).
  kwargs = dict(beta=2.0, temperature=1.0, max_new_tokens=6, rng=5)
  on_mesh = mesh_sampler.generate(phi_s, theta_s, PROMPTS, **kwargs)
  plain = sampler.generate(phi, theta, PROMPTS, **kwargs)
  assert on_mesh == plain


def test_ratio_scores_support_ignores_suppressed_tokens():
  """A suppressed token (the Q-SFT dummy) holding most of pi_phi is not eligible for the ratio policy's
  support, so the fallback is phi's most likely emittable token (as losses.bellman_log_values does),
  not an empty support whose argmax would be token 0."""
  import jax.numpy as jnp
  from qsft_jax.sampler import token_scores

  vocab, v_pad, dummy = 10, 16, 4
  z_phi = np.zeros((1, v_pad), np.float32)
  z_phi[0, dummy], z_phi[0, 7] = 6.0, 1.0   # pi(dummy) ~ 0.95; token 7 the likeliest other one
  z_theta = np.zeros((1, v_pad), np.float32)
  z_theta[0, 2] = 3.0                       # a large ratio on an unsupported token
  suppress = np.zeros(v_pad, bool)
  suppress[[0, dummy]] = True
  scores = np.asarray(token_scores("ratio", jnp.asarray(z_phi), jnp.asarray(z_theta), vocab,
                                   jnp.float32(0), jnp.float32(0.2), jnp.asarray(suppress)))
  lp = lambda z: z[0, :vocab] - np.log(np.exp(z[0, :vocab].astype(np.float64)).sum())
  want = np.full(v_pad, -np.inf)
  want[7] = lp(z_theta)[7] - lp(z_phi)[7]
  np.testing.assert_allclose(scores[0], want, rtol=1e-5)


def test_fresh_cache_is_hidden_from_constant_folding(sampler):
  """The new KV cache passes through an optimization barrier: XLA otherwise constant-folds the prefill
  over the all-zero cache, which took 40 s instead of 1.5 s to compile a 2-layer bf16 model of
  SmolLM2-135M's shape on an idle CPU (minutes per program for the 30-layer model). Compile time is a
  benchmark figure, not a timed test; this checks the barrier is there."""
  jaxpr = str(jax.make_jaxpr(lambda: sampler._new_cache(2))())
  assert "optimization_barrier" in jaxpr, jaxpr
