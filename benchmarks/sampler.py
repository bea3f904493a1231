"""Per-new-token cost of the sampler: two-model extraction vs single-model greedy, and 512 vs 64 tokens
of context.

    python benchmarks/sampler.py [--preset smollm2-135m | 8m] [--batch N] [--short N] [--long N] [--reps 5]
        [--dtype bfloat16] [--override FIELD=VALUE ...] [--decode_attention auto|dot|multiply_reduce|cpu_kernel]

Model: by default the SmolLM2-135M shape (the smallest real model the project loads; batch 4, random
weights, float32); `--preset 8m` runs a small Llama-style config (about 8M parameters, vocabulary 8192,
batch 8). It runs on whatever JAX backend is present; the Sampler picks its decode attention
(`--decode_attention=auto`: on one float32 CPU device the C++ kernel of
qsft_jax/kernels/cpu_decode_attention.py; the header line says which path ran).

Per-new-token time excludes compilation and prefill: each setting runs one compiled program (the
sampler's max_new_tokens is a traced value) with max_new_tokens = SHORT and = LONG, with no stop
tokens (every row generates exactly that many tokens); per token = (min T(LONG) - min T(SHORT)) /
(LONG - SHORT) over the repetitions. Both calls share the prefill, so it cancels; the minimum is used
because other load on the machine only ever adds time (the medians' ratios are reported too).
Repetitions are interleaved over the settings (round robin), so that a shared machine's changing load
affects all of them alike.

Figures and targets:
- extraction_over_greedy: the extraction sampler (pi_phi and p_theta, two KV caches, beta = 4) over
  single-model greedy decoding (pi_phi alone), both greedy as evaluation plays, 64-token prompts.
  Target: at most 2.2.
- ctx512_over_ctx64: greedy extraction per-token time at 512 vs 64 tokens of prompt, each with a cache
  sized to its context (cache_len = prompt bucket + LONG). Target: at most 1.5.
- ctx512_over_ctx64_fixed_cache: the same with one sampler whose cache_len (1024) serves both; every
  decode step attends over the whole fixed cache (masked), so this ratio shows only the prompt's effect.
- sampled_extraction_over_greedy: the extraction with temperature sampling instead of greedy.
- stop_strings_over_extraction: the extraction with three stop strings that never occur ("\n", "\n\n",
  "Answer:"; a 16-state stop table, `qsft_jax.sampler.stop_automaton`) over the extraction without
  stop strings: the per-token cost of following the decoded text on device.
- same_weights_extraction_over_greedy: a control, the extraction with theta given phi's own weight
  buffers (the same work, half the distinct weight bytes). Where it is well below the extraction, the
  two models' extra cost is their weights outgrowing a CPU cache that holds one model's, which no
  sampler can change.

Prints a table, then as the LAST line one JSON object with the six figures above,
greedy_ms_per_token, extraction_ms_per_token, and median_extraction_over_greedy and
median_ctx512_over_ctx64 (the same ratios from medians). Measured figures:
docs/results/benchmarks.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time

from absl import flags
import jax
import numpy as np

from qsft_jax import cli
from qsft_jax.models.config import ModelConfig, get_preset, param_count
from qsft_jax.sampler import DECODE_ATTENTION, Sampler
from qsft_jax import sharding
from qsft_jax.models import sharded

CONFIG = ModelConfig(family="llama", vocab_size=8192, d_model=256, num_layers=8, num_heads=4, num_kv_heads=2,
                     head_dim=64, mlp_dim=768, max_position_embeddings=2048, tie_embeddings=True)


def timed(sampler: Sampler, phi, theta, prompts, kwargs: dict, n: int) -> float:
  """Wall seconds of one decode call generating exactly n tokens per row."""
  start = time.perf_counter()
  out = sampler.decode(phi, theta, prompts, max_new_tokens=n, rng=0, **kwargs)
  assert (out.num_generated == n).all()
  return time.perf_counter() - start


class _Pieces:
  """A stand-in tokenizer for the stop-string setting: token i is the text "<i>" (no stop string)."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def token_bytes(self) -> list[bytes]:
    return [f"<{i}>".encode() for i in range(self.vocab_size)]


STOP_STRINGS = ("\n", "\n\n", "Answer:")


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("preset", "smollm2-135m", "A models.config preset, or '8m' for the small "
                      "8M-parameter model (random weights either way).", flag_values=fv)
  flags.DEFINE_integer("batch", None, "Rows [4; 8 for 8m].", flag_values=fv)
  flags.DEFINE_integer("short", None, "Fewer generated tokens [8; 16 for 8m].", flag_values=fv)
  flags.DEFINE_integer("long", None, "More generated tokens [40; 80 for 8m].", flag_values=fv)
  flags.DEFINE_integer("reps", 5, "Repetitions of each call.", flag_values=fv)
  flags.DEFINE_string("dtype", "", "Compute, cache and weight dtype, e.g. bfloat16 [the config's].",
                      flag_values=fv)
  flags.DEFINE_multi_string("override", [], "FIELD=VALUE replacing a ModelConfig field, e.g. "
                            "num_layers=16.", flag_values=fv)
  flags.DEFINE_enum("decode_attention", "auto", ("auto",) + tuple(DECODE_ATTENTION),
                    "The Sampler's decode attention.", flag_values=fv)
  return fv


def main(argv=None) -> dict:
  """Runs the benchmark; argv as sys.argv holds it (the program name first). Returns the JSON record."""
  args = define_flags()
  cli.parse(args, argv, prog="python benchmarks/sampler.py", doc=__doc__)
  small = args.preset == "8m"
  config = CONFIG if small else get_preset(args.preset)
  for name, (default_small, default_real) in {"batch": (8, 4), "short": (16, 8), "long": (80, 40)}.items():
    if getattr(args, name) is None:
      setattr(args, name, default_small if small else default_real)
  for item in args.override:
    field, _, value = item.partition("=")
    config = dataclasses.replace(config, **{field: int(value) if value.isdigit() else value})
  if args.dtype:
    config = dataclasses.replace(config, dtype=args.dtype, param_dtype=args.dtype)  # inference weights too

  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  phi = sharded.init_params_sharded(config, jax.random.key(0), mesh, rules)
  theta = sharded.init_params_sharded(config, jax.random.key(1), mesh, rules)
  rng = np.random.default_rng(0)

  def prompts(length):
    return [[1] + rng.integers(4, config.vocab_size, size=length - 1).tolist() for _ in range(args.batch)]

  # Greedy, as evaluation plays (qsft_jax.evaluate's default); the sampled extraction is timed as well.
  extract = dict(mode="extract", beta=4.0, greedy=True)
  extract_sampled = dict(mode="extract", beta=4.0, temperature=1.0)
  greedy = dict(mode="extract", beta=0.0, greedy=True)  # pi_phi alone; theta never runs
  extract_stops = dict(extract, stop_strings=STOP_STRINGS, tokenizer=_Pieces(config.vocab_size))
  settings = {  # name -> (label, prompt length, cache length, sampler kwargs)
      "greedy64": ("greedy, pi_phi alone", 64, 64 + args.long, greedy),
      "extract64": ("extraction, greedy", 64, 64 + args.long, extract),
      "sampled64": ("extraction, sampled", 64, 64 + args.long, extract_sampled),
      # Control: theta's weights are phi's own buffers, so the two models read one set of weight bytes.
      # Where it runs well under "extraction, greedy", the extra cost of two models is their weights
      # outgrowing a CPU cache, not the sampler.
      "same64": ("extraction, same weights", 64, 64 + args.long, extract),
      "stops64": ("extraction, stop strings", 64, 64 + args.long, extract_stops),
      "extract512": ("extraction, greedy", 512, 512 + args.long, extract),
      "fixed64": ("extraction, fixed cache", 64, 1024, extract),
      "fixed512": ("extraction, fixed cache", 512, 1024, extract),
  }
  runs, first = {}, {}
  for name, (_, prompt_len, cache_len, kwargs) in settings.items():
    sampler = Sampler(config, mesh=mesh, rules=rules, cache_len=cache_len,
                      decode_attention=args.decode_attention)
    attention = sampler.decode_attention  # what "auto" resolved to
    runs[name] = functools.partial(timed, sampler, phi, phi if name == "same64" else theta, prompts(prompt_len),
                                   kwargs)
    first[name] = runs[name](args.short)  # compiles (max_new_tokens is traced: one program per setting)
    runs[name](args.long)
  # Interleaved repetitions (round robin over settings), so that a change in machine load during the run
  # hits every setting alike. Per setting the fastest call of each length: other processes only ever add
  # time, and at 512 tokens the prefill (which the difference cancels only on average) is long enough for
  # its noise to swamp medians of a 32-token difference. The medians' figures are printed as well.
  times = {name: {args.short: [], args.long: []} for name in settings}
  for _ in range(args.reps):
    for name in settings:
      for n in (args.short, args.long):
        times[name][n].append(runs[name](n))

  def per_token_by(stat):
    return {name: (stat(t[args.long]) - stat(t[args.short])) / (args.long - args.short) for name, t in times.items()}

  per_token, per_token_median = per_token_by(np.min), per_token_by(np.median)
  rows = [(label, p, c, per_token[name], first[name]) for name, (label, p, c, _) in settings.items()]
  g64, e64, s64, same64, stops64, e512, f64, f512 = (
      per_token[k] for k in ("greedy64", "extract64", "sampled64", "same64", "stops64", "extract512", "fixed64",
                             "fixed512"))

  print(f"sampler benchmark: {param_count(config) / 1e6:.1f}M-parameter {args.preset} "
        f"({config.dtype}), batch {args.batch}, "
        f"backend {jax.default_backend()}, decode attention {attention}, "
        f"per-token = (T({args.long}) - T({args.short})) / {args.long - args.short}")
  print(f"{'setting':<26} {'prompt':>6} {'cache':>6} {'ms/token':>9} {'tokens/s':>9} {'compile+1st s':>14}")
  for name, p, c, t, first in rows:
    print(f"{name:<26} {p:>6} {c:>6} {t * 1e3:>9.3f} {args.batch / t:>9.0f} {first:>14.2f}")
  figures = {
      "extraction_over_greedy": round(e64 / g64, 3),
      "ctx512_over_ctx64": round(e512 / e64, 3),
      "ctx512_over_ctx64_fixed_cache": round(f512 / f64, 3),
      "sampled_extraction_over_greedy": round(s64 / g64, 3),
      "same_weights_extraction_over_greedy": round(same64 / g64, 3),
      "stop_strings_over_extraction": round(stops64 / e64, 3),
      "greedy_ms_per_token": round(g64 * 1e3, 4),
      "extraction_ms_per_token": round(e64 * 1e3, 4),
      "median_extraction_over_greedy": round(per_token_median["extract64"] / per_token_median["greedy64"], 3),
      "median_ctx512_over_ctx64": round(per_token_median["extract512"] / per_token_median["extract64"], 3),
  }
  print(f"extraction / greedy: {figures['extraction_over_greedy']:.2f} (target <= 2.2); "
        f"ctx 512 / 64: {figures['ctx512_over_ctx64']:.2f} (target <= 1.5); "
        f"fixed cache: {figures['ctx512_over_ctx64_fixed_cache']:.2f}; "
        f"sampled extraction / greedy: {figures['sampled_extraction_over_greedy']:.2f}; "
        f"same-weights control / greedy: {figures['same_weights_extraction_over_greedy']:.2f}; "
        f"stop strings / extraction: {figures['stop_strings_over_extraction']:.2f}; "
        f"from medians: {figures['median_extraction_over_greedy']:.2f} and {figures['median_ctx512_over_ctx64']:.2f}")
  print(json.dumps(figures))
  return figures


if __name__ == "__main__":
  cli.run(main)
