"""Decoder-only transformer in flax.linen: GPT-2 and Llama families, logical axis names, KV cache.

Shapes: B batch, L new tokens, S key slots (S = L without a cache, the cache length with one),
D d_model, H query heads, K kv heads (G = H / K queries per kv head), Dh head_dim, F mlp_dim,
V padded vocabulary.

Attention masks: query i attends to new key j iff j <= i and both have the same segment id (packing;
padding has segment 0 and therefore only ever sees padding). With a cache, a query also attends to
every earlier cache slot that is valid (written by a token with nonzero segment id); the new tokens'
K/V are written to slots [index, index + L) in place. The cache is stored heads-major, [B, K, S, Dh] per
layer (see init_cache): stacked [num_layers, B, K, S, Dh] when layers are scanned, a tuple of per-layer
arrays otherwise, so that every layer reads its keys and values as stored (batch dims B, K leading),
with no per-step transpose or copy. Segment ids therefore only separate padding from real tokens
across calls: one sequence per row when decoding per row. Positions index the rotary angles (llama) or the learned position table (gpt2, where
positions >= max_position_embeddings are clamped by the lookup, not checked).

Parameter tree (unboxed; the weights module fills exactly this):

  embed/embedding            [V, D]        (vocab, embed)
  pos_embed/embedding        [P, D]        (None, embed)              gpt2 only
  layers_{i}/attn_norm/scale [D]           (embed,)                   + bias [D] for gpt2
  layers_{i}/attn/q/kernel   [D, H, Dh]    (embed, heads, head_dim)   + bias [H, Dh] (gpt2 or qkv_bias)
  layers_{i}/attn/k/kernel   [D, K, Dh]    (embed, kv_heads, head_dim) + bias [K, Dh]
  layers_{i}/attn/v/kernel   [D, K, Dh]    (embed, kv_heads, head_dim) + bias [K, Dh]
  layers_{i}/attn/o/kernel   [H, Dh, D]    (heads, head_dim, embed)   + bias [D] for gpt2
  layers_{i}/mlp_norm/scale  [D]           (embed,)                   + bias [D] for gpt2
  layers_{i}/mlp/gate/kernel [D, F]        (embed, mlp)               llama only
  layers_{i}/mlp/up/kernel   [D, F]        (embed, mlp)               + bias [F] for gpt2
  layers_{i}/mlp/down/kernel [F, D]        (mlp, embed)               + bias [D] for gpt2
  final_norm/scale           [D]           (embed,)                   + bias [D] for gpt2
  lm_head/kernel             [D, V]        (embed, vocab)             untied only

With config.scan_layers the layers_{i} subtrees are stacked under `layers/` with a leading
num_layers axis (logical name "layers"); see stack_layers / unstack_layers.

LoRA: `Transformer(config, lora=LoraConfig(rank > 0))` adds a variable collection "lora" beside
"params": for each targeted projection at path P, P/lora_a [in..., r] and P/lora_b [r, out...]
(qsft_jax.models.lora); every projection goes through `_project`, which adds the adapter's term.

Decode attention: attention is computed with einsums (dots) everywhere. The optional module attribute
`decode_attention` (of Transformer, handed down to Block and Attention; not part of ModelConfig, so
never saved) replaces that computation for decode steps only, one new token per row with a cache:
a callable `decode_attention(q, k_cache, v_cache, cache_mask, k_new, v_new, scale)` with the
signature of the plug-ins in qsft_jax.kernels (the Sampler picks one for its device).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsft_jax.models.config import ModelConfig
from qsft_jax.sharding import logical_constraint

# Padded vocabulary columns get this logit: large, finite (no inf - inf = nan), and applied after the
# cast to float32 so it cannot overflow a bf16 value.
PAD_LOGIT = float(np.finfo(np.float32).min / 2)
_MASKED_SCORE = float(np.finfo(np.float32).min)

# q [B, K, G, Dh], k_cache, v_cache [B, K, S, Dh], cache_mask [B, S], k_new, v_new [B, K, Dh], scale
# -> [B, K, G, Dh]; see the module docstring and qsft_jax.kernels.
DecodeAttention = Callable[..., jax.Array]


def _normal(config: ModelConfig):
  return nn.initializers.normal(stddev=config.init_std)


def _param(module: nn.Module, name: str, shape, axes, init):
  dtype = jnp.dtype(module.config.param_dtype)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dense(kernel, dtype) -> jax.Array:
  """A stored kernel as a dense array of the compute dtype (the one place a projection reads it)."""
  return kernel.astype(dtype)


def _lora_of(module: nn.Module):
  """The LoraConfig of the nearest enclosing module with a `lora` attribute (the block: a lifted
  transform such as nn.scan cuts the parent chain above it), None when there is none: no adapters."""
  while isinstance(module, nn.Module):
    if "lora" in module.__dataclass_fields__:
      return module.lora
    module = module.parent
  return None


def _project(module: nn.Module, x: jax.Array, kernel: jax.Array, axes: tuple, equation: str) -> jax.Array:
  """x [..., in...] . kernel [in..., out...] by `equation` (x's last dims contracted with the kernel's
  first), in the compute dtype; plus the LoRA term scale * ((x . A) . B) when the module's path is a
  target of the Transformer's LoraConfig, A [in..., r] and B [r, out...] in the "lora" collection
  (qsft_jax.models.lora). `axes`: the kernel's logical axis names."""
  c = module.config
  dtype = jnp.dtype(c.dtype)
  y = jnp.einsum(equation, x, _dense(kernel, dtype))
  lora = _lora_of(module)
  if lora is None or not lora.enabled or not lora.matches("/".join(module.path)):
    if module.has_variable("lora", "lora_a"):
      raise ValueError(f"{'/'.join(module.path)}: the variables hold a LoRA adapter, but the model has "
                       "no LoraConfig that targets it (build Transformer(config, lora=...))")
    return y
  operands, out = equation.split("->")
  n_in = sum(ch not in out for ch in operands.split(",")[1])
  in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
  param_dtype = jnp.dtype(c.param_dtype)
  a_init = nn.with_logical_partitioning(nn.initializers.normal(1 / math.sqrt(math.prod(in_shape))),
                                        tuple(axes[:n_in]) + ("lora_rank",))
  b_init = nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + tuple(axes[n_in:]))
  a = module.variable("lora", "lora_a", lambda: a_init(module.make_rng("params"), in_shape + (lora.rank,),
                                                       param_dtype)).value
  b = module.variable("lora", "lora_b", lambda: b_init(module.make_rng("params"), (lora.rank,) + out_shape,
                                                       param_dtype)).value
  delta = jnp.tensordot(jnp.tensordot(x, a.astype(dtype), axes=n_in), b.astype(dtype), axes=1)
  return y + jnp.asarray(lora.scale, dtype) * delta


class Embed(nn.Module):
  """Lookup table [num_embeddings, D] -> activations in the compute dtype."""
  config: ModelConfig
  num_embeddings: int
  axes: tuple[str | None, str]

  def setup(self):
    self.embedding = _param(self, "embedding", (self.num_embeddings, self.config.d_model), self.axes,
                            _normal(self.config))

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [B, L] int -> [B, L, D]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.config.dtype)


class LMHead(nn.Module):
  """Untied unembedding kernel [D, V]."""
  config: ModelConfig

  def setup(self):
    self.kernel = _param(self, "kernel", (self.config.d_model, self.config.padded_vocab_size),
                         ("embed", "vocab"), _normal(self.config))


class Norm(nn.Module):
  """LayerNorm with bias (gpt2) or RMSNorm (llama), computed in float32. [..., D] -> [..., D]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    x32 = x.astype(jnp.float32)
    scale = _param(self, "scale", (c.d_model,), ("embed",), nn.initializers.ones)
    if c.family == "gpt2":
      bias = _param(self, "bias", (c.d_model,), ("embed",), nn.initializers.zeros)
      centred = x32 - x32.mean(-1, keepdims=True)
      y = centred * jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + c.norm_eps)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    else:
      y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + c.norm_eps)
      y = y * scale.astype(jnp.float32)
    return y.astype(c.dtype)


def rotary_inv_freq(config: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies [Dh / 2] (float64 numpy), with Llama 3.1 scaling if configured."""
  dh = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
  if config.rope_scaling is None:
    return inv_freq
  s = dict(config.rope_scaling)
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled)


def apply_rotary(x: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
  """HF rotate_half convention. x [B, L, N, Dh], positions [B, L] -> [B, L, N, Dh]."""
  inv_freq = jnp.asarray(rotary_inv_freq(config), jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, Dh]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with an optional per-layer KV cache.

  decode_attention: None (einsums), or a plug-in that computes decode steps (one new token per row
  with a cache); see the module docstring.
  """
  config: ModelConfig
  decode_attention: DecodeAttention | None = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_mask):
    """x [B, L, D]; positions [B, L]; mask [B, L, L] bool over the new tokens; layer_cache None or
    (k, v) each [B, K, S, Dh] heads-major (read only); cache_mask [B, 1, S] bool: cache slots every new
    token sees.

    Returns (out [B, L, D], (k, v) of the new tokens, each [B, K, L, Dh] in the cache's layout; None
    without a cache).
    """
    c = self.config
    dtype = jnp.dtype(c.dtype)
    qkv_bias = c.family == "gpt2" or c.qkv_bias
    q = _DenseIn(c, c.num_heads, "heads", qkv_bias, name="q")(x)
    k = _DenseIn(c, c.num_kv_heads, "kv_heads", qkv_bias, name="k")(x)
    v = _DenseIn(c, c.num_kv_heads, "kv_heads", qkv_bias, name="v")(x)
    if c.family == "llama":
      q = apply_rotary(q, positions, c)
      k = apply_rotary(k, positions, c)
    q = logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    k = logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
    v = logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))

    b, l = q.shape[:2]
    groups = c.num_heads // c.num_kv_heads
    # Query head h = kv_head * groups + g, as HF's repeat_kv.
    q = q.reshape(b, l, c.num_kv_heads, groups, c.head_dim)
    new_kv = None if layer_cache is None else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    if l == 1 and layer_cache is not None and self.decode_attention is not None:
      # A decode step by the plug-in: the cache is handed over as stored.
      out = self.decode_attention(q[:, 0], layer_cache[0], layer_cache[1], cache_mask[:, 0], k[:, 0],
                                  v[:, 0], 1 / np.sqrt(c.head_dim))
      out = logical_constraint(out.reshape(b, l, c.num_heads, c.head_dim),
                               ("batch", "length", "heads", "head_dim"))
      return _DenseOut(c, name="o")(out.astype(dtype)), new_kv
    # (keys, values, mask, einsum spelling of the key/value operand): new tokens are [B, L, K, Dh],
    # the cache is heads-major [B, K, S, Dh] and is contracted as stored (no transpose, no copy).
    blocks = [(k, v, mask, "bskd")]
    if layer_cache is not None:
      # Cached keys first; one softmax over [cache slots, new tokens].
      blocks.insert(0, (layer_cache[0].astype(dtype), layer_cache[1].astype(dtype), cache_mask, "bksd"))
    scores = jnp.concatenate([
        jnp.where(m[:, None, None],
                  jnp.einsum(f"blkgd,{spec}->bkgls", q, bk, preferred_element_type=jnp.float32), _MASKED_SCORE)
        for bk, _, m, spec in blocks], axis=-1) / np.sqrt(c.head_dim)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out, offset = 0, 0
    for bk, bv, _, spec in blocks:
      width = bk.shape[spec.index("s")]
      out = out + jnp.einsum(f"bkgls,{spec}->blkgd", probs[..., offset:offset + width], bv)
      offset += width
    out = out.reshape(b, l, c.num_heads, c.head_dim)
    out = logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    return _DenseOut(c, name="o")(out), new_kv


class _DenseIn(nn.Module):
  """[B, L, D] -> [B, L, N, Dh] with kernel [D, N, Dh] (+ bias [N, Dh])."""
  config: ModelConfig
  num: int
  axis: str
  with_bias: bool

  @nn.compact
  def __call__(self, x):
    c = self.config
    axes = ("embed", self.axis, "head_dim")
    kernel = _param(self, "kernel", (c.d_model, self.num, c.head_dim), axes, _normal(c))
    y = _project(self, x, kernel, axes, "bld,dnh->blnh")
    if self.with_bias:
      bias = _param(self, "bias", (self.num, c.head_dim), (self.axis, "head_dim"), nn.initializers.zeros)
      y = y + bias.astype(c.dtype)
    return y


class _DenseOut(nn.Module):
  """Attention output projection [B, L, H, Dh] -> [B, L, D], kernel [H, Dh, D] (+ bias [D] gpt2)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    axes = ("heads", "head_dim", "embed")
    kernel = _param(self, "kernel", (c.num_heads, c.head_dim, c.d_model), axes, _normal(c))
    y = _project(self, x, kernel, axes, "blhk,hkd->bld")
    if c.family == "gpt2":
      y = y + _param(self, "bias", (c.d_model,), ("embed",), nn.initializers.zeros).astype(c.dtype)
    return y


class _Dense(nn.Module):
  """[..., n_in] -> [..., n_out] with kernel [n_in, n_out] (+ bias [n_out])."""
  config: ModelConfig
  shape: tuple[int, int]
  axes: tuple[str, str]
  with_bias: bool

  @nn.compact
  def __call__(self, x):
    c = self.config
    kernel = _param(self, "kernel", self.shape, self.axes, _normal(c))
    y = _project(self, x, kernel, self.axes, "...i,io->...o")
    if self.with_bias:
      y = y + _param(self, "bias", self.shape[1:], self.axes[1:], nn.initializers.zeros).astype(c.dtype)
    return y


class Mlp(nn.Module):
  """SwiGLU (llama) or gelu_new MLP with biases (gpt2). [B, L, D] -> [B, L, D]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gpt2 = c.family == "gpt2"
    up = _Dense(c, (c.d_model, c.mlp_dim), ("embed", "mlp"), gpt2, name="up")(x)
    if gpt2:
      h = jax.nn.gelu(up, approximate=True)  # gelu_new is the tanh approximation
    else:
      gate = _Dense(c, (c.d_model, c.mlp_dim), ("embed", "mlp"), False, name="gate")(x)
      act = jax.nn.silu if c.activation == "silu" else lambda t: jax.nn.gelu(t, approximate=True)
      h = act(gate) * up
    h = logical_constraint(h, ("batch", "length", "mlp"))
    return _Dense(c, (c.mlp_dim, c.d_model), ("mlp", "embed"), gpt2, name="down")(h)


class Block(nn.Module):
  """Pre-norm transformer block; signature shaped for nn.scan (carry x, then per-layer cache).

  lora: the Transformer's LoraConfig (or None), read by the projections inside (`_project`).
  """
  config: ModelConfig
  decode_attention: DecodeAttention | None = None  # see Attention
  lora: Any = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_mask):
    """x [B, L, D] -> (x [B, L, D], new tokens' (k, v)); arguments as Attention's."""
    c = self.config
    attn_out, new_kv = Attention(c, self.decode_attention, name="attn")(Norm(c, name="attn_norm")(x), positions, mask,
                                                 layer_cache, cache_mask)
    x = x + attn_out
    x = x + Mlp(c, name="mlp")(Norm(c, name="mlp_norm")(x))
    x = logical_constraint(x, ("batch", "length", "embed"))
    return x, new_kv


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(config: ModelConfig):
  if config.remat_policy == "none":
    return Block
  # prevent_cse is only needed outside scan (scan already stops CSE across the remat boundary).
  return nn.remat(Block, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)


class Transformer(nn.Module):
  """Decoder-only LM. See the module docstring for masking; `config.family` picks the layout.

  decode_attention: None (einsums everywhere), or a plug-in for decode steps (module docstring).
  lora: None, or a `qsft_jax.models.lora.LoraConfig`: with rank > 0 the targeted projections add
    their adapter (collection "lora", read by every projection through `_project`).
  """
  config: ModelConfig
  decode_attention: DecodeAttention | None = None
  lora: Any = None

  def setup(self):
    c = self.config
    self.embed = Embed(c, c.padded_vocab_size, ("vocab", "embed"))
    if c.family == "gpt2":
      self.pos_embed = Embed(c, c.max_position_embeddings, (None, "embed"))
    block = _block_class(c)
    if c.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(c, self.decode_attention, self.lora)
    else:
      # A list attribute in setup names its modules layers_0, layers_1, ...
      self.layers = [block(c, self.decode_attention, self.lora) for _ in range(c.num_layers)]
    self.final_norm = Norm(c)
    if not c.tie_embeddings:
      self.lm_head = LMHead(c)

  def _forward(self, tokens, positions, segment_ids, cache):
    """(final-normed hidden [B, L, D], new cache or None); see hidden_states."""
    c = self.config
    if tokens.ndim != 2 or positions.shape != tokens.shape or segment_ids.shape != tokens.shape:
      raise ValueError(f"tokens, positions, segment_ids must all be [B, L]; got {tokens.shape}, "
                       f"{positions.shape}, {segment_ids.shape}")
    x = self.embed(tokens)
    if c.family == "gpt2":
      x = x + self.pos_embed(positions)
    x = logical_constraint(x, ("batch", "length", "embed"))

    length = tokens.shape[1]
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, L, L]
    kv, cache_mask = None, None
    if cache is not None:
      index = jnp.asarray(cache["index"], jnp.int32)
      slots = jnp.arange(cache["valid"].shape[1])
      cache_mask = (cache["valid"] & (slots < index)[None])[:, None, :]  # [B, 1, S]
      kv = (cache["k"], cache["v"])

    # Each cache write below must data-depend on the read of the old values it overwrites: otherwise
    # XLA's copy insertion cannot prove the read happens first and copies the whole (donated) cache
    # every step (an optimization_barrier does not survive to copy insertion). Adding 0 * (a hidden value
    # per row computed after the read) creates that dependency at no cost; it leaves the values unchanged
    # unless the hidden state is already inf / nan.
    def write(old, new, hidden_after_read, start):
      order = (0 * hidden_after_read[:, :1, :1].astype(jnp.float32)).reshape(
          (1,) * (new.ndim - 4) + (-1, 1, 1, 1))  # broadcasts over [..., B, K, L, Dh]
      return jax.lax.dynamic_update_slice(old, (new + order).astype(old.dtype), start)

    new_k = new_v = None
    if c.scan_layers:
      x, new_kv = self.layers(x, positions, mask, kv, cache_mask)  # new_kv: [layers, B, K, L, Dh] each
      if cache is not None:
        start = (0, 0, 0, index, 0)  # heads-major: slots are axis 3
        new_k, new_v = (write(old, new, x, start) for old, new in zip(kv, new_kv))
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        x, layer_kv = layer(x, positions, mask, None if kv is None else (kv[0][i], kv[1][i]), cache_mask)
        if cache is not None:  # per-layer arrays: write layer i's slots once it has read them
          new_k.append(write(kv[0][i], layer_kv[0], x, (0, 0, index, 0)))
          new_v.append(write(kv[1][i], layer_kv[1], x, (0, 0, index, 0)))
      new_k, new_v = tuple(new_k), tuple(new_v)
    hidden = self.final_norm(x)
    new_cache = None
    if cache is not None:
      new_cache = {"k": new_k, "v": new_v,
                   "valid": jax.lax.dynamic_update_slice(cache["valid"], segment_ids != 0, (0, index)),
                   "index": index + length}
    return hidden, new_cache

  def hidden_states(self, tokens, positions, segment_ids, cache=None):
    """Final-normed hidden states [B, L, D] in the compute dtype (no unembedding).

    tokens, positions, segment_ids [B, L] int32. Without `cache` returns hidden; with `cache` (see
    init_cache) returns (hidden, new_cache): the L new tokens attend to the cache's valid slots and are
    written to slots [index, index + L), exactly as `__call__` with a cache. For prefill and decode
    steps that need only some rows' logits (e.g. the last column: `logits_from_hidden(hidden[:, -1],
    unembedding(params), vocab_size)`), which avoids the [B, L, V] logits of `__call__`.
    """
    hidden, new_cache = self._forward(tokens, positions, segment_ids, cache)
    return hidden if cache is None else (hidden, new_cache)

  def unembedding_matrix(self) -> jax.Array:
    """[D, V]: the embedding table transposed (tied) or the lm_head kernel."""
    if self.config.tie_embeddings:
      return self.embed.embedding.T
    return self.lm_head.kernel

  def __call__(self, tokens, positions, segment_ids, cache=None):
    """tokens, positions, segment_ids [B, L] int32 -> logits [B, L, V] float32 (padded columns
    = PAD_LOGIT); with `cache` (see init_cache) returns (logits, new_cache)."""
    hidden, new_cache = self._forward(tokens, positions, segment_ids, cache)
    logits = logits_from_hidden(hidden, self.unembedding_matrix(), self.config.vocab_size)
    logits = logical_constraint(logits, ("batch", "length", "vocab"))
    return logits if cache is None else (logits, new_cache)


def _inner(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Accepts the variables dict {"params": tree} or the tree itself."""
  if "params" in params and "embed" not in params:
    return params["params"]
  return params


def unembedding(params: Mapping[str, Any], config: ModelConfig | None = None) -> jax.Array:
  """The unembedding matrix [D, V] from params (variables dict or inner tree), no module needed.

  Tied embeddings: the embedding table transposed; untied: the lm_head kernel. Without `config`,
  tying is read off the tree (an lm_head present means untied).
  """
  tree = _inner(params)
  tied = ("lm_head" not in tree) if config is None else config.tie_embeddings
  return tree["embed"]["embedding"].T if tied else tree["lm_head"]["kernel"]


def mask_padded_vocab(logits: jax.Array, vocab_size: int, vocab_offset: int = 0) -> jax.Array:
  """Sets columns whose vocabulary id (vocab_offset + column) >= vocab_size to PAD_LOGIT.

  logits [..., Vc] float32 (Vc may be a chunk of the vocabulary starting at vocab_offset).
  """
  ids = vocab_offset + jnp.arange(logits.shape[-1])
  return jnp.where(ids < vocab_size, logits, PAD_LOGIT)


def logits_from_hidden(hidden: jax.Array, unembed: jax.Array, vocab_size: int,
                       vocab_offset: int = 0) -> jax.Array:
  """hidden [..., D] @ unembed [D, Vc] -> float32 logits [..., Vc] with padded columns masked.

  The matmul runs in hidden's dtype with float32 accumulation. The shared piece for the model's
  own logits and for losses that compute logits chunk by chunk.
  """
  logits = jnp.einsum("...d,dv->...v", hidden, unembed.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  return mask_padded_vocab(logits.astype(jnp.float32), vocab_size, vocab_offset)


def init_cache(config: ModelConfig, batch_size: int, cache_len: int, dtype=None) -> dict:
  """Empty KV cache: {"k", "v", "valid": [B, S] bool, "index": int32 []}.

  k and v are heads-major (kv heads before slots), [B, K, S, Dh] per layer: one stacked array
  [num_layers, B, K, S, Dh] each when `config.scan_layers` (scan slices it per layer inside the loop),
  else a tuple of num_layers arrays (a static slice of a stacked array is copied before XLA's CPU
  backend contracts it: a copy of the whole cache per step). New tokens are written along the S axis.
  dtype defaults to the compute dtype. The cache has a fixed length S so decode steps never recompile;
  writing past S is not checked inside jit (keep index + L <= S).
  """
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  layer_shape = (batch_size, config.num_kv_heads, cache_len, config.head_dim)
  if config.scan_layers:
    k, v = (jnp.zeros((config.num_layers,) + layer_shape, dtype) for _ in range(2))
  else:
    k, v = (tuple(jnp.zeros(layer_shape, dtype) for _ in range(config.num_layers)) for _ in range(2))
  return {"k": k, "v": v, "valid": jnp.zeros((batch_size, cache_len), bool), "index": jnp.zeros((), jnp.int32)}


def cache_logical_axes(config: ModelConfig) -> dict:
  """Logical axis names of init_cache(config, ...)'s pytree, for sharding it by the rule table."""
  layer = ("batch", "kv_heads", "length", "head_dim")
  kv = ("layers",) + layer if config.scan_layers else (layer,) * config.num_layers
  return {"k": kv, "v": kv, "valid": ("batch", "length"), "index": ()}


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict:
  """Unscanned layout (layers_0 .. layers_{n-1}) -> scanned layout ("layers" with leading axis n).

  Accepts and returns the same form (variables dict or inner tree). Works for numpy or jax leaves.
  """
  tree = _inner(params)
  missing = [f"layers_{i}" for i in range(num_layers) if f"layers_{i}" not in tree]
  if missing:
    raise ValueError(f"stack_layers: params lack {missing}")
  out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
  layer_trees = [tree[f"layers_{i}"] for i in range(num_layers)]
  stack = jnp.stack if isinstance(jax.tree.leaves(layer_trees[0])[0], jax.Array) else np.stack
  out["layers"] = jax.tree.map(lambda *xs: stack(xs), *layer_trees)
  return {"params": out} if tree is not params else out


def unstack_layers(params: Mapping[str, Any]) -> dict:
  """Scanned layout ("layers" with a leading layer axis) -> layers_0 .. layers_{n-1}."""
  tree = _inner(params)
  if "layers" not in tree:
    raise ValueError("unstack_layers: params have no scanned 'layers' subtree")
  out = {k: v for k, v in tree.items() if k != "layers"}
  num_layers = jax.tree.leaves(tree["layers"])[0].shape[0]
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], tree["layers"])
  return {"params": out} if tree is not params else out
