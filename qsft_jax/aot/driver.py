"""Compiles the trainer's own steps for a TPU slice and measures them, on a CPU machine.

A job is the trainer's config (model.preset and model.overrides, mesh.shape and mesh.rules, the
batch sizes, data.max_length, loss.chunk_size, microbatches, the optimizer and the state's storage
dtypes: what `qsft_jax.phases.build` reads) and a `Target`: the slice and what to measure. The
train steps are `phases.build(...).step` lowered on the abstract state of `.abstract_state`; the
decode step is `sampler.decode_step` of both models (the body of the sampler's loop) with the
extraction scores and a greedy pick, attending with the model's einsums (the sampler's "dot", its
choice off the CPU). Every input is a `jax.ShapeDtypeStruct` carrying its `NamedSharding`: nothing
is allocated. Each compile (a step's and its probes') says on stderr when it starts, how long it has
run every QSFT_PROGRESS_SECONDS, and its elapsed time when done (`qsft_jax.progress.timed`).

For each step `compile_step` gives, per chip: argument / temporary / output bytes against the
chip's HBM (`compiled.memory_analysis()`); FLOPs and HBM bytes of XLA's cost analysis beside the
analytic model FLOPs (`costs.analytic_flops`); the collectives of the compiled program with the
bytes each moves; a roofline step time max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI
bandwidth, DCN bytes / DCN bandwidth) and the model FLOPs utilisation (MFU) it implies.

Cost probes. Layers under `scan`, the chunked losses' scan over row chunks and gradient
accumulation are while loops, whose bodies XLA's cost analysis counts once. For a step that has
them, FLOPs and HBM bytes come from two loop-free probe programs: the same config with 1 and 2
unrolled layers, one loss chunk and one microbatch, extrapolated linearly to N layers (exact for
identical layers). Rematerialisation is kept in the probes, so compiled FLOPs include its
recomputation (compiled / analytic ~ 4/3 for theta's pass under full remat); MFU uses the analytic
count, as is the convention. Memory always comes from the real program, and so do collectives, each
weighted by the trip counts of its loops. Without probes (Target.probes False) FLOPs and HBM bytes
of a looped program are lower bounds and the roofline's compute time uses max(compiled, analytic).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from qsft_jax import config_lib
from qsft_jax import phases
from qsft_jax import progress
from qsft_jax import run as run_lib
from qsft_jax import sampler
from qsft_jax import sharding
from qsft_jax import storage
from qsft_jax.aot import costs
from qsft_jax.aot.topology import parse_topology, slice_of_devices, topology_devices, topology_mesh
from qsft_jax.chips import Chip
from qsft_jax.models import sharded
from qsft_jax.models.config import param_count
from qsft_jax.models.transformer import Transformer, init_cache

STEPS = ("bc", "qsft", "decode", "ilql", "ilql_train")
DEFAULT_STEPS = ("bc", "qsft", "decode")
# The ILQL baseline's step (docs/algorithm.md section 9) with its heads on the frozen phi ("ilql") or on
# a trained trunk ("ilql_train"), at Q-SFT's rows, microbatches and optimizer storage dtypes.
ILQL_TRUNK = {"ilql": "phi", "ilql_train": "train"}


@dataclasses.dataclass(frozen=True)
class Target:
  """The hardware and the measurement of an AOT job (all else is the trainer's config).

  topology: one slice, "GEN:AxB[xC]" (e.g. "v5p:4x4x8"); num_slices: slices joined over the DCN.
  steps: a subset of STEPS (default DEFAULT_STEPS). probes: compile the cost probes of looped programs.
  decode_batch / cache_len: rows and KV-cache slots of the decode step (0: qsft.batch_size /
  data.max_length). hlo_dir: folder that receives each step's compiled HLO text ("": none).
  """
  topology: str
  num_slices: int = 1
  steps: tuple[str, ...] = DEFAULT_STEPS
  probes: bool = True
  decode_batch: int = 0
  cache_len: int = 0
  hlo_dir: str = ""


def rules_of(config: ml_collections.ConfigDict) -> tuple:
  return tuple(tuple(r) for r in config.mesh.rules)


def decode_shape(config: ml_collections.ConfigDict, target: Target) -> tuple[int, int]:
  """(rows, cache slots) of the decode step."""
  return target.decode_batch or config.qsft.batch_size, target.cache_len or config.data.max_length


def abstract_batch(rows: int, length: int, mesh: Mesh, rules) -> dict:
  """ShapeDtypeStructs of a [rows, length] token-level MDP batch (every array of data.mdp)."""
  from qsft_jax.data.mdp import ARRAY_SPECS
  rows_sharding = sharding.batch_sharding(mesh, rules)
  return {k: jax.ShapeDtypeStruct((rows, length), np.dtype(dtype), sharding=rows_sharding)
          for k, (dtype, _) in ARRAY_SPECS.items()}


def ilql_config(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
  """The config of an ILQL step kind: ilql.trunk by ILQL_TRUNK, and qsft's batch size, microbatches and
  moment dtypes, so that the step compares with Q-SFT's on the same rows."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.ilql.trunk = ILQL_TRUNK[kind]
    for field in ("batch_size", "microbatches", "mu_dtype", "nu_dtype"):
      c.ilql[field] = c.qsft[field]
  return c


def lower_train(config: ml_collections.ConfigDict, phase: str, mesh: Mesh):
  """The trainer's step of `phase` ("bc", "qsft", or "ilql" / "ilql_train": `ilql_config`), lowered on
  its abstract state and batch."""
  if phase in ILQL_TRUNK:
    config, phase = ilql_config(config, phase), "ilql"
  mc, rules = run_lib.model_config_from(config), rules_of(config)
  program = phases.build(config, phase, mc, mesh, rules)
  state = program.abstract_state(sharded.param_shapes(program.model, mc))
  rows = phases.optim_config(config, phase).batch_size
  return program.step.lower(state, abstract_batch(rows, config.data.max_length, mesh, rules))


def lower_decode(config: ml_collections.ConfigDict, mesh: Mesh, rows: int, slots: int):
  """One extraction decode token for every row, lowered: (phi, theta, phi_cache, theta_cache,
  tokens [rows], positions [rows]) -> (next tokens [rows], phi_cache, theta_cache), caches of
  `slots` slots donated. The scores are the sampler's "extract" mode with beta = 1, then greedy."""
  mc, rules = run_lib.model_config_from(config), rules_of(config)
  model = Transformer(mc)  # no decode-attention plug-in: the model's einsums, as TPU programs run
  params = sharding.abstract_with_shardings(sharded.param_shapes(model, mc),
                                            sharded.param_shardings(model, mc, mesh, rules))
  cache_shardings = sharded.cache_shardings(mc, rows, slots, mesh, rules)
  cache = sharding.abstract_with_shardings(jax.eval_shape(lambda: init_cache(mc, rows, slots)),
                                           cache_shardings)
  rows_sharding = NamedSharding(mesh, sharding.logical_to_mesh_spec(("batch",), None, dict(mesh.shape),
                                                                    rules))
  tokens = jax.ShapeDtypeStruct((rows,), np.int32, sharding=rows_sharding)

  def step(phi, theta, phi_cache, theta_cache, tokens, positions):
    (z_phi, z_theta), (phi_cache, theta_cache) = sampler.decode_step(
        model, (phi, theta), (phi_cache, theta_cache), tokens, positions)
    scores = sampler.token_scores("extract", z_phi, z_theta, mc.vocab_size, jnp.float32(1), jnp.float32(0))
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), phi_cache, theta_cache

  jitted = jax.jit(step, out_shardings=(rows_sharding, cache_shardings, cache_shardings),
                   donate_argnums=(2, 3))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jitted.lower(params, params, cache, cache, tokens, tokens)


def lower(kind: str, config: ml_collections.ConfigDict, target: Target, mesh: Mesh):
  """The lowered program of one step kind (`STEPS`)."""
  if kind == "decode":
    return lower_decode(config, mesh, *decode_shape(config, target))
  if kind in ("bc", "qsft") or kind in ILQL_TRUNK:
    return lower_train(config, kind, mesh)
  raise ValueError(f"unknown step {kind!r}: expected one of {STEPS}")


def probe_config(config: ml_collections.ConfigDict, layers: int) -> ml_collections.ConfigDict:
  """The config of a loop-free cost probe: `layers` unrolled layers, one microbatch, one loss chunk."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.overrides = {**dict(c.model.overrides), "num_layers": layers, "scan_layers": False}
    c.bc.microbatches = c.qsft.microbatches = c.ilql.microbatches = 1
    c.loss.chunk_size = max(c.loss.chunk_size, c.data.max_length)
  return c


def step_shape(kind: str, config: ml_collections.ConfigDict, target: Target) -> tuple[int, int]:
  """(rows, length) of a step: the batch rows and row length, or the decode rows and cache slots."""
  if kind == "decode":
    return decode_shape(config, target)
  if kind in ILQL_TRUNK:
    return ilql_config(config, kind).ilql.batch_size, config.data.max_length
  return phases.optim_config(config, kind).batch_size, config.data.max_length


def _oom_figures(kind: str, chip: Chip, error: Exception, compile_s: float) -> dict:
  """Figures of a step the compiler refused for want of HBM: what it would have used, no costs."""
  msg = str(error)
  oom = costs.parse_oom(msg)
  lines = [l.strip() for l in msg.splitlines() if l.strip()]
  head = next((l for l in lines if "RESOURCE_EXHAUSTED" in l or "Ran out of memory" in l),
              lines[0] if lines else "")
  used = oom.get("used_bytes", 0)
  return {"step": kind, "fits": False, "error": head[:400], "oom_message": msg[:4000],
          "peak_bytes": used, "hbm_bytes": chip.hbm_bytes, "hbm_limit_bytes": oom.get("limit_bytes", 0),
          "over_bytes": used - oom["limit_bytes"] if oom else 0,
          "temporaries_only": bool(oom.get("temporaries_only")),
          "compile_s": round(compile_s, 1), "compile_s_with_probes": round(compile_s, 1)}


def compile_step(kind: str, config: ml_collections.ConfigDict, target: Target, mesh: Mesh,
                 chip: Chip) -> dict:
  """Compiles one step for the mesh's TPU devices and returns its figures (see the module doc).

  A step over HBM comes back with fits=False, the bytes the compiler asked for (peak_bytes) and its
  message, instead of raising.
  """
  mc = run_lib.model_config_from(config)
  slice_of = slice_of_devices(mesh)
  t0 = time.time()
  try:
    with progress.timed(f"aot: {kind}: lower and compile"):
      compiled = lower(kind, config, target, mesh).compile()
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is handled
    if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
      raise
    return {**_oom_figures(kind, chip, e, time.time() - t0), "probes": target.probes}
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  if target.hlo_dir:
    storage.path(target.hlo_dir).mkdir(parents=True, exist_ok=True)
    storage.path(os.path.join(target.hlo_dir, f"{kind}.hlo.txt")).write_text(hlo)
  colls = costs.collective_costs(hlo, slice_of)
  looped = costs.has_loops(hlo)
  if looped and target.probes:
    probes, probe_loops = [], False
    for layers in (1, 2):
      with progress.timed(f"aot: {kind}: cost probe {layers}/2 ({layers} unrolled layer"
                          f"{'s' if layers > 1 else ''})"):
        probe = lower(kind, probe_config(config, layers), target, mesh).compile()
      probe_loops |= costs.has_loops(probe.as_text())
      probes.append(costs.program_costs(probe, slice_of))
    cost = costs.extrapolate(probes[0], probes[1], mc.num_layers)
    cost["source"] = "probes (1 and 2 unrolled layers, extrapolated)"
    if probe_loops:  # loops XLA made itself (e.g. windowed einsums): their bodies are counted once
      cost["source"] += "; the probes hold compiler-made while loops, so FLOPs and HBM bytes are lower bounds"
  elif looped:
    cost = costs.xla_cost(compiled)
    cost["source"] = ("compiled program without probes (--no-probes): FLOPs and HBM bytes count loop "
                      "bodies once (lower bounds); roofline compute from max(compiled, analytic) FLOPs")
  else:
    cost = costs.xla_cost(compiled)
    cost["source"] = "compiled program"
  cost.update({k: colls[k] for k in ("ici_bytes", "dcn_bytes", "collectives")})
  cost["collectives_source"] = "compiled program, loop trip counts applied" + (
      "" if colls["trips_known"]
      else "; some trip counts unreadable (those loops counted once: lower bounds)")
  compile_s_total = time.time() - t0
  chips = mesh.devices.size
  rows, length = step_shape(kind, config, target)
  lora = "lora" in config.model and config.model.lora.rank > 0
  analytic = costs.analytic_flops(kind, mc, rows, length, lora=lora) / chips
  peak_bytes = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes)
  compute_flops = max(cost["flops"], analytic) if looped and not target.probes else cost["flops"]
  times = costs.roofline(chip, compute_flops, cost["bytes"], cost["ici_bytes"], cost["dcn_bytes"])
  return {
      "step": kind, "rows": rows, "length": length,
      "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
      "generated_code_bytes": int(mem.generated_code_size_in_bytes),
      "peak_bytes": int(peak_bytes), "hbm_bytes": chip.hbm_bytes, "fits": peak_bytes <= chip.hbm_bytes,
      "flops_per_chip": cost["flops"], "analytic_flops_per_chip": analytic,
      "flops_ratio": cost["flops"] / analytic, "hbm_bytes_per_chip": cost["bytes"],
      "ici_bytes_per_chip": cost["ici_bytes"], "dcn_bytes_per_chip": cost["dcn_bytes"],
      "collectives": cost["collectives"], "cost_source": cost["source"],
      "collectives_source": cost["collectives_source"], "probes": target.probes,
      **times,
      "mfu": analytic / (chip.bf16_flops * times["step_s"]) if times["step_s"] else 0.0,
      "compile_s": round(compile_s, 1), "compile_s_with_probes": round(compile_s_total, 1),
  }


def slice_mesh(config: ml_collections.ConfigDict, target: Target) -> Mesh:
  """The config's mesh on the target's compile-only devices, after the trainer's config checks."""
  devices = topology_devices(target.topology, target.num_slices)
  return topology_mesh(config_lib.check_config(config, len(devices)), devices, target.num_slices)


def run(config: ml_collections.ConfigDict, target: Target) -> dict[str, Any]:
  """Compiles every step of `target.steps`: {job description..., "steps": {kind: figures}}."""
  unknown = set(target.steps) - set(STEPS)
  if unknown:
    raise ValueError(f"steps {sorted(unknown)}: expected a subset of {STEPS}")
  chip, _ = parse_topology(target.topology)
  mesh = slice_mesh(config, target)
  mc = run_lib.model_config_from(config)
  out = {"model": config.model.preset, "params": param_count(mc), "topology": target.topology,
         "num_slices": target.num_slices, "chips": int(mesh.devices.size), "mesh": dict(mesh.shape),
         "batch": config.qsft.batch_size, "seq": config.data.max_length,
         "microbatches": config.qsft.microbatches, "remat": mc.remat_policy, "scan": mc.scan_layers,
         "dtype": mc.dtype, "param_dtype": mc.param_dtype,
         "target_dtype": config.qsft.target_dtype or mc.param_dtype,
         "behaviour_dtype": config.qsft.behaviour_dtype or mc.param_dtype,
         "mu_dtype": config.qsft.mu_dtype or mc.param_dtype,
         "nu_dtype": config.qsft.nu_dtype or mc.param_dtype, "steps": {}}
  lora = config.model.lora if "lora" in config.model else None
  if lora is not None and lora.rank > 0:  # LoRA: adapters of this rank over one frozen base
    out["lora"] = {"rank": lora.rank, "base_dtype": lora.base_dtype or mc.param_dtype,
                   "quantization": lora.quantization}
  for i, kind in enumerate(target.steps, 1):
    with progress.timed(f"aot: step {i}/{len(target.steps)}: {kind}", heartbeat=False):
      out["steps"][kind] = compile_step(kind, config, target, mesh, chip)
  return out
