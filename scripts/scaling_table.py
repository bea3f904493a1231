"""Builds docs/scaling.md: model shape x TPU slice, compiled ahead of time on this CPU machine.

    python scripts/scaling_table.py                 # compile the rows missing from the cache, write the doc
    python scripts/scaling_table.py --rows 8b-v5p   # (re)compile only these rows
    python scripts/scaling_table.py --doc-only      # rewrite docs/scaling.md from the cache
    python scripts/scaling_table.py --add-steps     # compile the ADDED_STEPS (8B / 70B BC) into cached rows

Every row runs `qsft_jax.aot.run` (BC and Q-SFT train steps; the decode step for the rows that ask
for it) and its figures are cached in docs/scaling_results.json, keyed by row name, with the time
each compile took; the doc is rendered from that cache, so an interrupted run keeps its finished rows.
Each row's "command" column is the `python -m qsft_jax.aot ...` line that reproduces it.
Needs the libtpu package (jax 0.10.2: libtpu==0.0.42.1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qsft_jax import aot  # noqa: E402
from qsft_jax.models.config import get_preset, param_count  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "docs", "scaling_results.json")
DOC = os.path.join(ROOT, "docs", "scaling.md")

# name -> (config file or None, extra `python -m qsft_jax.aot` flags, steps). --no-probes: memory and
# collectives of the real program only (FLOPs / HBM bytes not extrapolated; see qsft_jax.aot).
ROWS: dict[str, tuple[str | None, list[str], str]] = {
    "135m-v5e4": ("configs/pod_smollm2_135m.py", [], "bc,qsft,decode"),
    "1.7b-v5e16": ("configs/pod_smollm2_1p7b.py", [], "bc,qsft"),
    "1.7b-2xv5e16": ("configs/pod_smollm2_1p7b.py", ["--num_slices=2", "--mesh=data:2,fsdp:-1,tensor:1",
                                                      "--batch=128", "--no-probes"], "bc,qsft"),
    "8b-v5p128": ("configs/pod_llama3_8b.py", [], "qsft"),
    "8b-v5e16": ("configs/pod_llama3_8b.py", ["--topology=v5e:4x4", "--batch=16", "--no-probes"], "qsft"),
    "70b-v5p128": ("configs/pod_llama_70b.py", ["--no-probes"], "qsft"),
    # theta_bar and phi stored in bf16 (theta and AdamW moments float32): memory accounting only
    "8b-v5p128-bf16frozen": ("configs/pod_llama3_8b.py", ["--frozen_dtype=bfloat16", "--no-probes"], "qsft"),
    "70b-v5p128-bf16frozen": ("configs/pod_llama_70b.py", ["--frozen_dtype=bfloat16", "--no-probes"], "qsft"),
}

# Steps compiled after a row's own command, merged into its cached figures (`--add-steps`):
# name -> (extra flags, steps). The 8B / 70B BC steps without cost probes (memory and collectives).
ADDED_STEPS: dict[str, tuple[list[str], str]] = {
    "8b-v5p128": (["--no-probes"], "bc"),
    "8b-v5e16": ([], "bc"),
    "70b-v5p128": ([], "bc"),
}

# The BC step has no theta_bar / phi, so --frozen_dtype does not change it: these rows show the BC
# step of the row they vary (the same program) instead of compiling it again.
SAME_BC = {"8b-v5p128-bf16frozen": "8b-v5p128", "70b-v5p128-bf16frozen": "70b-v5p128"}


def command(name: str, added: bool = False) -> str:
  """The row's `python -m qsft_jax.aot` line (added=True: the line of its ADDED_STEPS)."""
  config, flags, steps = ROWS[name]
  if added:
    extra, steps = ADDED_STEPS[name]
    flags = flags + [f for f in extra if f not in flags]
  parts = ["python -m qsft_jax.aot"] + ([f"--config={config}"] if config else []) + flags
  return " ".join(parts + [f"--steps={steps}"])


def run_row(name: str, timeout_s: float, extra: list[str] = (), added: bool = False) -> dict:
  """Compiles one row in a subprocess (its command + `extra` flags; added=True: its ADDED_STEPS
  command); the result is the command's last (JSON) line. A compile that fails otherwise than over
  HBM, or one over `timeout_s`, is recorded as such."""
  config, flags, steps = ROWS[name]
  if added:
    more, steps = ADDED_STEPS[name]
    flags = flags + [f for f in more if f not in flags]
  argv = [sys.executable, "-m", "qsft_jax.aot"] + ([f"--config={config}"] if config else []) + flags + list(
      extra) + [f"--steps={steps}"]
  t0 = time.time()
  try:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
      result = json.loads(lines[-1])
    else:
      errors = [l.strip() for l in proc.stderr.splitlines() if "Error" in l or "RESOURCE_EXHAUSTED" in l]
      tail = errors[-1:] or [l for l in proc.stderr.strip().splitlines() if l.strip()][-3:]
      result = {"error": f"exit {proc.returncode}: {' '.join(tail)[:600]}"}
  except subprocess.TimeoutExpired:
    result = {"error": f"compile not finished after {timeout_s:.0f} s on this machine"}
  result["wall_s"] = round(time.time() - t0, 1)
  result["command"] = command(name, added)
  if extra:
    result["command_run"] = result["command"].replace(" --steps=", " " + " ".join(extra) + " --steps=")
  return result


def merge_probe_costs(new: dict, old: dict | None) -> dict:
  """A --no-probes recompile (memory, collectives) of a row whose cached run had cost probes: keeps the
  probes' FLOPs and HBM bytes and recomputes the roofline with the new collective bytes."""
  if not old or "steps" not in new or "steps" not in old:
    return new
  chip = aot.get_chip(new["topology"].split(":")[0])
  for kind, s in new["steps"].items():
    o = old["steps"].get(kind)
    if "error" in s or not o or "error" in o or not o["cost_source"].startswith("probes") or s.get("probes", True):
      continue
    s["flops_per_chip"], s["hbm_bytes_per_chip"] = o["flops_per_chip"], o["hbm_bytes_per_chip"]
    s["flops_ratio"] = o["flops_ratio"]
    s["cost_source"] = (o["cost_source"] + "; FLOPs and HBM bytes from the earlier run with probes "
                        f"(compile {o.get('compile_s_with_probes')} s), memory and collectives recompiled")
    s["probes"] = True
    t = aot.roofline(chip, s["flops_per_chip"], s["hbm_bytes_per_chip"], s["ici_bytes_per_chip"],
                     s["dcn_bytes_per_chip"])
    s.update(t)
    s["mfu"] = s["analytic_flops_per_chip"] / (chip.bf16_flops * t["step_s"]) if t["step_s"] else 0.0
  new["wall_s"] = round(new.get("wall_s", 0) + old.get("wall_s", 0), 1)
  return new


SPEC_KEYS = ("model", "params", "topology", "num_slices", "chips", "mesh", "batch", "seq", "microbatches",
             "remat", "scan", "dtype", "param_dtype")


def merge_added_steps(row: dict, added: dict) -> dict:
  """Merges an ADDED_STEPS compile into the cached row: its steps join the row's (each keeps the
  command that built it in `step_commands`) and its wall time adds to the row's."""
  if "error" in added or "steps" not in added:
    row.setdefault("added_errors", {})[added["command"]] = added.get("error", "no steps")
    return row
  diff = {k: (row.get(k), added.get(k)) for k in SPEC_KEYS if row.get(k) != added.get(k)}
  if diff:
    raise ValueError(f"added steps compiled for another shape: {diff}")
  for kind, s in added["steps"].items():
    row["steps"][kind] = s
    row.setdefault("step_commands", {})[kind] = added["command"]
  row["wall_s"] = round(row.get("wall_s", 0) + added.get("wall_s", 0), 1)
  return row


def analytic_state_gib(name: str) -> tuple[str, float, float]:
  """(slice, BC, Q-SFT) train-state GiB per chip from the parameter count alone, fully sharded:
  float32 params + 2 AdamW moments (+ theta_bar and phi) + float32 gradients. Activations excluded."""
  config_path, flags, _ = ROWS[name]
  config, module = aot.load_config_file(os.path.join(ROOT, config_path))
  spec = aot.spec_from_config(config, module, **{f.split("=")[0][2:]: f.split("=")[1] for f in flags
                                                 if f.startswith("--topology")})
  chip, dims = aot.parse_topology(spec.topology)
  num_slices = next((int(f.split("=")[1]) for f in flags if f.startswith("--num_slices")), 1)
  chips = num_slices
  for d in dims:
    chips *= d
  p = param_count(spec.model_config()) * 4 / chips / 2**30
  return f"{spec.topology} x {num_slices}" if num_slices > 1 else spec.topology, 4 * p, 6 * p


def _gib(x) -> str:
  return f"{x / 2**30:.1f}"


def _gb(x: float) -> str:
  return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _pct(x) -> str:
  return f"{100 * x:.0f}%"


def _real_flops(s: dict) -> bool:
  """Whether the step's FLOPs / HBM bytes cover the whole program (cost probes, or a loop-free program)
  rather than counting loop bodies once (--no-probes)."""
  return s.get("probes", True) or s["cost_source"] == "compiled program"


def _mfu(s: dict) -> str:
  """MFU cell. Steps compiled without cost probes get "<=" and the collectives' share of the compute
  time: their roofline compute time is the analytic FLOPs (no remat recomputation, no HBM term), so
  their MFU is 100% whenever the collectives fit under it, and the share says how close they come."""
  if _real_flops(s):
    return _pct(s["mfu"])
  comm = max(s["ici_s"], s["dcn_s"]) / s["compute_s"] if s["compute_s"] else 0.0
  return f"<= {_pct(s['mfu'])} (np; collectives {comm:.2f} of compute)"


def bc_step(results: dict, name: str) -> tuple[dict | None, str]:
  """The BC step shown for a row: its own, else (SAME_BC) the one of the row it varies; and that row."""
  s = (results.get(name) or {}).get("steps", {}).get("bc")
  if s is None and name in SAME_BC:
    return (results.get(SAME_BC[name]) or {}).get("steps", {}).get("bc"), SAME_BC[name]
  return s, name


def qsft_bc_ratios(r: dict, q: dict, b: dict) -> dict:
  """Q-SFT / BC ratios that hold with or without cost probes: peak memory and collective bytes from the
  real programs; FLOPs compiled where both steps have them, else analytic (5F / 3F); roofline time from
  the compiled roofline where both steps have real FLOPs, else max(analytic compute, ICI, DCN) of each."""
  peak_flops = aot.get_chip(r["topology"].split(":")[0]).bf16_flops
  both = _real_flops(q) and _real_flops(b)
  comm_q, comm_b = q["ici_bytes_per_chip"] + q["dcn_bytes_per_chip"], b["ici_bytes_per_chip"] + b["dcn_bytes_per_chip"]
  if both:
    time_ratio = q["step_s"] / b["step_s"]
  else:
    t = [max(s["analytic_flops_per_chip"] / peak_flops, s["ici_s"], s["dcn_s"]) for s in (q, b)]
    time_ratio = t[0] / t[1]
  return {"peak": q["peak_bytes"] / b["peak_bytes"], "comm": comm_q / comm_b if comm_b else float("nan"),
          "flops": (q["flops_per_chip"] / b["flops_per_chip"]) if both
          else q["analytic_flops_per_chip"] / b["analytic_flops_per_chip"],
          "flops_src": "compiled" if both else "analytic", "time": time_ratio, "time_src": "" if both else "np"}


def _collectives_cell(s: dict) -> str:
  short = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "collective-permute": "CP",
           "all-to-all": "A2A"}
  parts = [f"{short.get(op, op)} {c['moved_bytes'] / 1e9:.3g}" for op, c in sorted(s["collectives"].items())
           if c["moved_bytes"] >= 1e6]
  return ", ".join(parts) or "-"


def render(results: dict) -> str:
  """docs/scaling.md from the cached results."""
  out = [HEADER]
  out.append("| row | model (params) | slice | mesh | batch x L | Q-SFT fits | Q-SFT GiB/chip (args + temp) "
             "| BC GiB/chip | MFU BC | MFU Q-SFT | Q-SFT / BC peak GiB | Q-SFT / BC collective bytes "
             "| Q-SFT / BC FLOPs | Q-SFT / BC roofline time | bound | compile s |")
  out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name in ROWS:
    r = results.get(name)
    if r is None or "error" in r:
      slice_, bc_gib, q_gib = analytic_state_gib(name)
      why = "not compiled yet" if r is None else r["error"][:300]
      out.append(f"| {name} | {ROWS[name][0]} | {slice_} | | | {why} | analytic state only: {q_gib:.1f} "
                 f"| analytic {bc_gib:.1f} | | | | | | | | {'' if r is None else r['wall_s']} |")
      continue
    q = r["steps"].get("qsft")
    b, b_row = bc_step(results, name)
    built = {k: s for k, s in r["steps"].items() if "error" not in s}
    q_ok, b_ok = q if q and "error" not in q else None, b if b and "error" not in b else None
    slice_ = r["topology"] + (f" x {r['num_slices']}" if r["num_slices"] > 1 else "") + f" ({r['chips']} chips)"
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items())
    cells = [name, f"{r['model']} ({r['params'] / 1e9:.2f}B)", slice_, mesh, f"{r['batch']} x {r['seq']}"]
    if q_ok:
      cells += ["yes" if q["fits"] else "**no**",
                f"{_gib(q['peak_bytes'])} ({_gib(q['argument_bytes'])} + {_gib(q['temp_bytes'])}) "
                f"of {_gib(q['hbm_bytes'])}"]
    elif q:
      cells += ["**no**", f"needs {_gib(q['peak_bytes'])} of {_gib(q['hbm_limit_bytes'])} usable "
                f"({_gib(q['over_bytes'])} over)"]
    else:
      cells += ["-", "-"]
    cells.append((_gib(b["peak_bytes"]) + ("" if b_row == name else f" (row {b_row}'s BC)")) if b else "-")
    cells.append(_mfu(b_ok) if b_ok else "-")
    cells.append(_mfu(q_ok) if q_ok else "-")
    if q_ok and b_ok:
      x = qsft_bc_ratios(r, q_ok, b_ok)
      cells += [f"{x['peak']:.2f}", f"{x['comm']:.2f}",
                f"{x['flops']:.2f}" + (" (analytic 5F/3F)" if x["flops_src"] == "analytic" else ""),
                f"{x['time']:.2f}" + (" (np)" if x["time_src"] else "")]
    else:
      cells += ["-"] * 4
    cells.append(next(iter(built.values()))["bound"] if not q_ok and built else (q_ok["bound"] if q_ok else "-"))
    cells.append(f"{r['wall_s']}")
    out.append("| " + " | ".join(cells) + " |")
  missing = [n for n in ROWS if n not in results]
  if missing:
    out.append(f"\nRows not compiled in the session that wrote this file: {', '.join(missing)}. A fitting "
               "program spends most of its compile in libtpu's code generation (on 2 CPU cores shared with "
               "other jobs: the 8B Q-SFT step on v5p:4x4x8 573 s, plus ~2000 s for its two cost probes; the "
               "70B one 178 s without probes); a program over HBM is reported with the bytes the compiler "
               "asked for (its RESOURCE_EXHAUSTED message). Their "
               "columns show the analytic float32 train state + gradients per chip (activations excluded); "
               "`python scripts/scaling_table.py --rows NAME` fills them in.")
  for name in ROWS:
    lower = [k for k, st in (results.get(name, {}).get("steps") or {}).items()
             if st.get("cost_source", "").startswith("probes") and "lower bounds" in st["cost_source"]]
    if lower:
      out.append(f"\nNote on `{name}`: the cost probes of {', '.join(lower)} still hold while loops that XLA "
                 "made itself (e.g. windowed einsums for the FSDP matmuls), whose bodies cost analysis counts "
                 "once: their FLOPs and HBM bytes (and ratios below 1) are lower bounds, and the MFU and "
                 "Q-SFT / BC figures of that row are indicative only (its collectives come from the real "
                 "program with loop trip counts applied).")
    if name in results and results[name].get("note"):
      out.append(f"\nNote on `{name}`: {results[name]['note']}.")
  out.append("\nCommands (each reproduces its row; add `--steps=bc,qsft,decode` for the decode step):\n")
  for name in ROWS:
    line = f"- `{name}`: `{command(name)}`"
    if name in ADDED_STEPS:
      line += f"; {ADDED_STEPS[name][1]} step: `{command(name, added=True)}`"
    if name in SAME_BC:
      line += f"; BC step: row `{SAME_BC[name]}`'s (--frozen_dtype leaves BC unchanged)"
    out.append(line)
  out.append("\n### Per-step figures (per chip)\n")
  out.append("| row | step | FLOPs compiled | FLOPs analytic | ratio | HBM bytes | ICI bytes | DCN bytes "
             "| collectives sent, GB (AG all-gather, RS reduce-scatter, AR all-reduce, CP permute) "
             "| compute ms | HBM ms | ICI ms | DCN ms | step ms |")
  out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, r in results.items():
    for kind, s in (r.get("steps") or {}).items():
      if "error" in s:
        out.append(f"| {name} | {kind} | not built: {s['error'][:200]} |" + " |" * 11)
        continue
      np_ = s.get("probes", True) is False and s["cost_source"] != "compiled program"
      fl = f"{s['flops_per_chip']:.3g}" + (" (np, >=)" if np_ else "")
      out.append(f"| {name} | {kind} | {fl} | {s['analytic_flops_per_chip']:.3g} | "
                 f"{'-' if np_ else format(s['flops_ratio'], '.2f')} | {s['hbm_bytes_per_chip']:.3g}"
                 f"{' (np, >=)' if np_ else ''} | {s['ici_bytes_per_chip']:.3g} | "
                 f"{s['dcn_bytes_per_chip']:.3g} | {_collectives_cell(s)} | {s['compute_s'] * 1e3:.1f} | "
                 f"{s['hbm_s'] * 1e3:.1f} | {s['ici_s'] * 1e3:.1f} | {s['dcn_s'] * 1e3:.1f} | "
                 f"{s['step_s'] * 1e3:.1f} |")
  out.append("\n(np): compiled without the cost probes (`--no-probes`; an 8B/70B probe pair takes ~2000 s "
             "or more on this machine): FLOPs and HBM bytes count each loop body once (lower bounds), "
             "and the roofline's compute time uses the analytic FLOPs. Memory and collectives come from "
             "the real program in every row: collectives inside loops (scanned layers, loss chunks, "
             "XLA's windowed einsums) are multiplied by the loops' trip counts.\n\n"
             "Which figures are bounds: every MFU is an upper bound (a roofline). An MFU marked `<= ... (np)` "
             "is a looser one: its compute time is the analytic FLOPs (no remat recomputation) and its HBM "
             "term uses lower-bound bytes, so it reads 100% whenever the collectives fit under the compute "
             "time; `collectives x of compute` is max(ICI, DCN time) / analytic compute time, the margin "
             "before the step turns collective-bound. The Q-SFT / BC peak GiB and collective-byte ratios "
             "come from the real programs in every row (exact for the compiled programs). Q-SFT / BC "
             "FLOPs are the compiled ratio where both steps have cost probes, else `analytic 5F/3F` "
             "(compiled programs with full remat run theta's forward once more in both steps: 6/4 = 1.50). "
             "Q-SFT / BC roofline time marked (np) is max(analytic compute, ICI, DCN time) of each step: "
             "5/3 while both steps are compute-bound.")
  out.append(fit_8b_section(results.get("8b-v5p128")))
  out.append(large_rows_section(results))
  total = sum(r.get("wall_s", 0) for r in results.values())
  out.append(f"\nWall time of the compiles above on this machine (2 shared CPU cores): {total:.0f} s in all.\n")
  out.append(qsft_cost_section(results))
  return "\n".join(out) + "\n"


HEADER = """# Scaling: Q-SFT on TPU pod slices, compiled ahead of time

Every figure here comes from the real TPU program, compiled on a CPU machine for a described slice
(`qsft_jax.aot`, libtpu's compile-only devices): nothing ran on a TPU. Generated by
`python scripts/scaling_table.py` (figures cached in `docs/scaling_results.json`).

How to read it:
- **GiB/chip** is the compiled program's peak: arguments (the sharded train state and batch) +
  temporaries + outputs not aliased to donated arguments (`compiled.memory_analysis()`), against
  the chip's HBM (v5e 16 GiB, v6e 32 GiB, v4 32 GiB, v5p 95 GiB; `qsft_jax/chips.py`).
- **FLOPs / bytes** per step are XLA's cost analysis of the compiled program. XLA counts a while-loop
  body once, so steps with scanned layers or chunked losses take their costs from loop-free probe
  programs (1 and 2 unrolled layers, extrapolated linearly to N layers; `qsft_jax/aot.py`). Compiled
  FLOPs include remat recomputation (full remat: ~4/3 of the analytic train FLOPs of theta).
- **Collectives** are read from the compiled program's HLO (`qsft_jax.aot.parse_collectives`): libtpu
  keeps them inside fusions (an async all-gather is a start / continuation / done chain of fusions,
  counted once; a reduce-scatter is an `all-reduce-scatter` fusion), and those inside loops count
  once per trip (trip counts read from the loop conditions). Bytes are those each chip sends with
  ring algorithms (all-gather and reduce-scatter (n-1)/n of the full array, all-reduce twice that).
  Rows compiled before this parser (libtpu 0.0.42's HLO was not read: collectives inside fusions were
  counted once per fusion copy and while-loop bodies once) were recompiled for their collectives.
- **HBM bytes** are XLA's "bytes accessed" (every fusion's operands and results): an upper bound on HBM
  traffic (operands that stay in VMEM are counted too), so HBM-bound rows are pessimistic on that
  term. The decode step's ICI bytes (135m row) have not been checked against a hand count.
- **MFU** is a roofline estimate, not a measurement: analytic model FLOPs (BC 3F, Q-SFT 5F per token,
  F = `flops_per_token`) / (peak x max(compute, HBM, ICI, DCN time)). ICI time assumes every link of
  the chip busy both ways, so it is a lower bound; real MFU is lower (no overlap is perfect, and the
  roofline ignores latency). Treat it as an upper bound that ranks configurations.
- State dtypes: float32 master weights for theta, theta_bar and phi, float32 AdamW moments,
  bf16 compute. A config's own numbers are in its docstring.

Setup: `pip install libtpu==0.0.42.1` (the version `jax[tpu]==0.10.2` resolves; install it alone so
that jax stays 0.10.2). Slices are described with
`jax.experimental.topologies.get_topology_desc("v5p:4x4x8", "tpu", chip_config_name="megacore",
num_slices=N)` (megacore for v4/v5p: one device per chip); the CPU stays JAX's default backend. libtpu
holds /tmp/libtpu_lockfile while any JAX process that did not set JAX_PLATFORMS=cpu is alive, so
`qsft_jax.aot` sets ALLOW_MULTIPLE_LIBTPU_LOAD=1 on machines without TPU chips. Multi-slice meshes
(`--num_slices`) put the slices on the `data` axis; collectives whose device groups span slices are
counted as DCN traffic.

"""


def activation_gib(preset: str, rows: int, length: int, overrides: dict) -> dict:
  """Analytic per-chip activation bytes of a Q-SFT step (GiB): the remat-saved layer inputs, one
  layer's attention scores + probabilities (f32, [rows, H, L, L]; no flash attention), one loss chunk."""
  c = get_preset(preset, **overrides)
  act = 2 if c.dtype == "bfloat16" else 4
  saved = c.num_layers * rows * length * c.d_model * act
  scores = 2 * rows * c.num_heads * length * length * 4
  chunk = rows * 128 * c.padded_vocab_size * 4
  return {"saved": saved / 2**30, "scores": scores / 2**30, "chunk": chunk / 2**30}


def fit_8b_section(r: dict | None) -> str:
  """Does the Llama-3-8B-shaped Q-SFT step fit a v5p-128 slice? From the compile, else analytically."""
  a = activation_gib("llama3-8b", 2, 2048, {"remat_policy": "full"})
  _, bc_gib, q_gib = analytic_state_gib("8b-v5p128")
  lines = ["\n## The Llama-3-8B-shaped Q-SFT step on a v5p-128 slice (v5p:4x4x8)\n"]
  if r and "steps" in r and "qsft" in r["steps"]:
    q = r["steps"]["qsft"]
    lines.append(f"Compiled (`{r['command']}`): peak {_gib(q['peak_bytes'])} GiB per chip "
                 f"(arguments {_gib(q['argument_bytes'])}, temporaries {_gib(q['temp_bytes'])}) of "
                 f"{_gib(q['hbm_bytes'])} GiB: **{'fits' if q['fits'] else 'does not fit'}**. "
                 f"Roofline step >= {q['step_s'] * 1e3:.0f} ms ({q['bound']}-bound), MFU <= {_pct(q['mfu'])}.")
  else:
    why = r["error"] if r and "error" in r else "not compiled yet"
    lines.append(f"The compiled figure is missing ({why}). Analytically, per chip (256 x 2048 tokens, "
                 "FSDP over 128 chips, 2 rows per chip):")
  lines.append(f"- train state + gradients (float32, theta / theta_bar / phi / 2 AdamW moments / grads): "
               f"{q_gib:.2f} GiB (BC: {bc_gib:.2f} GiB);")
  lines.append(f"- activations saved by full remat (one [2, 2048, 4096] bf16 input per layer, 32 layers): "
               f"{a['saved']:.2f} GiB; one layer's attention scores and probabilities (f32, not flash): "
               f"{a['scores']:.2f} GiB; one loss chunk of logits [2, 128, 128256] f32: {a['chunk']:.2f} GiB;")
  p, n = 8.03e9, 128
  gathers = 4 * 2 * p * (n - 1) / n  # bf16 weights: theta forward, theta backward (remat), theta_bar, phi
  scatter = 4 * p * (n - 1) / n  # float32 gradients
  lines.append(f"- collectives (FSDP, analytic): four bf16 all-gathers of the weights (theta forward, theta "
               f"again in the remat backward, theta_bar, phi) and one float32 reduce-scatter of the "
               f"gradients: {(gathers + scatter) / 1e9:.0f} GB sent per chip per step, "
               f"{(gathers + scatter) / 1200e9 * 1e3:.0f} ms at v5p's 1200 GB/s ICI (BC: two gathers and the "
               f"scatter, {(gathers / 2 + scatter) / 1e9:.0f} GB) against ~820 ms of compute: the step stays "
               "compute-bound if XLA overlaps the gathers with the layers (it schedules them asynchronously).")
  if r and "steps" in r and "qsft" in r["steps"] and "error" not in r["steps"]["qsft"]:
    q = r["steps"]["qsft"]
    lines.append(f"- collectives of the compiled program (loop trip counts applied): "
                 f"{q['ici_bytes_per_chip'] / 1e9:.0f} GB sent per chip per step ({_collectives_cell(q)} GB), "
                 f"{q['ici_s'] * 1e3:.0f} ms at the chip's full ICI bandwidth, still under the compute time. It "
                 "exceeds the analytic count because XLA expresses the FSDP gathers and the gradient "
                 "reduction as all-reduces (twice the bytes of a gather or a reduce-scatter) and the loss's "
                 "chunk loop most likely gathers the unembeddings and all-reduces their gradient once per chunk, "
                 "as read in the HLO of the two programs of the next section (not checked in this one).")
  b = (r or {}).get("steps", {}).get("bc")
  q = (r or {}).get("steps", {}).get("qsft")
  if b and "error" not in b and q and "error" not in q:
    lines.append(f"- the compiled BC step (`{r.get('step_commands', {}).get('bc', r['command'])}`): peak "
                 f"{_gib(b['peak_bytes'])} GiB per chip (arguments {_gib(b['argument_bytes'])}, temporaries "
                 f"{_gib(b['temp_bytes'])}); collectives {b['ici_bytes_per_chip'] / 1e9:.0f} GB sent per chip "
                 f"per step ({_collectives_cell(b)} GB), {b['ici_s'] * 1e3:.0f} ms at full ICI bandwidth "
                 f"against {b['analytic_flops_per_chip'] / aot.get_chip('v5p').bf16_flops * 1e3:.0f} ms of "
                 f"analytic compute. Q-SFT / BC: peak {q['peak_bytes'] / b['peak_bytes']:.2f}x, collective "
                 f"bytes {q['ici_bytes_per_chip'] / b['ici_bytes_per_chip']:.2f}x, analytic FLOPs 5/3.")
  lines.append("- FSDP all-gathers one layer's weights at a time (bf16: 0.4 GiB for a full 8B layer). "
               "These parts add up to ~5 GiB; the compiled arguments are exactly the float32 state, "
               "5 x 8.03B x 4 bytes / 128 = 1.17 GiB, and the peak leaves > 85 GiB free: memory is not "
               "what limits this slice (the activation terms grow linearly with rows per chip, so "
               "several times the batch would still fit).")
  return "\n".join(lines) + "\n"


def large_rows_section(results: dict) -> str:
  """The 70B-shaped and the 8B-on-v5e rows: fit, headroom and where the collectives go."""
  lines = ["\n## The 70B-shaped step on v5p:4x4x8 and the 8B-shaped step on v5e:4x4\n"]
  for name in ("70b-v5p128", "8b-v5e16"):
    r = results.get(name)
    q = (r or {}).get("steps", {}).get("qsft")
    if not q:
      lines.append(f"- `{name}`: not compiled yet.")
      continue
    if "error" in q:
      lines.append(f"- `{name}` (`{r['command']}`): **does not fit**: the compiler asked for "
                   f"{_gib(q['peak_bytes'])} GiB per chip, {_gib(q['over_bytes'])} GiB over the "
                   f"{_gib(q['hbm_limit_bytes'])} GiB it may use ({q['error'][:200]}).")
      continue
    state = 5 * r["params"] * 4 / r["chips"]
    big = sorted(q["collectives"].items(), key=lambda kv: -kv[1]["moved_bytes"])
    lines.append(
        f"- `{name}` (`{r['command']}`, {r['batch'] // r['chips'] if r['batch'] >= r['chips'] else r['batch'] / r['chips']} "
        f"row(s) of {r['seq']} per chip): peak {_gib(q['peak_bytes'])} GiB of {_gib(q['hbm_bytes'])} "
        f"(arguments {_gib(q['argument_bytes'])} = the float32 state 5 x {r['params'] / 1e9:.2f}B x 4 bytes / "
        f"{r['chips']} = {_gib(state)} GiB; temporaries {_gib(q['temp_bytes'])}): **fits**, "
        f"{(q['hbm_bytes'] - q['peak_bytes']) / 2**30:.1f} GiB free. Collectives: "
        f"{q['ici_bytes_per_chip'] / 1e9:.0f} GB sent per chip per step ("
        + ", ".join(f"{op} {c['moved_bytes'] / 1e9:.0f} GB" for op, c in big if c["moved_bytes"] > 1e8)
        + f"), {q['ici_s'] * 1e3:.0f} ms at the chip's full ICI bandwidth against "
        f"{q['analytic_flops_per_chip'] / aot.get_chip(r['topology'].split(':')[0]).bf16_flops * 1e3:.0f} ms "
        "of analytic compute (no FLOP probes for this row: they would take well over 10 minutes here).")
    b = r["steps"].get("bc")
    if b and "error" not in b:
      bbig = sorted(b["collectives"].items(), key=lambda kv: -kv[1]["moved_bytes"])
      lines.append(
          f"  BC step (`{r.get('step_commands', {}).get('bc', r['command'])}`): peak {_gib(b['peak_bytes'])} "
          f"GiB (arguments {_gib(b['argument_bytes'])} = the float32 params, 2 AdamW moments and the batch; "
          f"temporaries {_gib(b['temp_bytes'])}), {(b['hbm_bytes'] - b['peak_bytes']) / 2**30:.1f} GiB free; "
          f"collectives {b['ici_bytes_per_chip'] / 1e9:.0f} GB ("
          + ", ".join(f"{op} {c['moved_bytes'] / 1e9:.0f} GB" for op, c in bbig if c["moved_bytes"] > 1e8)
          + f"), {b['ici_s'] * 1e3:.0f} ms against {b['compute_s'] * 1e3:.0f} ms of analytic compute. "
          f"Q-SFT / BC: peak {q['peak_bytes'] / b['peak_bytes']:.2f}x, collective bytes "
          f"{q['ici_bytes_per_chip'] / b['ici_bytes_per_chip']:.2f}x, analytic FLOPs 5/3."
          + (f" BC's peak is above Q-SFT's: its temporaries ({_gib(b['temp_bytes'])} GiB) exceed the Q-SFT "
             f"step's ({_gib(q['temp_bytes'])} GiB) by more than the Q-SFT state adds in arguments "
             f"({_gib(q['argument_bytes'] - b['argument_bytes'])} GiB); that is the compiler's buffer "
             "assignment for this program, not investigated here."
             if b["peak_bytes"] > q["peak_bytes"] else ""))
    elif b:
      lines.append(f"  BC step: not built ({b['error'][:200]}).")
  lines.append(
      "\nIn the 70B program XLA expresses the FSDP weight gathers as all-reduces of zero-padded buffers "
      "(`all-reduce(dynamic-update-slice)`, TPU's 3D-torus all-reduce emitter) and reduces the bf16 "
      "weight gradients with all-reduces too, so it has no all-gather or reduce-scatter at all; counted "
      "at all-reduce cost (2 (n-1)/n of the array) that is about twice the bytes of the gather / scatter "
      "form. In both programs the loss's chunk loop (L / chunk_size = 16 trips) gathers the four "
      "copies of the [vocab, d_model] unembedding it uses (theta for the forward and for the backward, "
      "theta_bar, phi) once per chunk, and all-reduces the float32 gradient of theta's unembedding once "
      "per chunk instead of accumulating it locally and reduce-scattering it once after the loop: "
      "126 GB of the 8B-on-v5e:4x4 step's 260 GB, 400 GB of the 70B step's 1785 GB (read from the "
      "compiled HLO, `QSFT_AOT_DUMP_HLO=DIR` writes it). Gathering the unembeddings once before the "
      "chunk scan and carrying the unembedding gradient as a sharded accumulator (a sharding "
      "constraint on the scan carry in `losses`) would remove nearly all of it.")
  r = results.get("1.7b-2xv5e16")
  q = (r or {}).get("steps", {}).get("qsft")
  if q and "error" not in q:
    lines.append(
        f"\nTwo slices over DCN (`1.7b-2xv5e16`): the compiled program keeps every collective group inside "
        f"a slice and hands the cross-slice gradient reduction to the megascale runtime (host-transfer "
        f"send / recv pairs in the HLO): each chip all-reduces its gradient shard with its peer in the other "
        f"slice, in bf16 for the layer weights (inside the layer loop, one layer at a time) and float32 for "
        f"the embedding: {q['dcn_bytes_per_chip'] / 1e9:.2f} GB per chip per step, {q['dcn_s'] * 1e3:.0f} ms "
        f"at v5e's 3.125 GB/s of DCN per chip, against {q['compute_s'] * 1e3:.0f} ms of analytic compute "
        "for 4 rows of 2048 per chip: DCN is not the bottleneck at this batch.")
  return "\n".join(lines) + "\n"


def qsft_cost_section(results: dict) -> str:
  """What Q-SFT costs over BC, quantified from the rows, and ways to cut it."""
  lines = ["## What Q-SFT costs over BC at scale\n"]
  lines.append("Q-SFT trains theta like BC (forward + backward = 3 forward passes) and adds two "
               "forward-only passes (theta_bar and phi) and two parameter sets. Analytic FLOPs: "
               "5/3 = 1.67x BC. Measured on the compiled programs (peak memory, state and collectives from "
               "the real programs in every row; FLOPs and roofline time marked (analytic) / (np) where a step "
               "was compiled without cost probes, see the per-step table's notes; rows `*-bf16frozen` share "
               "the BC step of the row they vary):\n")
  lines.append("| row | Q-SFT / BC FLOPs | Q-SFT / BC roofline time | peak GiB/chip BC -> Q-SFT "
               "| state (arguments) GiB/chip BC -> Q-SFT | extra state GiB/chip | collectives GB/chip BC -> Q-SFT |")
  lines.append("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    q = r.get("steps", {}).get("qsft")
    b, b_row = bc_step(results, name)
    if b and q and "error" not in b and "error" not in q:
      x = qsft_bc_ratios(r, q, b)
      comm = [(s["ici_bytes_per_chip"] + s["dcn_bytes_per_chip"]) / 1e9 for s in (b, q)]
      lines.append(f"| {name}{'' if b_row == name else f' (BC of {b_row})'} | {x['flops']:.2f}"
                   f"{' (analytic)' if x['flops_src'] == 'analytic' else ''} | {x['time']:.2f}"
                   f"{' (np)' if x['time_src'] else ''} | {_gib(b['peak_bytes'])} -> {_gib(q['peak_bytes'])} | "
                   f"{_gib(b['argument_bytes'])} -> {_gib(q['argument_bytes'])} | "
                   f"{_gib(q['argument_bytes'] - b['argument_bytes'])} | {_gb(comm[0])} -> {_gb(comm[1])} "
                   f"({x['comm']:.2f}x) |")
  lines.append("\nWith full remat the compiled BC step runs theta's forward twice (4 forward-equivalents "
               "instead of 3), so the compiled Q-SFT / BC FLOPs ratio is 6/4 = 1.50 rather than 5/3.\n")
  lines.append(CUTS)
  for name in ("8b-v5p128", "70b-v5p128"):
    r = results.get(name)
    if not r or "params" not in r:
      continue
    p, chips = r["params"], r["chips"]
    measured = ""
    low = results.get(f"{name}-bf16frozen", {}).get("steps", {}).get("qsft")
    full = r.get("steps", {}).get("qsft")
    if low and full and "error" not in low and "error" not in full:
      measured = (f" (compiled, row {name}-bf16frozen: arguments {_gib(full['argument_bytes'])} -> "
                  f"{_gib(low['argument_bytes'])} GiB, peak {_gib(full['peak_bytes'])} -> "
                  f"{_gib(low['peak_bytes'])} GiB, i.e. {(full['peak_bytes'] - low['peak_bytes']) / 2**30:.2f} "
                  f"GiB/chip less at peak)")
    lines.append(f"- {name} ({p / 1e9:.1f}B params, {chips} chips): theta_bar + phi in bf16 instead of "
                 f"float32 saves {2 * p * 2 / chips / 2**30:.2f} GiB/chip analytically{measured}; dropping phi's parameters "
                 f"(values offline) saves {p * 4 / chips / 2**30:.2f} GiB/chip and 1/5 of the Q-SFT FLOPs; "
                 f"LoRA theta (rank 16 on every kernel, ~{lora_params(r['model']) / 1e6:.0f}M trainable) "
                 f"leaves one frozen bf16 base ({p * 2 / chips / 2**30:.2f} GiB/chip) plus three small "
                 f"adapters instead of {5 * p * 4 / chips / 2**30:.2f} GiB/chip of float32 state.")
  return "\n".join(lines)


CUTS = """
Ways to cut it, from cheapest to most invasive:

1. **Frozen parameter sets in bf16.** theta_bar and phi take no gradient and no optimizer state;
   storing them in bf16 halves their bytes (the forward already runs in bf16). theta_bar's Polyak
   update then rounds to bf16 each step: with tau = 0.005 the update is below bf16's resolution for
   most weights, so keep theta_bar in float32 or use hard updates (`target_update_every`) when
   storing it in bf16. `python -m qsft_jax.aot --frozen_dtype=bfloat16` compiles the Q-SFT step with
   both frozen sets in bf16 (theta and its AdamW moments stay float32; the step keeps each set's
   dtype, so they are still donated and updated in place): rows `*-bf16frozen`. The trainer itself
   (`train_steps.init_qsft_state`, `main.py`) still stores all three sets in `param_dtype`.
2. **phi's values offline.** phi is frozen after phase 1, so everything the Bellman target needs from
   it (log pi_phi over its support, pi_phi >= support_min, at most 1/support_min tokens per row) can
   be computed once per dataset and stored with the batch: the phi forward (1 of the 5 passes, 20% of
   Q-SFT FLOPs) and its parameter set leave the step. Cost: storage of the top-K support per token
   (K = 64 ids + log-probs = 384 bytes/token, ~0.2 GB per 256 x 2048 batch), and the max over
   p_theta_bar / pi_phi restricted to those K tokens (exact when the support has at most K tokens).
3. **Sharing layouts.** All three sets share one rule table, so theta_bar's Polyak update is
   elementwise on local shards (no communication) and no set is ever resharded. Under FSDP each set's
   weights are still all-gathered for its forward, so the extra sets add two gathers per step to
   BC's two (forward + remat backward) and one gradient reduce-scatter: 64 -> 96 GB sent per chip per
   step for the 8B shape (section above). Keeping theta_bar and phi replicated over a small data axis
   (and sharded only inside it) trades their memory for fewer gathers.
4. **Low-rank adapters for theta.** theta = base + low-rank delta, theta_bar = base + delta_bar,
   phi = base (+ its own adapter): one frozen base in bf16 plus three adapters; optimizer state only
   for the adapter. Memory drops to roughly one bf16 model; FLOPs do not (still 5 forward-equivalents),
   and Q-values then live in a low-rank correction of the pretrained likelihoods.
5. **No separate target forward.** With hard target updates every N steps, theta_bar's logits could be
   cached per batch between updates only if batches repeat; in general the target forward stays. A
   tau = 1 variant (target = current theta, stop-gradient) reuses theta's forward: 4/3 instead of 5/3
   of BC, one parameter set less, at the known stability cost of Q-learning without a target network.

Figures per row (from the parameter counts and chip counts above):
"""


def lora_params(preset: str, rank: int = 16) -> int:
  """Trainable parameters of rank-`rank` adapters on every attention and MLP kernel."""
  c = get_preset(preset)
  per_layer = rank * ((c.d_model + c.num_heads * c.head_dim) * 2  # q, o
                      + (c.d_model + c.num_kv_heads * c.head_dim) * 2  # k, v
                      + (c.d_model + c.mlp_dim) * 3)  # gate, up, down
  return c.num_layers * per_layer


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", default="", help="comma-separated row names to (re)compile")
  p.add_argument("--doc-only", action="store_true", help="only render docs/scaling.md from the cache")
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per row's compile (default 1800)")
  p.add_argument("--refresh", action="store_true",
                 help="recompile --rows with --no-probes and keep the cached rows' probe FLOPs / HBM bytes "
                      "(memory and collectives refreshed; the roofline recomputed)")
  p.add_argument("--add-steps", action="store_true",
                 help="compile the ADDED_STEPS of --rows (default: all rows that have them) and merge them "
                      "into the cached rows")
  a = p.parse_args()
  results = {}
  if os.path.exists(CACHE):
    with open(CACHE) as f:
      results = json.load(f)
  wanted = [r for r in a.rows.split(",") if r] or (
      [r for r in ADDED_STEPS if r in results] if a.add_steps else [r for r in ROWS if r not in results])
  unknown = set(wanted) - set(ROWS)
  if unknown:
    p.error(f"unknown rows {sorted(unknown)}; rows: {', '.join(ROWS)}")
  if not a.doc_only:
    for name in wanted:
      if a.add_steps:
        if name not in ADDED_STEPS or name not in results:
          p.error(f"{name}: no ADDED_STEPS, or no cached row to add them to")
        print(f"== {name}: {command(name, added=True)}", flush=True)
        results[name] = merge_added_steps(results[name], run_row(name, a.timeout, added=True))
        with open(CACHE, "w") as f:
          json.dump(results, f, indent=1, sort_keys=True)
        continue
      print(f"== {name}: {command(name)}", flush=True)
      if a.refresh:
        results[name] = merge_probe_costs(run_row(name, a.timeout, ["--no-probes"]), results.get(name))
      else:
        results[name] = run_row(name, a.timeout)
      with open(CACHE, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
  with open(DOC, "w") as f:
    f.write(render({k: results[k] for k in ROWS if k in results}))
  print(f"wrote {DOC}")


if __name__ == "__main__":
  main()
