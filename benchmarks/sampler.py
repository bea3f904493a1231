"""Per-new-token cost of the sampler: two-model extraction vs single-model greedy, and 512 vs 64 tokens
of context.

Model: a small Llama-style config (about 8M parameters, vocabulary 8192), random weights, float32, on
whatever JAX backend is present (CPU here). Batch of 8 prompts.

Per-new-token time excludes compilation and prefill: each setting runs one compiled program (the
sampler's max_new_tokens is a traced value) with max_new_tokens = SHORT and = LONG, with no stop
tokens (every row generates exactly that many tokens); per token = (median T(LONG) - median T(SHORT)) /
(LONG - SHORT). Both calls share the prefill, so it cancels. Repetitions are interleaved over the
settings (round robin), so that a shared machine's changing load affects all of them alike.

Figures (DESIGN.md section 6):
- extraction_over_greedy: the extraction sampler (pi_phi and p_theta, two KV caches, beta = 4) over
  single-model greedy decoding (pi_phi alone), both greedy as evaluation plays, 64-token prompts.
  Target: at most 2.2. sampled_extraction_over_greedy: the same with temperature sampling (the
  Gumbel noise for B x V scores costs ~1.9 ms per step on this CPU at V = 8192, whatever the model).
- ctx512_over_ctx64: greedy extraction per-token time at 512 vs 64 tokens of prompt, each with a cache
  sized to its context (cache_len = prompt bucket + LONG). Target: at most 1.5.
- ctx512_over_ctx64_fixed_cache: the same with one sampler whose cache_len (1024) serves both; every
  decode step attends over the whole fixed cache (masked), so this ratio shows only the prompt's effect.

Measured 2026-11-29 on the 2-core CPU (otherwise idle), after the cache became per-layer arrays with a
multiply-and-reduce decode contraction (`ModelConfig.decode_attention`, which the Sampler picks on CPU). ms per token; extraction greedy:

  model (batch)                       greedy   extraction  at 512   extraction/greedy  ctx512/ctx64
  8M default (8)                        4.06      14.07     22.5          3.47             1.60
  SmolLM2-135M f32 (4), --reps 3        58.0       92.4    151.4          1.59             1.64
    --short 8 --long 40
  SmolLM2-135M, --dtype bfloat16         62.9      125.9    200.4          2.00             1.59
    (same options)

Re-measured 2026-11-29 later the same day on a fresh machine of the same kind, idle, same code:

  8M default (8), two runs               6.57      14.13     29.7          2.15             2.10
                                         6.01      13.71     27.3          2.28             1.99
  SmolLM2-135M f32 (options as above)    50.8       97.2    149.7          1.91             1.54

The 8M model's single-model step moves between 4 and 6.6 ms from machine to machine while its
two-model step stays near 14 ms, which is why its extraction/greedy ratio ranges 2.15-3.47.

Before that change, the same day and machine, with the sampled extraction (whose constant sampling cost
lowers the context ratio): 8M 25.7 ms per token at 512 (ctx ratio 1.88), SmolLM2-135M 223.6 ms (1.84).

Where the time goes. Per decode step the default model reads 33.6 MB of weights and, at batch 8 in
float32, 9.4 MB of KV cache at 144 slots against 38.8 MB at 592: a step that reads each byte once
touches 43.0 vs 72.4 MB, a ratio of 1.68, so for this model 1.5 is out of reach wherever decoding is
memory-bound. Its single-model step (~4 ms) runs about 280 fused operations (counted in the compiled
while-loop body), ~14 us each on average, and reads its bytes at ~9 GB/s. Why two models cost 3.5x one
here is not explained: the two-model loop body has about twice the fused operations (559 vs 283) and
no cache copies; at 135M parameters, where the weights dominate, two models cost 1.6x one. For SmolLM2-135M the byte bound is
about 1.15 (1.08 GB of weights for the two models, 0.04 vs 0.20 GB of cache); the measured 1.64 comes
from the attention fusions reading the cache at a few GB/s, against ~9 GB/s for the weight matmuls.
Fixed already: XLA's CPU dot copies each layer's slice of a stacked [layers, ...] cache and runs a
batched matrix-vector product slowly; per-layer arrays and the multiply-and-reduce form remove both
(in isolation, 30 layers of one model's attention at 552 slots: 66-70 ms with the stacked cache and the
dot, 36-43 ms with per-layer arrays and the dot, 15-23 ms with per-layer arrays and multiply-and-reduce). Tried without gain: a [B, K, Dh, S] key
layout (the score reduction over a non-minor axis; isolated, within the run-to-run noise). In isolation
the 30 layers' attention of one model reads its 102 MB of cache at 552 slots in 17-20 ms (5-6 GB/s),
about what one core streams here, while the weight matmuls use both cores.

Also tried (same day, 8M default unless stated; each within or beyond the noise, none kept):
- a bfloat16 cache under float32 compute (half the cache bytes): slower, since the conversion in the
  attention costs more than the bytes it saves (fixed 1024-slot cache 48.6 vs 33.8 ms per token,
  extraction at 512 32.7 vs 29.7);
- the dot contraction with oneDNN (`XLA_FLAGS=--xla_cpu_use_onednn=true`, `--override
  decode_attention=dot`): ctx ratio 2.52 (the dot with default flags: 2.38);
  (in that default-flags run the dot's extraction cost 16.4 ms per token at 64 tokens of context and 39.1
  at 512; the two multiply-and-reduce runs of the same day: 13.7-14.1 and 27.3-29.7);
- XLA's YNNPACK fusions off (`--xla_cpu_experimental_ynn_fusion_type=`): every step 3-6x slower;
- the scores as a [B, K, S, G] matrix-vector product (einsum bksd,bkgd->bksg, values by the dot): a whole
  attention layer in isolation, softmax included, is within 10% across that form, multiply-and-reduce
  and the dot, at the 8M and SmolLM2 shapes; in one whole 8M run (a scratch edit, not kept) it gave
  24.8 ms per token at 512 and a ctx ratio of 1.79, against 27.3-29.7 and 1.99-2.10 with
  multiply-and-reduce the same day: perhaps 10%, within the run-to-run spread, and not pursued;
- running theta's step strictly after phi's (a data dependency between them): 13.7 vs 14.1 ms;
- 16 layers instead of 8 (`--override num_layers=16`): extraction/greedy 2.11, so the two-model cost is
  not from the weights outgrowing a CPU cache.

Prints a table, then as the LAST line one JSON object with those keys.

    python benchmarks/sampler.py [--batch 8] [--short 16] [--long 80] [--reps 5] [--preset smollm2-135m] [--dtype bfloat16]
        [--override FIELD=VALUE ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import numpy as np

from qsft_jax.models.config import ModelConfig, get_preset, param_count
from qsft_jax.sampler import Sampler
from qsft_jax import sharding

CONFIG = ModelConfig(family="llama", vocab_size=8192, d_model=256, num_layers=8, num_heads=4, num_kv_heads=2,
                     head_dim=64, mlp_dim=768, max_position_embeddings=2048, tie_embeddings=True)


def timed(sampler: Sampler, phi, theta, prompts, kwargs: dict, n: int) -> float:
  """Wall seconds of one decode call generating exactly n tokens per row."""
  start = time.perf_counter()
  out = sampler.decode(phi, theta, prompts, max_new_tokens=n, rng=0, **kwargs)
  assert (out.num_generated == n).all()
  return time.perf_counter() - start


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--short", type=int, default=16)
  parser.add_argument("--long", type=int, default=80)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--preset", default="", help="a models.config preset (e.g. smollm2-135m) instead of "
                      "the default 8M model; weights are random either way")
  parser.add_argument("--dtype", default="", help="compute, cache and weight dtype, e.g. bfloat16 [the config's]")
  parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                      help="replace a ModelConfig field, e.g. num_layers=16 or decode_attention=dot (repeatable)")
  args = parser.parse_args(argv)
  config = get_preset(args.preset) if args.preset else CONFIG
  for item in args.override:
    field, _, value = item.partition("=")
    config = dataclasses.replace(config, **{field: int(value) if value.isdigit() else value})
  if args.dtype:
    config = dataclasses.replace(config, dtype=args.dtype, param_dtype=args.dtype)  # inference weights too

  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  phi = sharding.init_params_sharded(config, jax.random.key(0), mesh, rules)
  theta = sharding.init_params_sharded(config, jax.random.key(1), mesh, rules)
  rng = np.random.default_rng(0)

  def prompts(length):
    return [[1] + rng.integers(4, config.vocab_size, size=length - 1).tolist() for _ in range(args.batch)]

  # Greedy, as evaluation plays (qsft_jax.evaluate's default); the sampled extraction is timed as well.
  extract = dict(mode="extract", beta=4.0, greedy=True)
  extract_sampled = dict(mode="extract", beta=4.0, temperature=1.0)
  greedy = dict(mode="extract", beta=0.0, greedy=True)  # pi_phi alone; theta never runs
  settings = {  # name -> (label, prompt length, cache length, sampler kwargs)
      "greedy64": ("greedy, pi_phi alone", 64, 64 + args.long, greedy),
      "extract64": ("extraction, greedy", 64, 64 + args.long, extract),
      "sampled64": ("extraction, sampled", 64, 64 + args.long, extract_sampled),
      "extract512": ("extraction, greedy", 512, 512 + args.long, extract),
      "fixed64": ("extraction, fixed cache", 64, 1024, extract),
      "fixed512": ("extraction, fixed cache", 512, 1024, extract),
  }
  runs, first = {}, {}
  for name, (_, prompt_len, cache_len, kwargs) in settings.items():
    sampler = Sampler(config, mesh=mesh, rules=rules, cache_len=cache_len)
    runs[name] = functools.partial(timed, sampler, phi, theta, prompts(prompt_len), kwargs)
    first[name] = runs[name](args.short)  # compiles (max_new_tokens is traced: one program per setting)
    runs[name](args.long)
  # Interleaved repetitions (round robin over settings), so that a change in machine load during the run
  # hits every setting alike; medians per setting.
  times = {name: {args.short: [], args.long: []} for name in settings}
  for _ in range(args.reps):
    for name in settings:
      for n in (args.short, args.long):
        times[name][n].append(runs[name](n))
  per_token = {name: (np.median(t[args.long]) - np.median(t[args.short])) / (args.long - args.short)
               for name, t in times.items()}
  rows = [(label, p, c, per_token[name], first[name]) for name, (label, p, c, _) in settings.items()]
  g64, e64, s64, e512, f64, f512 = (per_token[k] for k in ("greedy64", "extract64", "sampled64", "extract512",
                                                            "fixed64", "fixed512"))

  print(f"sampler benchmark: {param_count(config) / 1e6:.1f}M-parameter {args.preset or 'llama'} "
        f"({config.dtype}), batch {args.batch}, "
        f"backend {jax.default_backend()}, per-token = (T({args.long}) - T({args.short})) / {args.long - args.short}")
  print(f"{'setting':<26} {'prompt':>6} {'cache':>6} {'ms/token':>9} {'tokens/s':>9} {'compile+1st s':>14}")
  for name, p, c, t, first in rows:
    print(f"{name:<26} {p:>6} {c:>6} {t * 1e3:>9.3f} {args.batch / t:>9.0f} {first:>14.2f}")
  figures = {
      "extraction_over_greedy": round(e64 / g64, 3),
      "ctx512_over_ctx64": round(e512 / e64, 3),
      "ctx512_over_ctx64_fixed_cache": round(f512 / f64, 3),
      "sampled_extraction_over_greedy": round(s64 / g64, 3),
      "greedy_ms_per_token": round(g64 * 1e3, 4),
      "extraction_ms_per_token": round(e64 * 1e3, 4),
  }
  print(f"extraction / greedy: {figures['extraction_over_greedy']:.2f} (target <= 2.2); "
        f"ctx 512 / 64: {figures['ctx512_over_ctx64']:.2f} (target <= 1.5); "
        f"fixed cache: {figures['ctx512_over_ctx64_fixed_cache']:.2f}; "
        f"sampled extraction / greedy: {figures['sampled_extraction_over_greedy']:.2f}")
  print(json.dumps(figures))
  return figures


if __name__ == "__main__":
  main()
