"""The readable per-chip report of an AOT result (`qsft_jax.aot.driver.run`)."""
from __future__ import annotations


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB"


def format_report(result: dict) -> str:
  """Readable per-chip report of `driver.run`'s result."""
  lines = [f"{result['model']} ({result['params'] / 1e9:.2f}B params) on {result['topology']}"
           f" x {result['num_slices']} slice(s) = {result['chips']} chips, mesh {result['mesh']}, "
           f"batch {result['batch']} x {result['seq']}, microbatches {result['microbatches']}, "
           f"remat {result['remat']}, scan {result['scan']}, dtype {result['dtype']}/"
           f"{result['param_dtype']}, theta_bar {result['target_dtype']}, phi {result['behaviour_dtype']}, "
           f"AdamW mu/nu {result['mu_dtype']}/{result['nu_dtype']}"]
  for kind, r in result["steps"].items():
    if "error" in r:
      lines.append(f"\n[{kind}] NOT BUILT after {r['compile_s']} s: needs {_gib(r['peak_bytes'])} per chip, "
                   f"{_gib(r['over_bytes'])} over the {_gib(r['hbm_limit_bytes'])} XLA may use of "
                   f"{_gib(r['hbm_bytes'])} HBM: DOES NOT FIT\n  {r['error']}")
      continue
    lines.append(f"\n[{kind}] compiled in {r['compile_s']} s ({r['compile_s_with_probes']} s with "
                 f"cost probes); per chip:")
    lines.append(f"  memory: arguments {_gib(r['argument_bytes'])}, temporaries {_gib(r['temp_bytes'])}, "
                 f"outputs {_gib(r['output_bytes'])} (aliased {_gib(r['alias_bytes'])}) -> peak "
                 f"{_gib(r['peak_bytes'])} of {_gib(r['hbm_bytes'])} HBM: "
                 f"{'fits' if r['fits'] else 'DOES NOT FIT'}")
    lines.append(f"  FLOPs: compiled {r['flops_per_chip']:.4g}, analytic {r['analytic_flops_per_chip']:.4g} "
                 f"(ratio {r['flops_ratio']:.3f}; {r['cost_source']})")
    lines.append(f"  collectives: {r['collectives_source']}")
    lines.append(f"  HBM bytes accessed {r['hbm_bytes_per_chip']:.4g}; collective bytes sent: ICI "
                 f"{r['ici_bytes_per_chip']:.4g}, DCN {r['dcn_bytes_per_chip']:.4g}")
    for op, c in r["collectives"].items():
      lines.append(f"    {op:18s} x{c['count']:<6g} {c['moved_bytes']:.4g} bytes"
                   + (f" ({c['dcn_count']:g} over DCN)" if c["dcn_count"] else ""))
    lines.append(f"  roofline: compute {r['compute_s'] * 1e3:.3f} ms, HBM {r['hbm_s'] * 1e3:.3f} ms, "
                 f"ICI {r['ici_s'] * 1e3:.3f} ms, DCN {r['dcn_s'] * 1e3:.3f} ms -> step >= "
                 f"{r['step_s'] * 1e3:.3f} ms ({r['bound']}-bound), MFU <= {r['mfu']:.1%}")
  return "\n".join(lines)
