"""Regenerates the tables of docs/scaling.md from docs/scaling_results.json, compiling rows on demand.

    python -m qsft_jax.aot.scaling_table                     # rewrite the tables from the cached figures
    python -m qsft_jax.aot.scaling_table --compile=8b-v5e16  # (re)compile these rows first (libtpu)

A row is data (`ROWS`): a pod config file, --config overrides and the AOT target (topology, slices,
the steps of each compile, cost probes or not). Its commands are the `python -m qsft_jax.aot` lines
that reproduce it; its figures are cached in docs/scaling_results.json under its name. Only the text
between `<!-- scaling_table:NAME -->` and `<!-- /scaling_table:NAME -->` in docs/scaling.md is
rewritten (NAME in `TABLES`); the prose around the tables is written by hand.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

from absl import flags

from qsft_jax import cli
from qsft_jax.chips import get_chip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, "docs", "scaling_results.json")
DOC = os.path.join(ROOT, "docs", "scaling.md")
PROG = "python -m qsft_jax.aot.scaling_table"


@dataclasses.dataclass(frozen=True)
class Compile:
  """One `python -m qsft_jax.aot` run of a row: its steps, with or without the cost probes."""
  steps: str
  probes: bool = True


@dataclasses.dataclass(frozen=True)
class Row:
  """A config file, its --config overrides and the target; `same_bc` names the row whose BC step this
  row shows (the overrides leave the BC program unchanged, so it is not compiled again)."""
  config: str
  compiles: tuple[Compile, ...]
  overrides: tuple[str, ...] = ()
  topology: str = ""  # "": the config file's AOT_TOPOLOGY
  num_slices: int = 0  # 0: the config file's AOT_NUM_SLICES
  same_bc: str = ""
  full_ft: str = ""  # LoRA rows: the row of full fine-tuning on the same slice, batch and length
  qsft_of: str = ""  # ILQL rows: the row whose Q-SFT step (same slice, batch and length) they are set against

  def args(self, run: Compile) -> list[str]:
    """The flags of `python -m qsft_jax.aot` for one compile of the row."""
    args = [f"--config={self.config}"] + [f"--config.{o}" for o in self.overrides]
    args += [f"--topology={self.topology}"] * bool(self.topology)
    args += [f"--num_slices={self.num_slices}"] * bool(self.num_slices)
    args += ["--no-probes"] * (not run.probes)
    return args + [f"--steps={run.steps}"]

  def command(self, run: Compile) -> str:
    return " ".join(["python -m qsft_jax.aot"] + self.args(run))


BATCH_16 = ("bc.batch_size=16", "qsft.batch_size=16")
BATCH_8 = ("bc.batch_size=8", "qsft.batch_size=8")
BATCH_64 = ("bc.batch_size=64", "qsft.batch_size=64")
BF16_FROZEN = ("qsft.target_dtype=bfloat16", "qsft.behaviour_dtype=bfloat16")
ROWS: dict[str, Row] = {
    "135m-v5e4": Row("configs/pod_smollm2_135m.py", (Compile("bc,qsft,decode"),)),
    "1.7b-v5e16": Row("configs/pod_smollm2_1p7b.py", (Compile("bc,qsft"),)),
    "1.7b-2xv5e16": Row("configs/pod_smollm2_1p7b.py", (Compile("bc,qsft", probes=False),),
                        ("mesh.shape.data=2", "bc.batch_size=128", "qsft.batch_size=128"), num_slices=2),
    "8b-v5p128": Row("configs/pod_llama3_8b.py", (Compile("qsft"), Compile("bc", probes=False))),
    "8b-v5e16": Row("configs/pod_llama3_8b.py", (Compile("qsft", False), Compile("bc", False)), BATCH_16,
                    topology="v5e:4x4"),
    "70b-v5p128": Row("configs/pod_llama_70b.py", (Compile("qsft", False), Compile("bc", False))),
    "8b-v5p128-bf16frozen": Row("configs/pod_llama3_8b.py", (Compile("qsft", False),), BF16_FROZEN,
                                same_bc="8b-v5p128"),
    "70b-v5p128-bf16frozen": Row("configs/pod_llama_70b.py", (Compile("qsft", False),), BF16_FROZEN,
                                 same_bc="70b-v5p128"),
    # Full fine-tuning on the slices of the LoRA rows, for their memory.
    "8b-v5e8": Row("configs/pod_llama3_8b.py", (Compile("qsft", False),), BATCH_8, topology="v5e:2x4"),
    "8b-v4-4": Row("configs/pod_llama3_8b.py", (Compile("qsft", False),), BATCH_8, topology="v4:2x2x1"),
    "70b-v6e64": Row("configs/pod_llama_70b.py", (Compile("qsft", False),), BATCH_64, topology="v6e:8x8"),
    # LoRA (one frozen base, adapters for phi, theta and theta_bar) and QLoRA (an nf4 base).
    "8b-v5e8-lora": Row("configs/pod_llama3_8b_lora.py", (Compile("qsft,bc", False),), full_ft="8b-v5e8"),
    "8b-v4-4-lora": Row("configs/pod_llama3_8b_lora.py", (Compile("qsft,bc", False),), topology="v4:2x2x1",
                        full_ft="8b-v4-4"),
    "70b-v6e64-qlora": Row("configs/pod_llama_70b_qlora.py", (Compile("qsft,bc", False),), full_ft="70b-v6e64"),
    # The ILQL baseline's step (one LM and value heads) beside Q-SFT's (three LMs): heads on the frozen
    # phi, and with the trunk trained.
    "8b-v5e16-ilql": Row("configs/pod_llama3_8b.py", (Compile("ilql,ilql_train", False),), BATCH_16,
                         topology="v5e:4x4", qsft_of="8b-v5e16"),
}

SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "collective-permute": "CP",
         "all-to-all": "A2A"}


# ------------------------------------------------------------------------------------------------
# Compiling rows


def compile_row(name: str, timeout_s: float) -> dict:
  """Runs each compile of a row in a subprocess and merges their steps into one result ("command":
  the first compile's; "step_commands": each step's). A failed or timed-out compile gives "error"."""
  row, result = ROWS[name], None
  for run in row.compiles:
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "aot.json")
      argv = [sys.executable, "-m", "qsft_jax.aot"] + row.args(run) + [f"--json={out}"]
      try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode:
          error = f"exit {proc.returncode}: {' '.join(proc.stderr.strip().splitlines()[-3:])[:600]}"
        else:
          error, figures = None, json.load(open(out))
      except subprocess.TimeoutExpired:
        error = f"compile not finished after {timeout_s:.0f} s"
    wall = time.time() - t0
    if error:
      return {"error": error, "command": row.command(run), "wall_s": round(wall, 1)}
    if result is None:
      result = {**figures, "command": row.command(run), "step_commands": {}, "wall_s": 0.0}
    else:
      result["steps"].update(figures["steps"])
    result["step_commands"].update({k: row.command(run) for k in figures["steps"]})
    result["wall_s"] = round(result["wall_s"] + wall, 1)
  return result


# ------------------------------------------------------------------------------------------------
# Cells


def _gib(x: float) -> str:
  return f"{x / 2**30:.1f}"


def _gb(x: float) -> str:
  return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _pct(x: float) -> str:
  return f"{100 * x:.0f}%"


def _real_flops(s: dict) -> bool:
  """Whether the step's FLOPs / HBM bytes cover the whole program (cost probes, or a loop-free program)
  rather than counting loop bodies once (--no-probes)."""
  return s.get("probes", True) or s["cost_source"] == "compiled program"


def _mfu(s: dict) -> str:
  """MFU; without cost probes "<=" and the collectives' share of the (analytic) compute time."""
  if _real_flops(s):
    return _pct(s["mfu"])
  comm = max(s["ici_s"], s["dcn_s"]) / s["compute_s"] if s["compute_s"] else 0.0
  return f"<= {_pct(s['mfu'])} (np; collectives {comm:.2f} of compute)"


def _built(s: dict | None) -> dict | None:
  return s if s and "error" not in s else None


def bc_step(results: dict, name: str) -> tuple[dict | None, str]:
  """The BC step shown for a row: its own, else that of its `same_bc` row; and that row's name."""
  s = (results.get(name) or {}).get("steps", {}).get("bc")
  if s is None and ROWS[name].same_bc:
    return (results.get(ROWS[name].same_bc) or {}).get("steps", {}).get("bc"), ROWS[name].same_bc
  return s, name


def qsft_bc_ratios(r: dict, q: dict, b: dict) -> dict:
  """Q-SFT / BC: peak memory and collective bytes from the real programs; FLOPs compiled where both
  steps have them, else analytic (5F / 3F); roofline time from the compiled roofline where both steps
  have real FLOPs, else max(analytic compute, ICI, DCN) of each."""
  peak_flops = get_chip(r["topology"].split(":")[0]).bf16_flops
  both = _real_flops(q) and _real_flops(b)
  comm_q = q["ici_bytes_per_chip"] + q["dcn_bytes_per_chip"]
  comm_b = b["ici_bytes_per_chip"] + b["dcn_bytes_per_chip"]
  if both:
    time_ratio = q["step_s"] / b["step_s"]
  else:
    t = [max(s["analytic_flops_per_chip"] / peak_flops, s["ici_s"], s["dcn_s"]) for s in (q, b)]
    time_ratio = t[0] / t[1]
  flops = (q["flops_per_chip"] / b["flops_per_chip"] if both
           else q["analytic_flops_per_chip"] / b["analytic_flops_per_chip"])
  return {"peak": q["peak_bytes"] / b["peak_bytes"], "comm": comm_q / comm_b if comm_b else float("nan"),
          "flops": flops, "analytic": not both, "time": time_ratio}


def _collectives_cell(s: dict) -> str:
  parts = [f"{SHORT.get(op, op)} {c['moved_bytes'] / 1e9:.3g}" for op, c in sorted(s["collectives"].items())
           if c["moved_bytes"] >= 1e6]
  return ", ".join(parts) or "-"


def _line(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


# ------------------------------------------------------------------------------------------------
# Tables


def summary_table(results: dict) -> list[str]:
  """One line per row: slice, mesh, batch, Q-SFT memory, BC memory, MFU, Q-SFT / BC ratios."""
  out = ["| row | model (params) | slice | mesh | batch x L | Q-SFT fits | Q-SFT GiB/chip (args + temp) "
         "| BC GiB/chip | MFU BC | MFU Q-SFT | Q-SFT / BC peak GiB | Q-SFT / BC collective bytes "
         "| Q-SFT / BC FLOPs | Q-SFT / BC roofline time | bound | compile s |",
         "|" + "---|" * 16]
  for name, row in ROWS.items():
    if row.qsft_of:  # no BC or Q-SFT step of its own: `ilql_table`
      continue
    r = results.get(name)
    if r is None or "error" in r:
      why = "not compiled" if r is None else r["error"][:300]
      out.append(_line([name, row.config, "", "", "", why] + [""] * 10))
      continue
    q = r["steps"].get("qsft")
    b, b_row = bc_step(results, name)
    q_ok, b_ok = _built(q), _built(b)
    slices = f" x {r['num_slices']}" if r["num_slices"] > 1 else ""
    slice_ = f"{r['topology']}{slices} ({r['chips']} chips)"
    cells = [name, f"{r['model']} ({r['params'] / 1e9:.2f}B)", slice_,
             "x".join(f"{k}{v}" for k, v in r["mesh"].items()), f"{r['batch']} x {r['seq']}"]
    if q_ok:
      cells += ["yes" if q["fits"] else "**no**", f"{_gib(q['peak_bytes'])} ({_gib(q['argument_bytes'])} + "
                f"{_gib(q['temp_bytes'])}) of {_gib(q['hbm_bytes'])}"]
    elif q:
      needs = "needs > " if q.get("temporaries_only") else "needs "
      what = " in temporaries alone" if q.get("temporaries_only") else ""
      cells += ["**no**", f"{needs}{_gib(q['peak_bytes'])}{what} of {_gib(q['hbm_limit_bytes'])} usable "
                f"({_gib(q['over_bytes'])} over)"]
    else:
      cells += ["-", "-"]
    cells.append((_gib(b["peak_bytes"]) + ("" if b_row == name else f" (row {b_row}'s BC)")) if b else "-")
    cells += [_mfu(b_ok) if b_ok else "-", _mfu(q_ok) if q_ok else "-"]
    if q_ok and b_ok:
      x = qsft_bc_ratios(r, q_ok, b_ok)
      cells += [f"{x['peak']:.2f}", f"{x['comm']:.2f}",
                f"{x['flops']:.2f}" + ((" (analytic 4F/2F)" if r.get("lora") else " (analytic 5F/3F)")
                                       if x["analytic"] else ""),
                f"{x['time']:.2f}" + (" (np)" if x["analytic"] else "")]
    else:
      cells += ["-"] * 4
    built = [s for s in r["steps"].values() if "error" not in s]
    cells += [q_ok["bound"] if q_ok else (built[0]["bound"] if built else "-"), f"{r['wall_s']}"]
    out.append(_line(cells))
  return out


def commands_list(results: dict) -> list[str]:
  """The commands that reproduce each row."""
  out = []
  for name, row in ROWS.items():
    runs = [f"`{row.command(run)}`" for run in row.compiles]
    line = f"- `{name}`: " + "; ".join(runs)
    if row.same_bc:
      line += f"; BC step: row `{row.same_bc}`'s (the overrides leave the BC program unchanged)"
    out.append(line)
  return out


def steps_table(results: dict) -> list[str]:
  """One line per compiled step: FLOPs, bytes, collectives and roofline times per chip."""
  out = ["| row | step | FLOPs compiled | FLOPs analytic | ratio | HBM bytes | ICI bytes | DCN bytes "
         "| collectives sent, GB (AG all-gather, RS reduce-scatter, AR all-reduce, CP permute) "
         "| compute ms | HBM ms | ICI ms | DCN ms | step ms |", "|" + "---|" * 14]
  for name in ROWS:
    for kind, s in (results.get(name, {}).get("steps") or {}).items():
      if "error" in s:
        out.append(f"| {name} | {kind} | not built: {s['error'][:200]} |" + " |" * 11)
        continue
      np_ = not _real_flops(s)
      mark = " (np, >=)" if np_ else ""
      out.append(_line([
          name, kind, f"{s['flops_per_chip']:.3g}{mark}", f"{s['analytic_flops_per_chip']:.3g}",
          "-" if np_ else f"{s['flops_ratio']:.2f}", f"{s['hbm_bytes_per_chip']:.3g}{mark}",
          f"{s['ici_bytes_per_chip']:.3g}", f"{s['dcn_bytes_per_chip']:.3g}", _collectives_cell(s)]
          + [f"{s[k] * 1e3:.1f}" for k in ("compute_s", "hbm_s", "ici_s", "dcn_s", "step_s")]))
  return out


def qsft_over_bc_table(results: dict) -> list[str]:
  """Q-SFT against BC per row: FLOPs, roofline time, peak memory, state and collective bytes."""
  out = ["| row | Q-SFT / BC FLOPs | Q-SFT / BC roofline time | peak GiB/chip BC -> Q-SFT "
         "| state (arguments) GiB/chip BC -> Q-SFT | extra state GiB/chip "
         "| collectives GB/chip BC -> Q-SFT |",
         "|" + "---|" * 7]
  for name in ROWS:
    r = results.get(name) or {}
    q, (b, b_row) = _built(r.get("steps", {}).get("qsft")), bc_step(results, name)
    if not (q and _built(b)):
      continue
    x = qsft_bc_ratios(r, q, b)
    comm = [(s["ici_bytes_per_chip"] + s["dcn_bytes_per_chip"]) / 1e9 for s in (b, q)]
    out.append(_line([
        name + ("" if b_row == name else f" (BC of {b_row})"),
        f"{x['flops']:.2f}" + (" (analytic)" if x["analytic"] else ""),
        f"{x['time']:.2f}" + (" (np)" if x["analytic"] else ""),
        f"{_gib(b['peak_bytes'])} -> {_gib(q['peak_bytes'])}",
        f"{_gib(b['argument_bytes'])} -> {_gib(q['argument_bytes'])}",
        _gib(q["argument_bytes"] - b["argument_bytes"]),
        f"{_gb(comm[0])} -> {_gb(comm[1])} ({x['comm']:.2f}x)"]))
  return out


def _memory_cell(s: dict | None) -> str:
  """A step's peak per chip: "peak (args + temp)" when it fits, else what the compiler asked for."""
  if not s:
    return "-"
  if _built(s):
    return f"{_gib(s['peak_bytes'])} ({_gib(s['argument_bytes'])} + {_gib(s['temp_bytes'])})" + (
        "" if s["fits"] else " **does not fit**")
  more = "> " if s.get("temporaries_only") else ""
  what = " in temporaries alone" if s.get("temporaries_only") else ""
  return f"**does not fit**: needs {more}{_gib(s['peak_bytes'])}{what} of {_gib(s['hbm_limit_bytes'])} usable"


def lora_table(results: dict) -> list[str]:
  """LoRA rows against full fine-tuning of the same model on the same slice, batch and length."""
  out = ["| row | adapters, base | slice | batch x L | LoRA Q-SFT GiB/chip (args + temp) "
         "| full fine-tuning row | full fine-tuning Q-SFT GiB/chip | full fine-tuning state GiB/chip |",
         "|" + "---|" * 8]
  for name, row in ROWS.items():
    if not row.full_ft:
      continue
    r, full = results.get(name), results.get(row.full_ft)
    if r is None or "error" in r:
      out.append(_line([name, "not compiled" if r is None else r["error"][:300]] + [""] * 6))
      continue
    lora = r.get("lora", {})
    base = lora.get("quantization", "none")
    base = lora.get("base_dtype", "?") if base == "none" else base
    steps, full_steps = r["steps"], (full or {}).get("steps", {})
    # Full fine-tuning's state: theta, theta_bar, phi and two AdamW moments in float32 (the pod configs).
    full_state = 5 * 4 * r["params"] / r["chips"]
    out.append(_line([
        name, f"rank {lora.get('rank', '?')}, {base} base", f"{r['topology']} ({r['chips']} chips)",
        f"{r['batch']} x {r['seq']}", _memory_cell(steps.get("qsft")), row.full_ft, _memory_cell(full_steps.get("qsft")), _gib(full_state)]))
  return out


def ilql_table(results: dict) -> list[str]:
  """ILQL's steps against Q-SFT's on the same slice, batch and length: memory, FLOPs, collectives."""
  out = ["| row | step (trunk) | ILQL GiB/chip (args + temp) | Q-SFT GiB/chip (row) | ILQL / Q-SFT peak "
         "| FLOPs/chip ILQL / Q-SFT (analytic) | collectives GB/chip ILQL -> Q-SFT | compile s |",
         "|" + "---|" * 8]
  for name, row in ROWS.items():
    if not row.qsft_of:
      continue
    r = results.get(name)
    if r is None or "error" in r:
      out.append(_line([name, "not compiled" if r is None else r["error"][:300]] + [""] * 6))
      continue
    q = _built(((results.get(row.qsft_of) or {}).get("steps") or {}).get("qsft"))
    for kind, s in r["steps"].items():
      trunk = {"ilql": "phi, frozen", "ilql_train": "trained"}.get(kind, kind)
      if not _built(s):
        out.append(_line([name, f"{kind} ({trunk})", _memory_cell(s)] + ["-"] * 5))
        continue
      comm = (s["ici_bytes_per_chip"] + s["dcn_bytes_per_chip"]) / 1e9
      q_comm = (q["ici_bytes_per_chip"] + q["dcn_bytes_per_chip"]) / 1e9 if q else None
      out.append(_line([
          name, f"{kind} ({trunk})", _memory_cell(s),
          f"{_memory_cell(q)} ({row.qsft_of})" if q else "-",
          f"{s['peak_bytes'] / q['peak_bytes']:.2f}" if q else "-",
          f"{s['analytic_flops_per_chip']:.3g} / {q['analytic_flops_per_chip']:.3g} = "
          f"{s['analytic_flops_per_chip'] / q['analytic_flops_per_chip']:.2f}" if q else "-",
          f"{_gb(comm)} -> {_gb(q_comm)}" if q else _gb(comm), f"{s['compile_s']}"]))
  return out


TABLES: dict[str, Callable[[dict], list[str]]] = {
    "summary": summary_table, "commands": commands_list, "steps": steps_table,
    "qsft_over_bc": qsft_over_bc_table, "lora": lora_table, "ilql": ilql_table}


def render(doc: str, results: dict) -> str:
  """`doc` with the text between each table's markers replaced by the table of `results`."""
  for name, table in TABLES.items():
    begin, end = f"<!-- scaling_table:{name} -->", f"<!-- /scaling_table:{name} -->"
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(doc):
      raise ValueError(f"docs/scaling.md has no {begin} ... {end} block")
    doc = pattern.sub(lambda _: "\n".join([begin, *table(results), end]), doc)
  return doc


# ------------------------------------------------------------------------------------------------
# Command line


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_list("compile", [], f"Rows to (re)compile before writing the tables: {', '.join(ROWS)}.",
                    flag_values=fv)
  flags.DEFINE_float("timeout", 1800.0, "Seconds allowed to each compile.", flag_values=fv)
  flags.register_validator("compile", lambda rows: set(rows) <= set(ROWS),
                           f"expected row names among {', '.join(ROWS)}", flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  fv = define_flags()
  cli.parse(fv, argv, prog=PROG, doc=__doc__)
  with open(CACHE) as f:
    results = json.load(f)
  for name in fv.compile:
    print(f"== {name}", flush=True)
    results[name] = compile_row(name, fv.timeout)
    with open(CACHE, "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
  with open(DOC) as f:
    doc = f.read()
  with open(DOC, "w") as f:
    f.write(render(doc, results))
  print(f"wrote {DOC}")
  return 0


if __name__ == "__main__":
  cli.run(main)
