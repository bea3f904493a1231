"""Ahead-of-time compilation of the train and decode steps for a TPU pod slice, on a CPU machine.

With the `libtpu` package installed, `jax.experimental.topologies.get_topology_desc(NAME, "tpu", ...)`
describes the devices of a TPU slice (compile-only devices: nothing runs on them), and
`jax.jit(...).lower(abstract inputs).compile()` builds the real TPU program for that slice. No TPU and
no parameter is needed: every input is a `jax.ShapeDtypeStruct` carrying its `NamedSharding`, and the
train state's shapes come from `jax.eval_shape`. The CPU stays JAX's default backend throughout.

    python -m qsft_jax.aot --model=llama3-8b --topology=v5p:4x4x8 --mesh=data:1,fsdp:-1,tensor:1 \
        --batch=256 --seq=2048 [--num_slices=2] [--remat=full] [--scan] [--dtype=bfloat16]
    python -m qsft_jax.aot --config=configs/pod_llama3_8b.py

For each of the BC step, the Q-SFT step and the extraction decode step (one new token for every
sequence, both models' KV caches) it prints, per chip: argument / temporary / output bytes against
the chip's HBM; FLOPs and HBM bytes per step (compiled, from XLA's cost analysis) beside the analytic
model FLOPs; the collectives of the compiled program with the bytes each moves; a roofline step time
max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI bandwidth, DCN bytes / DCN bandwidth)
and the model FLOPs utilisation (MFU) it implies. The last line is one JSON object of the figures.

Analytic model FLOPs (`models.config.flops_per_token`, F per token at the row length L):
  BC    = 3 F x tokens               (forward + backward of theta)
  Q-SFT = 3 F x tokens + 2 F x tokens (theta trained; theta_bar and phi forward only)
  decode= 2 F(S) x rows              (theta and phi, one token each, attention over S cache slots)

Loops and cost analysis. XLA's cost analysis (and a plain reading of the HLO) counts a while-loop
body once, whatever its trip count. Layers under `scan`, the chunked losses' scan over row chunks and
gradient accumulation are loops, so for any step that has them the per-step costs (FLOPs, HBM bytes,
collective bytes) are taken from two loop-free *probe* programs: the same step, mesh and batch with 1
and 2 unrolled layers, one loss chunk and one microbatch, extrapolated linearly to N layers
(cost(N) = cost(1) + (N - 1) x (cost(2) - cost(1)); exact for identical layers). Memory always comes
from the real program. Rematerialisation is kept in the probes, so the compiled FLOPs include its
recomputation (compiled / analytic ~ 4/3 for the theta pass under full remat); MFU uses the analytic
count, as is the convention.

Platform notes (jax 0.10.2, libtpu 0.0.42.1):
- `get_topology_desc(name, "tpu", chip_config_name=..., num_slices=N)`: v4 and v5p need
  chip_config_name="megacore" for one device per chip ("default" gives one per TensorCore on v4);
  num_slices > 1 returns the devices of N slices with `slice_index` set, which
  `mesh_utils.create_hybrid_device_mesh` lays out with the slices on the `data` axis (over DCN).
- libtpu takes /tmp/libtpu_lockfile when it initialises, and any JAX process started without
  JAX_PLATFORMS=cpu initialises it at start-up (then falls back to the CPU), so a second process
  fails to describe a topology with "Internal error when accessing libtpu multi-process lockfile".
  On a machine without TPU chips (no /dev/accel*, /dev/vfio/N) this module therefore sets
  ALLOW_MULTIPLE_LIBTPU_LOAD=1, and also TPU_SKIP_MDS_QUERY=1, TPU_WORKER_HOSTNAMES=localhost and
  TPU_ACCELERATOR_TYPE, which silence libtpu's warnings about the missing TPU metadata server (only
  where unset; they do not change the described topology; never set on a TPU host).
- The libtpu package does not make JAX pick a TPU backend on a machine without TPU chips: jax.devices()
  stays [CpuDevice]; JAX_PLATFORMS=cpu also works and still allows the topology description.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qsft_jax.chips import Chip, get_chip

TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
# jax/libtpu topology names per generation (v5p chips are "v5" to libtpu, v5e chips "v5e").
_LIBTPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


# ------------------------------------------------------------------------------------------------
# Topology and mesh


def _prepare_libtpu_env() -> None:
  """libtpu settings for describing a topology on a machine without TPU chips (see module doc)."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
  """"v5p:4x4x8" -> (the v5p Chip, (4, 4, 8)); ValueError with the expected form otherwise."""
  m = TOPOLOGY_RE.match(topology)
  if not m:
    raise ValueError(f"topology {topology!r}: expected GEN:AxB or GEN:AxBxC with GEN in "
                     "v4, v5e, v5p, v6e (e.g. v5e:2x2, v5p:4x4x8)")
  return get_chip(m.group(1)), tuple(int(d) for d in m.group(2).split("x"))


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only TPU devices of `num_slices` slices of `topology` (one device per chip).

  Raises RuntimeError naming the fix when libtpu is not installed.
  """
  chip, dims = parse_topology(topology)
  if num_slices < 1:
    raise ValueError(f"num_slices={num_slices} must be >= 1")
  _prepare_libtpu_env()
  from jax.experimental import topologies
  kwargs = {"chip_config_name": "megacore" if chip.megacore else "default"}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    desc = topologies.get_topology_desc(f"{_LIBTPU_NAMES[chip.name]}:{'x'.join(map(str, dims))}",
                                        "tpu", **kwargs)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise RuntimeError("AOT compilation for TPU needs the libtpu package matching jax "
                         "(jax 0.10.2: pip install libtpu==0.0.42.1)") from e
    raise
  devices = list(desc.devices)
  expected = math.prod(dims) * num_slices
  if len(devices) != expected:
    raise RuntimeError(f"topology {topology} x {num_slices} slices: libtpu returned {len(devices)} "
                       f"devices, expected {expected} (one per chip)")
  return devices


def resolve_mesh_shape(mesh_shape: Mapping[str, int], device_count: int) -> dict[str, int]:
  """{"data", "fsdp", "tensor"} sizes with the one -1 filled in (via sharding.make_mesh's rules)."""
  from qsft_jax.sharding import MESH_AXES
  shape = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
  if list(shape.values()).count(-1) == 1:
    free = next(a for a, v in shape.items() if v == -1)
    fixed = math.prod(v for v in shape.values() if v != -1)
    shape[free] = device_count // fixed if fixed and device_count % fixed == 0 else 0
  if math.prod(shape.values()) != device_count or min(shape.values()) < 1:
    raise ValueError(f"mesh shape {dict(mesh_shape)} does not fit {device_count} devices")
  return shape


def topology_mesh(mesh_shape: Mapping[str, int], devices: Sequence, num_slices: int = 1):
  """Mesh (data, fsdp, tensor), all AxisType.Auto, on compile-only TPU devices.

  One slice: `sharding.make_mesh` (physical-topology-aware device order). Several slices: the slices
  go on the outer part of the `data` axis (data = num_slices x data_per_slice), so only the data-
  parallel gradient reduction crosses the DCN; fsdp and tensor stay inside a slice.
  """
  import jax
  from jax.experimental import mesh_utils
  from jax.sharding import AxisType, Mesh
  from qsft_jax import sharding
  if num_slices == 1:
    return sharding.make_mesh(mesh_shape, devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  if shape["data"] % num_slices:
    raise ValueError(f"mesh {shape}: with {num_slices} slices the data axis must be a multiple of "
                     f"{num_slices} (slices are laid out on the data axis)")
  ici = (shape["data"] // num_slices, shape["fsdp"], shape["tensor"])
  grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
  return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ------------------------------------------------------------------------------------------------
# What is compiled


@dataclasses.dataclass(frozen=True)
class AotSpec:
  """One AOT job: model, slice, mesh, batch and step options."""
  preset: str
  topology: str
  mesh_shape: Mapping[str, int]
  batch: int  # global rows of a train step
  seq: int  # row length L
  num_slices: int = 1
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  rules: Any = None  # None: sharding.DEFAULT_RULES
  microbatches: int = 1
  chunk_size: int = 128
  mu_dtype: str | None = None  # Adam first-moment dtype (None: the parameters')
  decode_batch: int = 0  # rows of the decode step (0: = batch)
  cache_len: int = 0  # KV-cache slots of the decode step (0: = seq)
  steps: tuple[str, ...] = ("bc", "qsft", "decode")
  probes: bool = True  # cost probes for looped programs (False: memory and collectives only, fast)
  # dtype of the frozen parameter sets theta_bar and phi in the Q-SFT state (None: param_dtype, as the
  # trainer stores them today). An accounting option: the step keeps each set's dtype (polyak_update
  # computes in the target's dtype), theta and its AdamW moments stay in param_dtype.
  frozen_dtype: str | None = None

  def model_config(self, **extra):
    from qsft_jax.models.config import get_preset
    return get_preset(self.preset, **{**dict(self.model_overrides), **extra})

  def resolved_rules(self):
    from qsft_jax.sharding import DEFAULT_RULES
    return tuple(tuple(r) for r in (DEFAULT_RULES if self.rules is None else self.rules))


def make_optimizer(mu_dtype: str | None = None):
  """The trainer's optimizer shape: global-norm clipping then AdamW (two moments per parameter).

  The learning-rate schedule does not change any shape or the program's cost, so a constant is used.
  """
  import jax.numpy as jnp
  import optax
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.0,
                                 mu_dtype=None if mu_dtype is None else jnp.dtype(mu_dtype)))


def _with_shardings(shapes, shardings):
  import jax
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_state(model, model_config, optimizer, mesh, rules, kind: str,
                   frozen_dtype: str | None = None) -> dict:
  """ShapeDtypeStructs (with NamedShardings) of a "bc" or "qsft" train state; nothing allocated.

  frozen_dtype (Q-SFT only): floating-point leaves of theta_bar and phi take this dtype.
  """
  import jax
  from qsft_jax import train_steps
  from qsft_jax.models import sharded
  params = sharded.param_shapes(model, model_config)
  if kind == "bc":
    shapes = jax.eval_shape(lambda p: train_steps.init_bc_state(p, optimizer), params)
  else:
    shapes = jax.eval_shape(lambda p: train_steps.init_qsft_state(p, p, optimizer), params)
    if frozen_dtype is not None:
      def cast(s):
        dtype = np.dtype(frozen_dtype) if np.issubdtype(s.dtype, np.floating) else s.dtype
        return jax.ShapeDtypeStruct(s.shape, dtype)
      for key in ("target_params", "behaviour_params"):
        shapes[key] = jax.tree.map(cast, shapes[key])
  return _with_shardings(shapes, train_steps.state_shardings(model, model_config, optimizer, mesh,
                                                             rules, kind))


def abstract_batch(rows: int, length: int, mesh, rules) -> dict:
  """ShapeDtypeStructs of a [rows, length] token-level MDP batch (every array of data.mdp)."""
  import jax
  from qsft_jax import sharding
  from qsft_jax.data.mdp import ARRAY_SPECS
  row_sharding = sharding.batch_sharding(mesh, rules)
  return {k: jax.ShapeDtypeStruct((rows, length), np.dtype(dtype), sharding=row_sharding)
          for k, (dtype, _) in ARRAY_SPECS.items()}


def shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard per leaf)."""
  import jax
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def make_decode_step(model, model_config, mesh, rules, beta: float = 1.0):
  """One extraction decode step for every sequence, with the KV caches of theta and phi.

  (theta, phi, theta_cache, phi_cache, tokens [B, 1], positions [B, 1]) -> (next tokens [B],
  theta_cache, phi_cache): both models read their cache and append one token; the scores are
  log_softmax(z_phi) + beta * softmax(z_theta) over the real vocabulary (DESIGN.md section 2), then
  greedy. Caches are donated. `qsft_jax.sampler` runs the whole generation as one while-loop program
  (whose body cost analysis would count once); this is its loop body for one token (the same
  `sampler.token_scores`), built from `Transformer(cache=...)` so that a token step compiles and is
  costed on its own.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from qsft_jax import sharding
  from qsft_jax.models import sharded
  from qsft_jax.sampler import token_scores
  vocab = model_config.vocab_size

  def step(theta, phi, theta_cache, phi_cache, tokens, positions):
    segments = jnp.ones_like(tokens)
    z_theta, theta_cache = model.apply(theta, tokens, positions, segments, cache=theta_cache)
    z_phi, phi_cache = model.apply(phi, tokens, positions, segments, cache=phi_cache)
    scores = token_scores("extract", z_phi[:, -1], z_theta[:, -1], vocab, jnp.float32(beta), jnp.float32(0))
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), theta_cache, phi_cache

  params = sharded.param_shardings(model, model_config, mesh, rules)
  rows = NamedSharding(mesh, sharding.logical_to_mesh_spec(("batch",), None, dict(mesh.shape), rules))

  def jitted(cache_shardings, token_sharding):
    return jax.jit(step, in_shardings=(params, params, cache_shardings, cache_shardings,
                                       token_sharding, token_sharding),
                   out_shardings=(rows, cache_shardings, cache_shardings), donate_argnums=(2, 3))

  def lower(theta, phi, theta_cache, phi_cache, tokens, positions):
    fn = jitted(jax.tree.map(lambda x: x.sharding, theta_cache), tokens.sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn.lower(theta, phi, theta_cache, phi_cache, tokens, positions)

  return lower


def _lowered(kind: str, spec: AotSpec, model_config, mesh, rules, microbatches: int, chunk_size: int):
  """Lowered program of one step kind ("bc", "qsft", "decode") for `model_config` on `mesh`."""
  import jax
  from qsft_jax import sharding, train_steps
  from qsft_jax.models import sharded
  from qsft_jax.models.transformer import Transformer, init_cache
  model = Transformer(model_config)
  optimizer = make_optimizer(spec.mu_dtype)
  if kind in ("bc", "qsft"):
    make = train_steps.make_bc_step if kind == "bc" else train_steps.make_qsft_step
    step = make(model, model_config, optimizer, mesh, rules,
                options=train_steps.StepOptions(chunk_size=chunk_size, microbatches=microbatches))
    return step.lower(abstract_state(model, model_config, optimizer, mesh, rules, kind,
                                     spec.frozen_dtype if kind == "qsft" else None),
                      abstract_batch(spec.batch, spec.seq, mesh, rules))
  if kind == "decode":
    rows, slots = spec.decode_batch or spec.batch, spec.cache_len or spec.seq
    params = _with_shardings(sharded.param_shapes(model, model_config),
                             sharded.param_shardings(model, model_config, mesh, rules))
    cache = _with_shardings(jax.eval_shape(lambda: init_cache(model_config, rows, slots)),
                            sharded.cache_shardings(model_config, rows, slots, mesh, rules))
    token_sharding = sharding.batch_sharding(mesh, rules)
    tokens = jax.ShapeDtypeStruct((rows, 1), np.int32, sharding=token_sharding)
    return make_decode_step(model, model_config, mesh, rules)(params, params, cache, cache, tokens, tokens)
  raise ValueError(f"unknown step kind {kind!r}: expected bc, qsft or decode")


def analytic_flops(kind: str, model_config, spec: AotSpec) -> float:
  """Model FLOPs of one step (see the module docstring), all chips together."""
  from qsft_jax.models.config import flops_per_token
  if kind == "decode":
    rows, slots = spec.decode_batch or spec.batch, spec.cache_len or spec.seq
    return 2 * flops_per_token(model_config, slots) * rows
  passes = 3 if kind == "bc" else 5
  return passes * flops_per_token(model_config, spec.seq) * spec.batch * spec.seq


# ------------------------------------------------------------------------------------------------
# Reading the compiled program


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


def _cost(compiled) -> dict:
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


def _program_costs(compiled, slice_of_device) -> dict:
  """Per-device FLOPs, HBM bytes and collective bytes (ICI / DCN) of one compiled program."""
  return {**_cost(compiled), **collective_costs(compiled.as_text(), slice_of_device)}


def has_loops(hlo_text: str) -> bool:
  """Whether a compiled module contains a while loop (whose body cost analysis counts once)."""
  return re.search(r"\swhile\(", hlo_text) is not None


# ------------------------------------------------------------------------------------------------
# One step: compile, measure, estimate


def _extrapolate(c1: dict, c2: dict, layers: int) -> dict:
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
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> dict:
  """{"used_bytes", "limit_bytes"} from the TPU compiler's RESOURCE_EXHAUSTED message ("Ran out of
  memory in memory space hbm. Used 20.61G of 15.75G hbm. Exceeded hbm capacity by 4.86G."); {} if absent."""
  m = _OOM_USED.search(message)
  if not m:
    return {}
  return {"used_bytes": int(float(m.group(1)) * _UNITS[m.group(2)]),
          "limit_bytes": int(float(m.group(3)) * _UNITS[m.group(4)])}


def _oom_figures(kind: str, chip: Chip, error: Exception, compile_s: float) -> dict:
  """Figures of a step the compiler refused for want of HBM: what it would have used, no costs."""
  msg = str(error)
  oom = parse_oom(msg)
  lines = [l.strip() for l in msg.splitlines() if l.strip()]
  head = next((l for l in lines if "RESOURCE_EXHAUSTED" in l or "Ran out of memory" in l), lines[0] if lines else "")
  used = oom.get("used_bytes", 0)
  return {"step": kind, "fits": False, "error": head[:400], "oom_message": msg[:4000],
          "peak_bytes": used, "hbm_bytes": chip.hbm_bytes, "hbm_limit_bytes": oom.get("limit_bytes", 0),
          "over_bytes": used - oom["limit_bytes"] if oom else 0,
          "compile_s": round(compile_s, 1), "compile_s_with_probes": round(compile_s, 1)}


def compile_step(kind: str, spec: AotSpec, mesh, chip: Chip) -> dict:
  """Compiles one step for the mesh's TPU devices and returns its figures (see the module doc).

  A step over HBM comes back with fits=False, the bytes the compiler asked for (peak_bytes) and its
  message, instead of raising. With spec.probes False the costs come from the real program alone:
  collectives exact (weighted by loop trip counts), FLOPs and HBM bytes counting loop bodies once
  (lower bounds), and the roofline's compute time uses max(compiled, analytic) FLOPs.
  """
  rules = spec.resolved_rules()
  config = spec.model_config()
  slice_of = [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]
  t0 = time.time()
  try:
    compiled = _lowered(kind, spec, config, mesh, rules, spec.microbatches, spec.chunk_size).compile()
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is handled
    if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
      raise
    return _oom_figures(kind, chip, e, time.time() - t0)
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  if os.environ.get("QSFT_AOT_DUMP_HLO"):  # a folder: the compiled HLO text of each step goes there
    os.makedirs(os.environ["QSFT_AOT_DUMP_HLO"], exist_ok=True)
    with open(os.path.join(os.environ["QSFT_AOT_DUMP_HLO"], f"{kind}.hlo.txt"), "w") as f:
      f.write(hlo)
  colls = collective_costs(hlo, slice_of)
  if has_loops(hlo) and spec.probes:
    probes, looped = [], False
    for layers in (1, 2):
      probe_config = spec.model_config(num_layers=layers, scan_layers=False)
      probe = _lowered(kind, spec, probe_config, mesh, rules, 1, max(spec.seq, spec.chunk_size)).compile()
      looped |= has_loops(probe.as_text())
      probes.append(_program_costs(probe, slice_of))
    costs = _extrapolate(probes[0], probes[1], config.num_layers)
    costs["source"] = "probes (1 and 2 unrolled layers, extrapolated)"
    if looped:  # loops XLA made itself (e.g. windowed einsums): their bodies are counted once
      costs["source"] += "; the probes hold compiler-made while loops, so FLOPs and HBM bytes are lower bounds"
  elif has_loops(hlo):
    costs = _cost(compiled)
    costs["source"] = ("compiled program without probes (--no-probes): FLOPs and HBM bytes count loop "
                       "bodies once (lower bounds); roofline compute from max(compiled, analytic) FLOPs")
  else:
    costs = _cost(compiled)
    costs["source"] = "compiled program"
  # Collectives always come from the real program, each weighted by its loops' trip counts.
  costs.update({k: colls[k] for k in ("ici_bytes", "dcn_bytes", "collectives")})
  costs["collectives_source"] = "compiled program, loop trip counts applied" + (
      "" if colls["trips_known"] else "; some trip counts unreadable (those loops counted once: lower bounds)")
  compile_s_total = time.time() - t0
  chips = mesh.devices.size
  analytic = analytic_flops(kind, config, spec)
  peak_bytes = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes)
  compute_flops = costs["flops"]
  if has_loops(hlo) and not spec.probes:
    compute_flops = max(costs["flops"], analytic / chips)
  times = roofline(chip, compute_flops, costs["bytes"], costs["ici_bytes"], costs["dcn_bytes"])
  return {
      "step": kind,
      "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
      "generated_code_bytes": int(mem.generated_code_size_in_bytes),
      "peak_bytes": int(peak_bytes), "hbm_bytes": chip.hbm_bytes, "fits": peak_bytes <= chip.hbm_bytes,
      "flops_per_chip": costs["flops"], "analytic_flops_per_chip": analytic / chips,
      "flops_ratio": costs["flops"] / (analytic / chips), "hbm_bytes_per_chip": costs["bytes"],
      "ici_bytes_per_chip": costs["ici_bytes"], "dcn_bytes_per_chip": costs["dcn_bytes"],
      "collectives": costs["collectives"], "cost_source": costs["source"],
      "collectives_source": costs["collectives_source"], "probes": spec.probes,
      **{k: v for k, v in times.items()},
      "mfu": (analytic / chips) / (chip.bf16_flops * times["step_s"]) if times["step_s"] else 0.0,
      "compile_s": round(compile_s, 1), "compile_s_with_probes": round(compile_s_total, 1),
  }


def run(spec: AotSpec) -> dict:
  """Compiles every step of `spec.steps` and returns {"spec": ..., "steps": {kind: figures}}."""
  from qsft_jax.models.config import param_count
  chip, _ = parse_topology(spec.topology)
  devices = topology_devices(spec.topology, spec.num_slices)
  mesh = topology_mesh(spec.mesh_shape, devices, spec.num_slices)
  config = spec.model_config()
  out = {"model": spec.preset, "params": param_count(config), "topology": spec.topology,
         "num_slices": spec.num_slices, "chips": len(devices), "mesh": dict(mesh.shape),
         "batch": spec.batch, "seq": spec.seq, "microbatches": spec.microbatches,
         "remat": config.remat_policy, "scan": config.scan_layers, "dtype": config.dtype,
         "param_dtype": config.param_dtype, "frozen_dtype": spec.frozen_dtype or config.param_dtype,
         "steps": {}}
  for kind in spec.steps:
    out["steps"][kind] = compile_step(kind, spec, mesh, chip)
  return out


# ------------------------------------------------------------------------------------------------
# Command line


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB"


def format_report(result: dict) -> str:
  """Readable per-chip report of `run`'s result."""
  lines = [f"{result['model']} ({result['params'] / 1e9:.2f}B params) on {result['topology']}"
           f" x {result['num_slices']} slice(s) = {result['chips']} chips, mesh {result['mesh']}, "
           f"batch {result['batch']} x {result['seq']}, microbatches {result['microbatches']}, "
           f"remat {result['remat']}, scan {result['scan']}, dtype {result['dtype']}/"
           f"{result['param_dtype']}, theta_bar/phi {result.get('frozen_dtype', result['param_dtype'])}"]
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


def parse_mesh(text: str) -> dict[str, int]:
  """"data:1,fsdp:-1,tensor:1" -> {"data": 1, "fsdp": -1, "tensor": 1}."""
  out = {}
  for part in text.split(","):
    name, _, size = part.partition(":")
    if not size:
      raise ValueError(f"--mesh={text!r}: expected AXIS:SIZE,... (e.g. data:1,fsdp:-1,tensor:1)")
    out[name.strip()] = int(size)
  return out


def load_config_file(path: str):
  """(get_config() of a config file, its module) — pod configs carry their slice in AOT_TOPOLOGY."""
  module_spec = importlib.util.spec_from_file_location(f"_aot_config_{abs(hash(path))}", path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"--config={path!r}: not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(), module


def spec_from_config(config, module=None, **overrides) -> AotSpec:
  """AotSpec from a pod config (fields model.preset, model.overrides, mesh.shape, mesh.rules,
  qsft.batch_size, qsft.microbatches, data.max_length, loss.chunk_size; the slice from the module's
  AOT_TOPOLOGY / AOT_NUM_SLICES or from the overrides)."""
  model_overrides = dict(config.model.get("overrides", {}))
  fields = dict(
      preset=config.model.preset, model_overrides=model_overrides,
      mesh_shape=dict(config.mesh.shape), rules=tuple(tuple(r) for r in config.mesh.rules),
      batch=int(config.qsft.batch_size), seq=int(config.data.max_length),
      microbatches=int(config.qsft.get("microbatches", 1)),
      chunk_size=int(config.get("loss", {}).get("chunk_size", 128)),
      topology=getattr(module, "AOT_TOPOLOGY", None), num_slices=getattr(module, "AOT_NUM_SLICES", 1),
      mu_dtype=getattr(module, "AOT_MU_DTYPE", None))
  fields.update({k: v for k, v in overrides.items() if v is not None})
  if not fields["topology"]:
    raise ValueError("no topology: pass --topology or set AOT_TOPOLOGY in the config file")
  return AotSpec(**fields)


def main(argv: Sequence[str] | None = None) -> dict:
  import argparse
  p = argparse.ArgumentParser(prog="python -m qsft_jax.aot", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", help="pod config file (configs/pod_*.py); other flags override it")
  p.add_argument("--model", help="model preset (qsft_jax.models.config)")
  p.add_argument("--topology", help="TPU slice, e.g. v5e:2x2, v5p:4x4x8, v6e:4x4, v4:2x2x1")
  p.add_argument("--num_slices", type=int)
  p.add_argument("--mesh", help="e.g. data:1,fsdp:-1,tensor:1 (default data:1,fsdp:-1,tensor:1)")
  p.add_argument("--batch", type=int, help="global rows per train step")
  p.add_argument("--seq", type=int, help="row length L")
  p.add_argument("--microbatches", type=int)
  p.add_argument("--chunk_size", type=int)
  p.add_argument("--remat", choices=("none", "full", "dots_saveable", "minimal"))
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--param_dtype", choices=("float32", "bfloat16"))
  p.add_argument("--mu_dtype", choices=("float32", "bfloat16"), help="Adam first-moment dtype")
  p.add_argument("--frozen_dtype", choices=("float32", "bfloat16"),
                 help="dtype of theta_bar and phi in the Q-SFT state (default: param_dtype); memory "
                      "accounting: theta and its AdamW moments keep param_dtype")
  p.add_argument("--decode_batch", type=int)
  p.add_argument("--cache_len", type=int)
  p.add_argument("--steps", default="bc,qsft,decode", help="comma-separated subset of bc,qsft,decode")
  p.add_argument("--probes", action=argparse.BooleanOptionalAction, default=None,
                 help="compile the 1- and 2-layer cost probes of looped programs (default; --no-probes: "
                      "memory and collectives from the real program only, FLOPs as lower bounds)")
  a = p.parse_args(argv)
  model_overrides = {k: v for k, v in (("remat_policy", a.remat), ("scan_layers", a.scan),
                                        ("dtype", a.dtype), ("param_dtype", a.param_dtype)) if v is not None}
  flags = dict(topology=a.topology, num_slices=a.num_slices, batch=a.batch, seq=a.seq,
               microbatches=a.microbatches, chunk_size=a.chunk_size, mu_dtype=a.mu_dtype,
               decode_batch=a.decode_batch, cache_len=a.cache_len, preset=a.model,
               mesh_shape=parse_mesh(a.mesh) if a.mesh else None,
               steps=tuple(s for s in a.steps.split(",") if s), probes=a.probes,
               frozen_dtype=a.frozen_dtype)
  if a.config:
    config, module = load_config_file(a.config)
    spec = spec_from_config(config, module, **flags)
    spec = dataclasses.replace(spec, model_overrides={**spec.model_overrides, **model_overrides})
  else:
    missing = [n for n in ("model", "topology", "batch", "seq") if getattr(a, n) is None]
    if missing:
      p.error(f"without --config these flags are required: {', '.join('--' + m for m in missing)}")
    flags["mesh_shape"] = flags["mesh_shape"] or {"data": 1, "fsdp": -1, "tensor": 1}
    flags["num_slices"] = flags["num_slices"] or 1
    spec = AotSpec(**{k: v for k, v in flags.items() if v is not None}, model_overrides=model_overrides)
  result = run(spec)
  print(format_report(result))
  print(json.dumps(result, sort_keys=True))
  sys.stdout.flush()
  return result


if __name__ == "__main__":
  main()
