"""Decode-step attention as multiply-and-reduce in XLA (a plug-in; see qsft_jax.kernels).

One query per row against the cache is a batched matrix-vector product. Written as an elementwise
product and a sum rather than a dot, XLA's CPU backend fuses it into one pass over the cache instead
of a generic dot; TPU programs keep the model's dot (this form costs more HBM traffic there). The
Sampler uses it on the CPU where the C++ kernel does not apply (several devices, bfloat16, no
compiler).

Shapes: B rows, K kv heads, G query heads per kv head, S cache slots, Dh head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_MASKED_SCORE = float(np.finfo(np.float32).min)


def multiply_reduce(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cache_mask: jax.Array,
                    k_new: jax.Array, v_new: jax.Array, scale: float) -> jax.Array:
  """q [B, K, G, Dh]; k_cache, v_cache [B, K, S, Dh]; cache_mask [B, S] bool; k_new, v_new [B, K, Dh]
  -> [B, K, G, Dh] in q's dtype: softmax over [valid slots, new token] of scale * q.k, times the
  values. Scores and the softmax are float32."""
  f32 = lambda x: x.astype(jnp.float32)
  q32 = f32(q)
  cache_scores = (q32[:, :, :, None, :] * f32(k_cache)[:, :, None]).sum(-1) * scale  # [B, K, G, S]
  cache_scores = jnp.where(cache_mask[:, None, None, :], cache_scores, _MASKED_SCORE)
  new_score = (q32 * f32(k_new)[:, :, None]).sum(-1, keepdims=True) * scale  # [B, K, G, 1]
  probs = jax.nn.softmax(jnp.concatenate([cache_scores, new_score], axis=-1), axis=-1)
  out = (probs[..., :-1, None] * f32(v_cache)[:, :, None]).sum(-2)  # [B, K, G, Dh]
  out = out + probs[..., -1:] * f32(v_new)[:, :, None]
  return out.astype(q.dtype)
