"""What a compiled TPU program costs: collectives read from its HLO, XLA's cost analysis, the
while-loop multiplicities both need, the roofline step time, and the compiler's out-of-memory report.

Loops and cost analysis. XLA's cost analysis (and a plain reading of the HLO) counts a while-loop
body once, whatever its trip count. Collectives are therefore weighted here by the trip counts of
the loops around them (read from each loop's condition); FLOPs and HBM bytes of a looped program
come from loop-free probe programs, extrapolated by `extrapolate` (see `qsft_jax.aot.driver`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Sequence

import numpy as np

from qsft_jax.chips import Chip
from qsft_jax.models.config import ModelConfig, flops_per_token

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def _shape_bytes(text: str) -> list[float]:
  """Bytes of each array shape ("bf16[4,128]{1,0:T(8,128)}") in an HLO result-type string."""
  out = []
  for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]", text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    out.append((n * _DTYPE_BYTES[dtype], bool(dims)))
  return out


def _replica_groups(line: str, num_devices: int) -> list[list[int]] | None:
  """Device groups of a collective: explicit {{0,1},{2,3}}, iota [G,N]<=[dims]T(perm), or mesh-axes
  mesh['axis_0'=4,'axis_1'=2] {'axis_0'} form (groups along the listed axes of an iota mesh)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
    rest = [i for i in range(len(names)) if i not in grouped]
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + grouped)
    return ids.reshape(-1, math.prod(sizes[i] for i in grouped)).tolist()
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    g, n = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(",")])
    return ids.reshape(g, n).tolist()
  m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
  if m:
    groups = [[int(x) for x in grp.split(",") if x] for grp in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return groups if groups and groups[0] else [list(range(num_devices))]
  if "replica_groups={}" in line:
    return [list(range(num_devices))]
  return None


@dataclasses.dataclass
class Collective:
  op: str  # all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute
  result_bytes: float  # per device: the gathered / reduced / scattered result
  group_size: int
  moved_bytes: float  # bytes each device sends per execution (ring algorithms)
  dcn: bool  # a group spans more than one slice
  trips: float = 1.0  # executions per step: the trip counts of the while loops around it
  trips_known: bool = True  # False when an enclosing loop's trip count could not be read


_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(?P<kw>calls|body|condition|to_apply|true_computation|false_computation)=%(?P<c>[\w.\-]+)"
                    r"|\b(?P<kwl>branch_computations|called_computations)=\{(?P<cl>[^}]*)\}")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """{computation name: its instruction lines} of an HLO module's text, and the entry's name."""
  comps: dict[str, list[str]] = {}
  entry, cur = None, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _COMP_HEADER.match(line)
      if m:
        cur = m.group("name")
        comps[cur] = []
        if line.startswith("ENTRY"):
          entry = cur
        continue
      if line.startswith("}"):
        cur = None
      continue
    if cur is not None and line.strip():
      comps[cur].append(line)
  return comps, entry


def _trip_count(cond_lines: Sequence[str]) -> int | None:
  """Trip count of a while loop from its condition computation: ROOT compare(counter, constant N),
  direction=LT (N trips) or LE (N + 1), the counter starting at 0 as XLA's scans and windowed
  loops do. None for any other form."""
  consts = {}
  for line in cond_lines:
    m = re.match(r"\s*%([\w.\-]+) = [su](?:32|64)\[\]\S* constant\((-?\d+)\)", line)
    if m:
      consts[m.group(1)] = int(m.group(2))
  root = next((l for l in cond_lines if l.lstrip().startswith("ROOT")), "")
  m = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=(LT|LE|GT|GE)", root)
  if not m:
    return None
  a, b, direction = m.groups()
  if b in consts and direction in ("LT", "LE"):
    return consts[b] + (direction == "LE")
  if a in consts and direction in ("GT", "GE"):
    return consts[a] + (direction == "GE")
  return None


def _multiplicities(comps: Mapping[str, list[str]], entry: str | None) -> dict[str, tuple[float, bool]]:
  """Executions per step of every computation: (count, known). A while body runs trip-count times per
  execution of its caller; fusions, calls and conditional branches once (branches: an upper bound)."""
  callers: dict[str, list[tuple[str, float | None]]] = {}
  for name, lines in comps.items():
    for line in lines:
      body = cond = None
      for m in _CALLS.finditer(line):
        if m.group("kw"):
          kw, c = m.group("kw"), m.group("c")
          if kw == "body":
            body = c
          elif kw == "condition":
            cond = c
          elif kw != "to_apply":
            callers.setdefault(c, []).append((name, 1.0))
        else:
          for c in re.findall(r"%([\w.\-]+)", m.group("cl")):
            callers.setdefault(c, []).append((name, 1.0))
      if body is not None:
        trips = _trip_count(comps.get(cond, [])) if cond else None
        callers.setdefault(body, []).append((name, None if trips is None else float(trips)))
  memo: dict[str, tuple[float, bool]] = {}

  def mult(name: str, depth: int = 0) -> tuple[float, bool]:
    if name in memo:
      return memo[name]
    if name == entry or name not in callers or depth > 200:
      memo[name] = (1.0, name == entry or entry is None)
      return memo[name]
    total, known = 0.0, True
    for caller, factor in callers[name]:
      n, k = mult(caller, depth + 1)
      total += n * (1.0 if factor is None else factor)
      known &= k and factor is not None
    memo[name] = (total, known)
    return memo[name]

  return {name: mult(name) for name in comps}


def parse_collectives(hlo_text: str, slice_of_device: Sequence[int] | None = None) -> list[Collective]:
  """Collectives of a compiled (SPMD-partitioned) HLO module, with the bytes each device moves.

  TPU's compiled HLO (libtpu 0.0.42) keeps its collectives inside fusions:
  - an async collective is a chain of fusions that each hold a copy of the collective instruction
    (the same channel_id and frontend_attributes chain_id): one whose ROOT is the custom-call
    "AsyncCollectiveStart", "async_collective_fusion" continuations (the collective matmul steps
    that overlap it) and one whose ROOT is "AsyncCollectiveDone". Each chain counts once.
  - a reduce-scatter is an "all-reduce-scatter" fusion: an all-reduce (of one array or a tuple of
    them, each the full unscattered gradient) followed by dynamic slices; it is counted as the
    reduce-scatter of the all-reduce's operands.
  - collectives inside a while body count trip-count times (the loop's condition compares the
    counter with a constant); `trips_known` is False where that could not be read.
  - in a multi-slice program the collectives' groups stay inside one slice; the cross-slice part is a
    host-transfer send / recv pair for the megascale runtime (`_xla_megascale_transfer_type=
    "ALL_REDUCE"`, ...), counted at its send with the number of slices as group size, over the DCN.
  Generic HLO's *-start / *-done pairs count once (at *-start).

  Bytes per device for a group of n (ring algorithms): all-gather result x (n-1)/n; reduce-scatter
  full input x (n-1)/n (= scattered result x (n-1)); all-reduce 2 x result x (n-1)/n; all-to-all
  result x (n-1)/n; collective-permute the result. `slice_of_device` (slice index per logical
  device id) marks collectives whose groups span slices (they run over the DCN).
  """
  num = len(slice_of_device) if slice_of_device is not None else 0
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(?P<result>.*?)\s(?P<op>" + "|".join(COLLECTIVES)
                       + r")(?P<start>-start)?\(")
  comps, entry = _computations(hlo_text)
  if not comps:  # a bare list of instructions (tests, fragments)
    comps, entry = {"": hlo_text.splitlines()}, ""
  mult = _multiplicities(comps, entry)
  roles = {}
  for name, lines in comps.items():
    root = next((l for l in lines if l.lstrip().startswith("ROOT")), "")
    target = re.search(r'custom_call_target="(\w+)"', root)
    if target and target.group(1) in ("AsyncCollectiveStart", "AsyncCollectiveDone"):
      roles[name] = target.group(1)[len("AsyncCollective"):].lower()
    elif name.startswith("async_collective_fusion"):
      roles[name] = "continuation"
    else:
      roles[name] = "plain"
  found = []  # (chain key or None, role, Collective)
  for name, lines in comps.items():
    for line in lines:
      m = pattern.search(line)
      if not m or "-done(" in line:
        continue
      op = m.group("op")
      shapes = [b for b, has_dims in _shape_bytes(m.group("result")) if has_dims]
      if not shapes:
        shapes = [b for b, _ in _shape_bytes(m.group("result"))]
      if m.group("start") and op in ("all-gather", "collective-permute") and len(shapes) >= 2:
        shapes = shapes[len(shapes) // 2:]  # (operands..., results...): keep the results
      result = float(sum(shapes))
      groups = _replica_groups(line, num or 1)
      if op == "all-reduce" and name.startswith("all-reduce-scatter"):
        op = "reduce-scatter"
        n = len(groups[0]) if groups else 1
        result = result / n if n else result  # the scattered shard
      if op == "collective-permute":
        n, moved = 2, result
        pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[-1]) if (
            "source_target_pairs=" in line) else []
        groups = [[int(a), int(b)] for a, b in pairs] or None
      else:
        n = len(groups[0]) if groups else 1
        frac = (n - 1) / n if n else 0.0
        moved = {"all-gather": result * frac, "reduce-scatter": result * (n - 1),
                 "all-reduce": 2 * result * frac, "all-to-all": result * frac}[op]
      dcn = False
      if slice_of_device is not None and groups:
        dcn = any(len({slice_of_device[d] for d in g if d < num}) > 1 for g in groups)
      if n > 1 or op == "collective-permute":
        trips, known = mult.get(name, (1.0, False))
        chain = re.search(r'chain_id="(\d+)"', line)
        channel = re.search(r"channel_id=(\d+)", line)
        key = (chain.group(1), channel and channel.group(1), m.group("op")) if chain else None
        found.append((key, roles[name], Collective(op, result, n, moved, dcn, trips, known)))
  # Multi-slice programs: libtpu leaves the cross-slice (DCN) part of a collective to the megascale
  # runtime, as host-transfer send / recv pairs tagged _xla_megascale_transfer_type; the send's operand
  # is what each chip contributes (e.g. its gradient shard after the in-slice reduce-scatter).
  slices = len(set(slice_of_device)) if slice_of_device is not None else 0
  dcn_ops = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
             "ALL_TO_ALL": "all-to-all"}
  for name, lines in comps.items():
    for line in lines:
      m = re.search(r"=\s*(?P<result>.*?)\ssend\(", line)
      kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
      if not m or not kind or "is_host_transfer=true" not in line:
        continue
      shapes = [b for b, has_dims in _shape_bytes(m.group("result")) if has_dims]
      size = float(shapes[0]) if shapes else 0.0
      n = slices
      if not n:
        target = re.search(r'_xla_megascale_target="\{([\d,]*)\}', line)
        n = len([x for x in target.group(1).split(",") if x]) if target else 2
      op = dcn_ops.get(kind.group(1), kind.group(1).lower().replace("_", "-"))
      frac = (n - 1) / n if n else 0.0
      moved = {"all-reduce": 2 * size * frac, "all-gather": size * (n - 1),
               "reduce-scatter": size * frac}.get(op, size * frac)
      trips, known = mult.get(name, (1.0, False))
      found.append((None, "dcn", Collective(op, size, n, moved, True, trips, known)))
  out, chains = [], {}
  for key, role, c in found:
    if key is None:
      out.append(c)
    else:  # one per async chain: its start fusion's copy, else the first copy seen
      if key not in chains or (role == "start" and chains[key][0] != "start"):
        chains[key] = (role, c)
  return out + [c for _, c in chains.values()]


def xla_cost(compiled) -> dict:
  """Per-device {"flops", "bytes"} (bytes accessed) of XLA's cost analysis of a compiled program
  (loop bodies counted once)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def collective_costs(hlo_text: str, slice_of_device=None) -> dict:
  """Per-device collective bytes of one step (ICI / DCN; every collective times the trip counts of
  the loops around it) and per-op {count, moved_bytes, dcn_count}; "trips_known" is False when a
  loop's trip count could not be read (those collectives then count once: lower bounds)."""
  colls = parse_collectives(hlo_text, slice_of_device)
  out = {"ici_bytes": sum(c.moved_bytes * c.trips for c in colls if not c.dcn),
         "dcn_bytes": sum(c.moved_bytes * c.trips for c in colls if c.dcn),
         "trips_known": all(c.trips_known for c in colls)}
  counts: dict[str, dict] = {}
  for c in colls:
    e = counts.setdefault(c.op, {"count": 0, "moved_bytes": 0.0, "dcn_count": 0})
    e["count"] += c.trips
    e["moved_bytes"] += c.moved_bytes * c.trips
    e["dcn_count"] += c.trips * int(c.dcn)
  out["collectives"] = counts
  return out


def program_costs(compiled, slice_of_device) -> dict:
  """Per-device FLOPs, HBM bytes and collective bytes (ICI / DCN) of one compiled program."""
  return {**xla_cost(compiled), **collective_costs(compiled.as_text(), slice_of_device)}


def has_loops(hlo_text: str) -> bool:
  """Whether a compiled module contains a while loop (whose body cost analysis counts once)."""
  return re.search(r"\swhile\(", hlo_text) is not None


def extrapolate(c1: dict, c2: dict, layers: int) -> dict:
  """Costs of N = `layers` identical layers from the costs of 1 and 2: c1 + (N - 1) (c2 - c1)."""
  def lin(a, b):
    return a + (layers - 1) * (b - a)
  out = {k: lin(c1[k], c2[k]) for k in ("flops", "bytes", "ici_bytes", "dcn_bytes")}
  ops = set(c1["collectives"]) | set(c2["collectives"])
  zero = {"count": 0, "moved_bytes": 0.0, "dcn_count": 0}
  out["collectives"] = {op: {k: lin(c1["collectives"].get(op, zero)[k], c2["collectives"].get(op, zero)[k])
                             for k in zero} for op in sorted(ops)}
  return out


def roofline(chip: Chip, flops: float, hbm_bytes: float, ici_bytes: float, dcn_bytes: float) -> dict:
  """Per-chip step-time lower bounds (seconds) and their max, the roofline step-time estimate."""
  times = {"compute_s": flops / chip.bf16_flops, "hbm_s": hbm_bytes / chip.hbm_bytes_per_s,
           "ici_s": ici_bytes / chip.ici_bytes_per_s,
           "dcn_s": (dcn_bytes / chip.dcn_bytes_per_s) if chip.dcn_bytes_per_s else 0.0}
  if dcn_bytes and not chip.dcn_bytes_per_s:
    times["dcn_s"] = float("nan")
  finite = [t for t in times.values() if t == t]
  times["step_s"] = max(finite)
  times["bound"] = max((k for k in times if k != "step_s" and times[k] == times[k]), key=times.get)[:-2]
  return times


_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?)(?:i?B)? of ([\d.]+)([KMGT]?)(?:i?B)? (?:hbm|HBM)")
# The form of a program whose temporaries alone exceed HBM (refused before buffer assignment).
_OOM_TEMPS = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)(?:i?B)?\) exceeds "
                        r"available HBM \(([\d.]+)([KMGT]?)(?:i?B)?\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> dict:
  """{"used_bytes", "limit_bytes"} from the TPU compiler's RESOURCE_EXHAUSTED message ("Ran out of
  memory in memory space hbm. Used 20.61G of 15.75G hbm. Exceeded hbm capacity by 4.86G."), or
  {"used_bytes" (the temporaries only, a lower bound), "limit_bytes", "temporaries_only": True} from
  "... the total memory required for HLO temporaries (25.17G) exceeds available HBM (15.75G)"; {} if
  neither."""
  m = _OOM_USED.search(message)
  temps = m is None
  m = m or _OOM_TEMPS.search(message)
  if not m:
    return {}
  out = {"used_bytes": int(float(m.group(1)) * _UNITS[m.group(2)]),
         "limit_bytes": int(float(m.group(3)) * _UNITS[m.group(4)])}
  return {**out, "temporaries_only": True} if temps else out



def analytic_flops(kind: str, model_config: ModelConfig, rows: int, length: int, lora: bool = False) -> float:
  """Model FLOPs of one step, all chips together (F = `flops_per_token` at length L):
  "bc" 3 F x rows x L (forward + backward of theta); "qsft" 5 F x rows x L (theta trained, theta_bar
  and phi forward only); "decode" 2 F(S) x rows (theta and phi, one token each, attention over
  `length` = S cache slots). With `lora` (adapters over a frozen base) the base's weight gradients
  are not formed: "bc" 2 F, "qsft" 4 F (the adapters' own terms, O(rank / d_model), are left out).
  "ilql" F + 12 D V and "ilql_train" 3 F + 12 D V: the trunk's forward (frozen phi) or training pass
  and the two Q heads' [D, V] logits forward and backward."""
  if kind == "decode":
    return 2 * flops_per_token(model_config, length) * rows
  if kind in ("ilql", "ilql_train"):
    # phi's forward (ilql) or the trunk's training pass (ilql_train), plus the two Q heads' logits
    # [D, V] forward and backward (the CQL term's logsumexp; 3 x 2 D V each per token).
    heads = 2 * 3 * 2 * model_config.d_model * model_config.padded_vocab_size
    passes = 1 if kind == "ilql" else 3
    return (passes * flops_per_token(model_config, length) + heads) * rows * length
  passes = ({"bc": 2, "qsft": 4} if lora else {"bc": 3, "qsft": 5})[kind]
  return passes * flops_per_token(model_config, length) * rows * length
