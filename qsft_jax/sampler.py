"""Jitted two-model sampler: Q-SFT policy extraction with the KV caches of pi_phi and p_theta.

Shapes: B batch bucket, P prompt bucket, S cache length, T = S - P output slots, V padded vocabulary
(`config.padded_vocab_size`), V_real = `config.vocab_size`.

One call of `Sampler.decode` runs one compiled program: ragged prompts are left-padded into a [B, P]
bucket (real tokens at positions 0..n-1, padding with segment id 0 so no cache slot is written for it),
both models prefill their caches, then a `lax.while_loop` decodes token by token with both caches in
lockstep until every row has emitted a stop token or `max_new_tokens` tokens. B and P are powers of two
(B also a multiple of the mesh's batch axes), S is fixed per sampler until `Sampler.fit` grows it, and
everything else (beta, temperature, top-k, top-p, support_min, max_new_tokens, the stop table, the
rng) is a traced argument, so a second call with the same (B, P, mode, sampling kind) bucket never retraces.

Token scores per decode step (z_phi, z_theta: the two models' logits of the row that predicts the
next token; log-softmaxes over the real vocabulary only, padded columns get -inf):

  mode "extract": log_softmax(z_phi) + beta * softmax(z_theta)       (docs/algorithm.md section 6)
                  beta = 0 is the BC policy pi_phi alone; theta is then never run ("bc" kind).
  mode "bc":      log_softmax(z_phi)                                  (theta_params may be None)
  mode "theta":   log_softmax(z_theta)                                (behaviour_params may be None)
  mode "ratio":   log p_theta - log pi_phi on the emittable tokens with pi_phi >= min(support_min,
                  max pi_phi over the emittable tokens) (the support rule of
                  `losses.bellman_log_values`, suppressed tokens not eligible), -inf elsewhere;
                  always greedy.
  mode "heads":   log_softmax(z_phi) + beta * (min_j Q_j - V)      (docs/algorithm.md section 9)
                  value heads (`models.heads`, the `heads` argument) on the final hidden state of the
                  decode step: phi's (theta_params None: the heads were trained on the frozen phi) or
                  the trunk model's in the theta slot ("heads_trunk" kind); theta's logits are not formed.

Then greedy argmax, or scores / temperature, top-k (keep the k highest; ties with the k-th are kept),
top-p (smallest set of the highest tokens whose probability after top-k reaches top_p), and a
categorical draw.

Stops. A row ends on device once the text it decoded since the prompt contains a stop string, however
the tokens split it, or at a token of `stop_token_ids`. `stop_automaton` builds, on the host, an
Aho-Corasick automaton over the bytes of the stop strings and runs every token's bytes
(`tokenizers.token_bytes`: what `tokenizer.decode` writes for it) through it from every state: an
int32 table [NS, V] of next states, with state 0 the empty text (where every action starts) and state
1 (`STOPPED`) absorbing. The table is a traced argument of the decode program and NS is a power of two
fixed by the stop set (2 for no stop strings or single-byte ones such as "\\n"), so one compiled
program serves every stop set of its size. `Sampler.generate_text` decodes each row and cuts the text
right after the first stop string: a stop token whose text runs past the stop string ("\\n   " for
"\\n", 119 of SmolLM2's 129 newline tokens) is cut inside, and the environment receives the cut text,
which the data layer then tokenises as any action text (so the next prompt holds "\\n", not "\\n   ").

Decode attention: the decode steps (one new token per row) attend over the caches by a plug-in of
qsft_jax.kernels that the sampler picks for its devices (`choose_decode_attention`; the C++ kernel on
one float32 CPU device); prefill and every training or TPU program use the model's einsums.

Sharding: with a mesh, params are placed by `models.quant_base.variables_shardings`, the caches are created
inside the program with `models.sharded.cache_shardings`, and the model's activation constraints
apply (the program runs under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsft_jax import sharding
from qsft_jax.kernels import cpu_decode_attention, xla_decode_attention
from qsft_jax.losses import real_log_softmax
from qsft_jax.models import heads as heads_lib
from qsft_jax.models import quant_base
from qsft_jax.models import sharded
from qsft_jax.models.config import ModelConfig
from qsft_jax.models.transformer import Transformer, init_cache, logits_from_hidden, unembedding
from qsft_jax.tokenizers import token_bytes

MODES = ("extract", "bc", "theta", "ratio", "heads")

# How decode steps attend over the KV cache (qsft_jax.kernels): the model's einsums ("dot"), XLA
# multiply-and-reduce, or the C++ CPU kernel; "auto" picks by device (choose_decode_attention).
DECODE_ATTENTION = {
    "dot": None,
    "multiply_reduce": xla_decode_attention.multiply_reduce,
    "cpu_kernel": cpu_decode_attention.decode_attention,
}


def next_power_of_two(n: int) -> int:
  """Smallest power of two >= max(n, 1)."""
  return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Key:
  """What a compiled decode program is specialised on."""
  batch: int  # B
  prompt_len: int  # P
  kind: str  # "bc" | "extract" | "theta" | "ratio" | "heads" | "heads_trunk"
  sampling: str  # "greedy" | "sample" | "filter" (sample with top-k / top-p)
  record: bool  # also return per-step logits


@dataclasses.dataclass
class DecodeOutput:
  """Result of `Sampler.decode` for the real rows (n = number of prompts).

  tokens: int32 [n, T] generated tokens (pad id after a row stopped); num_generated: int32 [n], tokens
  of each row up to and including its stop token. With record=True, per decode step t (the row that
  predicts generated token t): phi_logits / theta_logits float32 [n, T, V] (None for a model that did
  not run) and scores float32 [n, T, V] (the mode's token scores before temperature / filtering);
  entries at t >= num_generated are undefined. Scores are after suppression (suppressed tokens -inf).
  Mode "heads" records advantages float32 [n, T, V] (min_j Q_j - V of the heads) instead of theta_logits.
  """
  tokens: np.ndarray
  num_generated: np.ndarray
  phi_logits: np.ndarray | None = None
  theta_logits: np.ndarray | None = None
  scores: np.ndarray | None = None
  advantages: np.ndarray | None = None

  def sequences(self) -> list[list[int]]:
    """Generated tokens of each row as lists, stop token included."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.num_generated)]


def token_scores(kind: str, z_phi: jax.Array | None, z_theta: jax.Array | None, vocab_size: int,
                 beta: jax.Array, support_min: jax.Array, suppress: jax.Array | None = None) -> jax.Array:
  """The mode's scores over the vocabulary. z_phi, z_theta [B, V] -> float32 [B, V]; -inf on padded
  columns (and, for "ratio", on tokens outside pi_phi's support). suppress: [V] bool, tokens never
  emitted: for "ratio" they are not eligible for the support, so its fallback (phi's most likely
  token) is an emittable one. See the module docstring."""
  if kind == "bc":
    return real_log_softmax(z_phi, vocab_size)
  if kind == "theta":
    return real_log_softmax(z_theta, vocab_size)
  log_pi = real_log_softmax(z_phi, vocab_size)
  log_p = real_log_softmax(z_theta, vocab_size)
  if kind == "extract":
    return log_pi + beta * jnp.exp(log_p)
  if kind == "heads":  # z_theta: the heads' min_j Q_j - V
    return log_pi + beta * z_theta
  if kind == "ratio":
    # Support rule of losses.bellman_log_values, with a traced support_min.
    log_threshold = jnp.where(support_min > 0, jnp.log(jnp.maximum(support_min, 1e-38)), -jnp.inf)
    eligible = jnp.isfinite(log_pi) if suppress is None else jnp.isfinite(log_pi) & ~suppress
    top = jnp.max(jnp.where(eligible, log_pi, -jnp.inf), axis=-1, keepdims=True)
    supported = eligible & (log_pi >= jnp.minimum(log_threshold, top))
    return jnp.where(supported, log_p - log_pi, -jnp.inf)
  raise ValueError(f"unknown score kind {kind!r}")


def forward_last_hidden(model: Transformer, params, tokens: jax.Array, positions: jax.Array,
                        segments: jax.Array, cache) -> tuple[jax.Array, Any]:
  """One model over tokens [B, l] with its KV cache: the final hidden state [B, D] of the last column
  (the row that predicts the next token) and the updated cache."""
  hidden, cache = model.apply(params, tokens, positions, segments, cache, method=Transformer.hidden_states)
  return hidden[:, -1], cache


def forward_last(model: Transformer, params, tokens: jax.Array, positions: jax.Array, segments: jax.Array,
                 cache) -> tuple[jax.Array, Any]:
  """One model over tokens [B, l] with its KV cache: float32 logits [B, V] of the last column (the row
  that predicts the next token) and the updated cache."""
  c = model.config
  hidden, cache = forward_last_hidden(model, params, tokens, positions, segments, cache)
  return logits_from_hidden(hidden, unembedding(params, c), c.vocab_size,
                            softcap=c.final_logit_softcap), cache


def decode_step(model: Transformer, params: Sequence, caches: Sequence, tokens: jax.Array,
                positions: jax.Array) -> tuple[list[jax.Array], list]:
  """One decode step of each model in `params` (pi_phi and / or p_theta), each with its own cache:
  tokens int32 [B] at positions int32 [B] -> (float32 logits [B, V] per model, updated caches).

  The per-token program that `qsft_jax.aot` compiles (`Sampler.decode`'s loop runs
  `decode_step_hidden` and forms the same logits).
  """
  c = model.config
  hiddens, caches = decode_step_hidden(model, params, caches, tokens, positions)
  return [logits_from_hidden(h, unembedding(p, c), c.vocab_size, softcap=c.final_logit_softcap)
          for h, p in zip(hiddens, params)], caches


def decode_step_hidden(model: Transformer, params: Sequence, caches: Sequence, tokens: jax.Array,
                       positions: jax.Array) -> tuple[list[jax.Array], list]:
  """`decode_step` up to the final hidden states: ([B, D] per model, updated caches)."""
  segments = jnp.ones((tokens.shape[0], 1), jnp.int32)
  out = [forward_last_hidden(model, p, tokens[:, None], positions[:, None], segments, c)
         for p, c in zip(params, caches)]
  return [h for h, _ in out], [c for _, c in out]


def filter_top_k_top_p(scores: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keeps the top_k highest scores (0 = all), then the smallest prefix of those, by descending score,
  whose softmax probability reaches top_p; others become -inf. scores [B, V] -> [B, V].

  Ties with the threshold score are kept (so more than k tokens can survive on exact ties).
  """
  v = scores.shape[-1]
  ordered = -jnp.sort(-scores, axis=-1)  # [B, V] descending
  rank = jnp.arange(v)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  ordered = jnp.where(rank < k, ordered, -jnp.inf)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each rank
  keep = (rank < k) & ((before < top_p) | (top_p >= 1))  # top_p = 1: float32 cumsum may reach 1 early
  keep = keep.at[:, 0].set(True)  # never empty
  last = jnp.sum(keep, axis=-1) - 1  # [B]
  threshold = jnp.take_along_axis(ordered, last[:, None], axis=-1)  # [B, 1]
  return jnp.where(scores >= threshold, scores, -jnp.inf)


def choose_decode_attention(choice: str, devices: Sequence[jax.Device], dtype: str,
                            attn_logit_softcap: float | None = None) -> str:
  """The decode attention (a key of DECODE_ATTENTION) for a sampler on `devices` with compute `dtype`.

  "auto": the C++ kernel on one CPU device in float32 when it builds, else multiply-and-reduce on the
  CPU (faster there than XLA's dot), the dot on other platforms. An explicit name is checked against
  what it needs ("cpu_kernel": CPU, one device, float32, a kernel that builds). A model that soft-caps
  attention scores (ModelConfig.attn_logit_softcap, Gemma 2) gets the dot: the plug-ins do not cap.
  """
  choices = ("auto",) + tuple(DECODE_ATTENTION)
  if choice not in choices:
    raise ValueError(f"decode_attention={choice!r}; expected one of {choices}")
  if attn_logit_softcap is not None:
    if choice not in ("auto", "dot"):
      raise ValueError(f"decode_attention={choice!r}: the model soft-caps attention scores "
                       f"(attn_logit_softcap={attn_logit_softcap}), which only 'dot' does (use 'auto' or 'dot')")
    return "dot"
  on_cpu = all(d.platform == "cpu" for d in devices)
  if choice == "auto":
    if not on_cpu:
      return "dot"
    if len(devices) == 1 and dtype == "float32" and cpu_decode_attention.available():
      return "cpu_kernel"
    return "multiply_reduce"
  if choice == "cpu_kernel":
    if not on_cpu:
      raise ValueError(f"decode_attention='cpu_kernel' runs on the CPU; these devices are "
                       f"{sorted({d.platform for d in devices})} (use 'auto' or 'dot')")
    if len(devices) > 1:
      raise ValueError(f"decode_attention='cpu_kernel' runs on one device; this mesh has {len(devices)} "
                       "(use 'multiply_reduce' or 'auto')")
    if dtype != "float32":
      raise ValueError(f"decode_attention='cpu_kernel' needs a float32 model, got dtype={dtype!r} "
                       "(use 'multiply_reduce' or 'auto')")
    if not cpu_decode_attention.available():
      raise ValueError("decode_attention='cpu_kernel': the kernel did not build (see the warning above; "
                       "use 'multiply_reduce' or 'auto')")
  return choice


def stop_token_mask(tokenizer, stop_strings: Sequence[str], num_columns: int | None = None) -> np.ndarray:
  """bool [num_columns or vocab_size]: tokens whose own decoded text contains a stop string."""
  num_columns = tokenizer.vocab_size if num_columns is None else num_columns
  mask = np.zeros(num_columns, bool)
  stop_strings = [s for s in stop_strings if s]
  if not stop_strings:
    return mask
  for i in range(tokenizer.vocab_size):
    text = tokenizer.decode([i])
    mask[i] = any(s in text for s in stop_strings)
  return mask


STOPPED = 1  # the stop automaton's absorbing state: the decoded text holds a stop string


def _byte_automaton(patterns: Sequence[bytes]) -> np.ndarray:
  """Aho-Corasick over byte patterns: int32 [NS, 256] next state per (state, byte), with state 0 the
  empty text, STOPPED (1) absorbing and reached as soon as the text read holds a pattern."""
  children: list[dict[int, int]] = [{}]
  end = [False]
  for pattern in patterns:
    node = 0
    for b in pattern:
      if end[node]:
        break  # a shorter pattern already stops here
      if b not in children[node]:
        children[node][b] = len(children)
        children.append({})
        end.append(False)
      node = children[node][b]
    end[node] = True
  n = len(children)
  goto = np.zeros((n, 256), np.int64)
  fail = np.zeros(n, np.int64)
  stops = np.array(end)
  order, queue = [], list(children[0].values())
  for b, child in children[0].items():
    goto[0, b] = child
  while queue:  # breadth first: a node's failure state is shallower, so already complete
    node = queue.pop(0)
    order.append(node)
    stops[node] |= stops[fail[node]]
    goto[node] = goto[fail[node]]
    for b, child in children[node].items():
      fail[child] = goto[fail[node], b]
      goto[node, b] = child
      queue.append(child)
  # Renumber: 0 the root, 1 every node that holds a pattern (merged, absorbing), 2... the others.
  state = np.full(n, STOPPED, np.int64)
  state[0] = 0
  live = [u for u in order if not stops[u]]
  state[live] = np.arange(2, 2 + len(live))
  table = np.full((2 + len(live), 256), STOPPED, np.int32)
  table[0] = state[goto[0]]
  table[2:] = state[goto[live]]
  return table


def stop_automaton(pieces: Sequence[bytes], stop_strings: Sequence[str], num_columns: int,
                   stop_token_ids: Sequence[int] = ()) -> np.ndarray:
  """The stop table of the decode loop: int32 [NS, num_columns], the state after reading a token's
  bytes `pieces[i]` from each state (module docstring). NS is the automaton's state count rounded up
  to a power of two (unused rows STOPPED); columns without a piece (padded vocabulary) keep the
  state; tokens of `stop_token_ids` go to STOPPED from every state. Vectorised over tokens: one numpy
  gather per byte position."""
  table = _byte_automaton([s.encode("utf-8") for s in stop_strings if s])
  pieces = pieces[:num_columns]
  ns = table.shape[0]
  out = np.full((next_power_of_two(ns), num_columns), STOPPED, np.int32)
  current = np.broadcast_to(np.arange(ns, dtype=np.int32)[:, None], (ns, num_columns)).copy()
  if ns > 2:
    lengths = np.array([len(p) for p in pieces], np.int64)
    longest = int(lengths.max(initial=0))
    data = np.zeros((len(pieces), max(longest, 1)), np.uint8)
    for i, p in enumerate(pieces):
      data[i, :len(p)] = np.frombuffer(p, np.uint8)
    for j in range(longest):
      ids = np.flatnonzero(lengths > j)
      current[:, ids] = table[current[:, ids], data[ids, j][None, :]]
  else:  # single-byte stop strings (or none): a token stops iff it holds one of those bytes
    stop_bytes = [bytes([b]) for b in np.flatnonzero(table[0] == STOPPED)]
    if stop_bytes:
      current[0, [i for i, p in enumerate(pieces) if any(b in p for b in stop_bytes)]] = STOPPED
  current[STOPPED] = STOPPED
  out[:ns] = current
  for i in stop_token_ids:
    out[:, int(i)] = STOPPED
  return out


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """text up to and including the earliest occurrence of any stop string (text itself if none)."""
  ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
  return text[:min(ends)] if ends else text


class Sampler:
  """Samples continuations of ragged prompts from pi_phi, p_theta or the Q-SFT extracted policy.

  Args:
    model_config: the ModelConfig of both models (phi and theta share the architecture).
    mesh, rules: optional mesh and logical-axis rule table (default `sharding.DEFAULT_RULES`).
    cache_len: S, the KV-cache length; prompt bucket + max_new_tokens must fit in it (`fit` grows it).
    min_prompt_bucket, min_batch_bucket: smallest buckets (powers of two).
    pad_id: token id used for left padding and after a row stopped.
    decode_attention: how decode steps attend over the cache, "auto" or a key of DECODE_ATTENTION
      (see choose_decode_attention); the choice made is `self.decode_attention`. Prefill always
      uses the model's einsums.
    lora: a `qsft_jax.models.lora.LoraConfig` when the parameter sets are LoRA variables
      {"params": base, "lora": adapters}: phi and theta are then two adapter sets over one base (pass
      the same base arrays in both; nothing is copied).
  """

  def __init__(self, model_config: ModelConfig, mesh=None, rules=None, *, cache_len: int = 512,
               min_prompt_bucket: int = 16, min_batch_bucket: int = 1, pad_id: int = 0,
               decode_attention: str = "auto", lora: Any = None):
    if cache_len < 2:
      raise ValueError(f"cache_len={cache_len} must be >= 2")
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    self.decode_attention = choose_decode_attention(decode_attention, devices, model_config.dtype,
                                                    model_config.attn_logit_softcap)
    self.config = model_config
    self.model = Transformer(model_config, decode_attention=DECODE_ATTENTION[self.decode_attention],
                             lora=lora)
    self.mesh = mesh
    self.rules = tuple(sharding.DEFAULT_RULES if rules is None else rules)
    self.cache_len = int(cache_len)
    self.min_prompt_bucket = next_power_of_two(min_prompt_bucket)
    self.min_batch_bucket = next_power_of_two(min_batch_bucket)
    self.pad_id = int(pad_id)
    self.trace_count = 0  # incremented each time a decode program is traced (for tests)
    self._compiled: dict[_Key, Any] = {}
    self._param_shardings = None
    self._batch_multiple = 1
    if mesh is not None:
      self._param_shardings = quant_base.variables_shardings(self.model, model_config, mesh, self.rules)
      spec = sharding.logical_to_mesh_spec(("batch",), None, dict(mesh.shape), self.rules)
      axes = spec[0] if spec and spec[0] is not None else ()
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      self._batch_multiple = math.prod(mesh.shape[a] for a in axes)

  # ------------------------------------------------------------------ buckets
  def buckets(self, num_prompts: int, longest_prompt: int, max_new_tokens: int) -> tuple[int, int]:
    """(B, P) for a call: powers of two (B rounded up to a multiple of the mesh's batch axes; P
    capped at cache_len - max_new_tokens)."""
    b = max(next_power_of_two(num_prompts), self.min_batch_bucket)
    b = -(-b // self._batch_multiple) * self._batch_multiple
    room = self.cache_len - max_new_tokens
    if longest_prompt > room:
      raise ValueError(f"a prompt of {longest_prompt} tokens plus max_new_tokens={max_new_tokens} does not "
                       f"fit cache_len={self.cache_len}; raise cache_len or shorten the prompt")
    p = min(max(next_power_of_two(longest_prompt), self.min_prompt_bucket), room)
    return b, p

  def fit(self, longest_prompt: int, max_new_tokens: int) -> Sampler:
    """Makes room for a prompt of `longest_prompt` tokens plus `max_new_tokens`, and returns self.

    When need = longest_prompt + max_new_tokens exceeds cache_len but not the model's positions
    (`max_position_embeddings`), cache_len becomes min(max_position_embeddings, 2 * need), so a
    history that keeps growing (a multi-turn episode) rebuilds the cache O(log length) times, and the
    compiled programs (specialised on S) are dropped. A need beyond the model's positions is left
    for `decode` to refuse. Evaluation (`evaluate.evaluate_policies`) calls it before every action,
    which is how `analysis.Analysis.play` grows its sampler too."""
    need = int(longest_prompt) + int(max_new_tokens)
    if self.cache_len < need <= self.config.max_position_embeddings:
      self.cache_len = min(self.config.max_position_embeddings, 2 * need)
      self._compiled = {}
    return self

  # ------------------------------------------------------------------ the compiled program
  def _new_cache(self, batch):
    # The barrier keeps XLA from constant-folding the prefill over the all-zero cache: without it, the
    # compile of a 49k-vocabulary model's program spends minutes folding each layer's cache update.
    cache = jax.lax.optimization_barrier(init_cache(self.config, batch, self.cache_len))
    if self.mesh is not None:
      cache = jax.lax.with_sharding_constraint(
          cache, sharded.cache_shardings(self.config, batch, self.cache_len, self.mesh, self.rules))
    return cache

  def _program(self, key: _Key):
    c = self.config
    b, p, t_max = key.batch, key.prompt_len, self.cache_len - key.prompt_len
    use_phi = key.kind != "theta"
    use_theta = key.kind not in ("bc", "heads")
    on_heads = key.kind in ("heads", "heads_trunk")
    v = c.padded_vocab_size

    def run(phi_params, theta_params, heads_params, tokens, lengths, active, stop_table, suppress_mask, beta,
            temperature, top_k, top_p, support_min, max_new, rng):
      self.trace_count += 1  # python side effect: runs only while tracing
      columns = jnp.arange(p)
      pad_cols = (p - lengths)[:, None]  # [B, 1]
      positions = jnp.maximum(columns[None] - pad_cols, 0).astype(jnp.int32)
      segments = (columns[None] >= pad_cols).astype(jnp.int32)
      models = []
      if use_phi:
        models.append(phi_params)
      if use_theta:
        models.append(theta_params)
      def outputs(hiddens):
        """The final hidden states of `models` -> the arrays the scores read: each model's logits;
        for the heads kinds phi's logits and the heads' min_j Q_j - V on the last model's state."""
        if on_heads:
          return [logits_from_hidden(hiddens[0], unembedding(models[0], c), c.vocab_size,
                                     softcap=c.final_logit_softcap),
                  heads_lib.acting_values(heads_params, hiddens[-1], c.vocab_size)]
        return [logits_from_hidden(h, unembedding(m, c), c.vocab_size, softcap=c.final_logit_softcap)
                for h, m in zip(hiddens, models)]

      caches, hiddens = [], []
      for params in models:
        h, cache = forward_last_hidden(self.model, params, tokens, positions, segments, self._new_cache(b))
        caches.append(cache)
        hiddens.append(h)
      logits = outputs(hiddens)

      def select(logits, rng):
        z_phi = logits[0] if use_phi else None
        z_theta = logits[-1] if use_theta or on_heads else None
        scores = token_scores("heads" if on_heads else key.kind, z_phi, z_theta, c.vocab_size, beta,
                              support_min, suppress_mask)
        scores = jnp.where(suppress_mask, -jnp.inf, scores)
        if key.sampling == "greedy":
          tok = jnp.argmax(scores, axis=-1)
        else:
          s = scores / temperature
          if key.sampling == "filter":
            s = filter_top_k_top_p(s, top_k, top_p)
          tok = jax.random.categorical(rng, s, axis=-1)
        return tok.astype(jnp.int32), scores

      def record(buffers, t, logits, scores):
        if not key.record:
          return buffers
        new = list(logits) + [scores]
        return [jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, t, 0))
                for buf, x in zip(buffers, new)]

      rng, sub = jax.random.split(rng)
      tok, scores = select(logits, sub)
      stop_state = stop_table[0, tok]  # [B] each row's stop automaton after its first token
      done = ~active | (stop_state == STOPPED) | (max_new <= 1)
      out = jnp.full((b, t_max), self.pad_id, jnp.int32).at[:, 0].set(tok)
      count = active.astype(jnp.int32)
      buffers = [jnp.zeros((b, t_max, v), jnp.float32) for _ in range(len(logits) + 1)] if key.record else []
      buffers = record(buffers, 0, logits, scores)

      def cond(state):
        t, _, done, *_ = state
        return (t < max_new) & ~jnp.all(done)

      def body(state):
        t, tok, done, stop_state, out, count, caches, rng, buffers = state
        hiddens, new_caches = decode_step_hidden(self.model, models, caches, tok, lengths + t - 1)
        logits = outputs(hiddens)
        rng, sub = jax.random.split(rng)
        new_tok, scores = select(logits, sub)
        new_tok = jnp.where(done, self.pad_id, new_tok)
        out = jax.lax.dynamic_update_slice(out, new_tok[:, None], (0, t))
        count = count + (~done).astype(jnp.int32)
        buffers = record(buffers, t, logits, scores)
        stop_state = jnp.where(done, stop_state, stop_table[stop_state, new_tok])
        done = done | (stop_state == STOPPED)
        return t + 1, new_tok, done, stop_state, out, count, new_caches, rng, buffers

      state = (jnp.int32(1), tok, done, stop_state, out, count, caches, rng, buffers)
      _, _, _, _, out, count, _, _, buffers = jax.lax.while_loop(cond, body, state)
      return out, count, buffers

    return jax.jit(run)

  def _place(self, params):
    if params is None:
      return None
    params = nn.unbox(params)  # accepts boxed (LogicallyPartitioned) variables from model.init too
    if self.mesh is None:
      return params
    return jax.device_put(params, self._param_shardings)

  def _place_heads(self, heads):
    heads = nn.unbox(heads)
    heads = heads if "params" in heads else {"params": heads}
    if self.mesh is None:
      return heads
    num_q = heads["params"]["q_kernel"].shape[0]
    return jax.device_put(heads, heads_lib.param_shardings(self.config, num_q, self.mesh, self.rules))

  # ------------------------------------------------------------------ public API
  def decode(self, behaviour_params, theta_params, prompts: Sequence[Sequence[int]], *, mode: str = "extract",
             beta: float = 1.0, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, support_min: float = 1e-4, max_new_tokens: int = 32,
             stop_token_ids: Sequence[int] = (), stop_mask: np.ndarray | None = None,
             stop_strings: Sequence[str] = (), tokenizer=None, suppress_token_ids: Sequence[int] = (),
             rng=None, record: bool = False, heads: Any = None) -> DecodeOutput:
    """Decodes every prompt (lists of token ids, BOS included, each non-empty) in one compiled call.

    mode: see the module docstring ("extract" with beta = 0 runs pi_phi alone). greedy: argmax instead
    of sampling (mode "ratio" is always greedy). top_k = 0 and top_p = 1 disable those filters.
    A row ends (its stop token kept) once the text it generated holds one of `stop_strings` (over any
    split into tokens; `tokenizer` gives the tokens' bytes), or at a token of `stop_token_ids` or of
    `stop_mask` (bool [V] or [V_real]).
    suppress_token_ids are never emitted (their score is -inf before greedy / filtering / sampling).
    rng: a jax key or an int seed (default 0). record: also return per-step logits (tests).
    heads: mode "heads" only, the value heads' variables (`models.heads`); theta_params is then the
    trunk they read (None: phi's hidden states).
    """
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    kind = "bc" if (mode in ("extract", "heads") and beta == 0) else mode
    if kind == "heads":
      if heads is None:
        raise ValueError("mode 'heads' needs heads (the value heads' variables)")
      kind = "heads" if theta_params is None else "heads_trunk"
    if kind in ("bc", "extract", "ratio") and behaviour_params is None:
      raise ValueError(f"mode {mode!r} needs behaviour_params (pi_phi)")
    if kind in ("extract", "theta", "ratio") and theta_params is None:
      raise ValueError(f"mode {mode!r} (beta={beta}) needs theta_params (p_theta)")
    if not prompts:
      raise ValueError("no prompts")
    lengths = [len(x) for x in prompts]
    if min(lengths) < 1:
      raise ValueError("every prompt needs at least one token (the BOS)")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    greedy = greedy or kind == "ratio"
    if not greedy and not temperature > 0:
      raise ValueError(f"temperature={temperature} must be > 0 (use greedy=True for argmax)")
    if top_k < 0 or not 0 < top_p <= 1:
      raise ValueError(f"top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1]")
    if support_min < 0:
      raise ValueError(f"support_min={support_min} must be >= 0")
    sampling = "greedy" if greedy else ("filter" if top_k > 0 or top_p < 1 else "sample")
    b, p = self.buckets(len(prompts), max(lengths), max_new_tokens)
    key = _Key(b, p, kind, sampling, bool(record))
    if key not in self._compiled:
      self._compiled[key] = self._program(key)

    tokens = np.full((b, p), self.pad_id, np.int32)
    for i, prompt in enumerate(prompts):
      tokens[i, p - len(prompt):] = prompt
    vocab = self.config.vocab_size
    if tokens.max() >= vocab or tokens.min() < 0:
      raise ValueError(f"prompt token ids must be in [0, {vocab})")
    lens = np.ones(b, np.int32)
    lens[:len(prompts)] = lengths
    active = np.arange(b) < len(prompts)
    stop_ids = [int(i) for i in stop_token_ids]
    for i in stop_ids:
      if not 0 <= i < vocab:
        raise ValueError(f"stop token id {i} outside [0, {vocab})")
    if stop_mask is not None:
      stop_ids += np.flatnonzero(np.asarray(stop_mask, bool)).tolist()
    stop_strings = tuple(s for s in stop_strings if s)
    if stop_strings and tokenizer is None:
      raise ValueError(f"stop_strings={stop_strings!r} need the tokenizer (tokenizer=...)")
    table = self._stop_table(tokenizer if stop_strings else None, stop_strings)
    if stop_ids:
      table = table.copy()
      table[:, stop_ids] = STOPPED
    suppress = np.zeros(self.config.padded_vocab_size, bool)
    for i in suppress_token_ids:
      if not 0 <= int(i) < vocab:
        raise ValueError(f"suppressed token id {i} outside [0, {vocab})")
      suppress[int(i)] = True
    if rng is None:
      rng = 0
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(int(rng))

    args = (self._place(behaviour_params) if kind != "theta" else None,
            self._place(theta_params) if kind not in ("bc", "heads") else None,
            self._place_heads(heads) if kind in ("heads", "heads_trunk") else None,
            tokens, lens, active, table, suppress, np.float32(beta), np.float32(temperature), np.int32(top_k),
            np.float32(top_p), np.float32(support_min), np.int32(max_new_tokens), rng)
    if self.mesh is not None:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        out, count, buffers = self._compiled[key](*args)
    else:
      out, count, buffers = self._compiled[key](*args)
    n = len(prompts)
    result = DecodeOutput(np.asarray(out)[:n], np.asarray(count)[:n])
    if record:
      arrays = [np.asarray(x)[:n] for x in buffers]
      result.scores = arrays[-1]
      if kind != "theta":
        result.phi_logits = arrays[0]
      if kind in ("heads", "heads_trunk"):
        result.advantages = arrays[-2]
      elif kind != "bc":
        result.theta_logits = arrays[-2]
    return result

  def generate(self, behaviour_params, theta_params, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """Generated token ids per prompt (stop token included); keyword arguments as `decode`."""
    return self.decode(behaviour_params, theta_params, prompts, **kwargs).sequences()

  def generate_text(self, behaviour_params, theta_params, prompts: Sequence[Sequence[int]], tokenizer, *,
                    stop_strings: Sequence[str] = ("\n",), **kwargs) -> list[str]:
    """Decoded continuations, each cut right after its first stop string (kept): decoding on device
    ends a row once its text holds a stop string, however the tokens split it (`stop_automaton`), or
    at `stop_token_ids`; keyword arguments as `decode`."""
    seqs = self.generate(behaviour_params, theta_params, prompts, stop_strings=stop_strings,
                         tokenizer=tokenizer, **kwargs)
    return [cut_at_stop(tokenizer.decode(s), stop_strings) for s in seqs]

  @functools.lru_cache(maxsize=8)
  def _stop_table(self, tokenizer, stop_strings: tuple[str, ...]) -> np.ndarray:
    """The stop table [NS, V] of stop_strings (read only: `decode` copies it to add stop token ids)."""
    pieces = token_bytes(tokenizer) if stop_strings else []
    table = stop_automaton(pieces, stop_strings, self.config.padded_vocab_size)
    table.flags.writeable = False
    return table
