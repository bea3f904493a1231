"""Decode-step attention plug-ins: platform-specific ways to attend one query per row over a KV cache.

The model (`qsft_jax.models.transformer.Attention`) computes attention one way, with einsums (dots),
which is what TPU and GPU programs want. A module attribute `decode_attention` of `Transformer`
(None by default, never part of `ModelConfig`) may replace that computation for decode steps only
(one new token per row with a cache); `qsft_jax.sampler.Sampler` picks one of these for its device.
Training and ahead-of-time TPU programs build `Transformer(config)` and never see a plug-in.

A plug-in is a callable

  decode_attention(q, k_cache, v_cache, cache_mask, k_new, v_new, scale) -> out

  q [B, K, G, Dh]: the new token's queries (query head h = kv head * G + g); k_cache, v_cache
  [B, K, S, Dh]: the cache as stored (heads-major); cache_mask [B, S] bool: the slots each row
  attends to; k_new, v_new [B, K, Dh]: the new token's own key and value (it always attends to
  itself); scale: the score scale (1 / sqrt(Dh)). out [B, K, G, Dh]: softmax over [valid cache slots,
  new token] of scale * q.k, times the values.

Modules: `xla_decode_attention` (multiply-and-reduce in XLA, any platform and dtype; XLA's CPU
backend runs it faster than its dot), `cpu_decode_attention` (a C++ XLA FFI custom call, CPU and
float32 only, built with the system compiler on first use from csrc/decode_attention.cc).
"""
