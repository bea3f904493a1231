"""AOT compilation for a TPU slice on the CPU (qsft_jax.aot): memory, FLOPs and collectives of the
trainer's compiled steps, and the HLO reading against hand-written HLO.

Needs the libtpu package at the version jax[tpu] pins (requirements-test.txt); skipped with the reason when it is missing.
A 2-layer tiny-llama widened to TPU tile sizes (see MODEL) on v5e:2x2 (4 chips, mesh data 1 x fsdp 4),
batch 32 x 128: each step compiles in a few seconds.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (requirements-test.txt)")

from qsft_jax import config_lib, phases, sharding  # noqa: E402
from qsft_jax import run as run_lib  # noqa: E402
from qsft_jax.aot import costs, driver  # noqa: E402
from qsft_jax.aot import __main__ as aot_main  # noqa: E402
from qsft_jax.aot.topology import parse_topology, topology_devices, topology_mesh  # noqa: E402
from qsft_jax.chips import get_chip  # noqa: E402
from qsft_jax.models import sharded  # noqa: E402
from qsft_jax.models.config import get_preset, param_count  # noqa: E402

# TPU arrays are stored in (8, 128) tiles of their two minor dimensions, so a shard like tiny-llama's
# q kernel [128 / 4, 4 heads, 32] occupies 8x its bytes in HBM. This test model has every minor
# dimension of every per-chip shard a multiple of the tile (d_model 512 / fsdp 4 = 128, 8 heads of
# 128, rows 32 / 4 = 8 per chip, length 128), so the compiler's argument bytes equal the plain count.
MODEL = dict(d_model=512, num_heads=8, num_kv_heads=8, head_dim=128, mlp_dim=1024)
TARGET = driver.Target(topology="v5e:2x2")


def job(rows=32, length=128, mesh_data=1, **fields):
  """The trainer's config of the test job: MODEL, FSDP over the slice, `rows` x `length` batches."""
  c = config_lib.base_config()
  c.model.overrides = MODEL
  c.mesh.shape = {"data": mesh_data, "fsdp": -1, "tensor": 1}
  c.bc.batch_size = c.qsft.batch_size = rows
  c.data.max_length = length
  c.loss.chunk_size = 128
  for key, value in fields.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


CONFIG = job()


def shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard per leaf)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def mesh():
  return driver.slice_mesh(CONFIG, TARGET)


@pytest.fixture(scope="module")
def chip():
  return parse_topology(TARGET.topology)[0]


@pytest.fixture(scope="module")
def results(mesh, chip):
  return {kind: driver.compile_step(kind, CONFIG, TARGET, mesh, chip) for kind in ("bc", "qsft")}


@pytest.mark.parametrize("topology,num_slices,chips,kind", [
    ("v5e:2x2", 1, 4, "TPU v5 lite"), ("v5p:4x4x8", 1, 128, "TPU v5"), ("v4:2x2x1", 1, 4, "TPU v4"),
    ("v6e:4x4", 1, 16, "TPU v6 lite"), ("v5e:2x2", 2, 8, "TPU v5 lite")])
def test_topologies_one_device_per_chip(topology, num_slices, chips, kind):
  devices = topology_devices(topology, num_slices)
  assert len(devices) == chips
  assert {d.device_kind for d in devices} == {kind}
  assert {d.platform for d in devices} == {"tpu"}
  if num_slices > 1:
    assert sorted({d.slice_index for d in devices}) == list(range(num_slices))
  assert jax.default_backend() == "cpu"  # describing a slice does not change the default backend


def test_multislice_mesh_puts_slices_on_data_axis():
  devices = topology_devices("v5e:2x2", num_slices=2)
  mesh = topology_mesh({"data": 2, "fsdp": -1, "tensor": 1}, devices, num_slices=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  slices = np.vectorize(lambda d: d.slice_index, otypes=[int])(mesh.devices)
  assert (slices == np.arange(2)[:, None, None]).all()  # each data row is one slice
  with pytest.raises(ValueError, match="multiple of 2"):
    topology_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices, num_slices=2)


def test_bad_topology_names_are_rejected():
  with pytest.raises(ValueError, match="expected GEN:AxB"):
    parse_topology("v5litepod-16")
  with pytest.raises(ValueError, match="unknown TPU generation"):
    get_chip("v3")


def _expected_argument_bytes(kind, mesh):
  """State + batch bytes per chip from the shapes and NamedShardings alone (no compiler)."""
  mc, rules = run_lib.model_config_from(CONFIG), driver.rules_of(CONFIG)
  program = phases.build(CONFIG, kind, mc, mesh, rules)
  state = program.abstract_state(sharded.param_shapes(program.model, mc))
  return shard_bytes(state), shard_bytes(driver.abstract_batch(32, 128, mesh, rules))


@pytest.mark.parametrize("kind", ["bc", "qsft"])
def test_argument_bytes_are_state_plus_batch_per_chip(results, mesh, kind):
  state_bytes, batch_bytes = _expected_argument_bytes(kind, mesh)
  # Independent count of the state: parameter sets x (params + 2 Adam moments) of f32, sharded by
  # fsdp=4 over `embed` where it divides (every kernel and table of tiny-llama does; norms too).
  params = param_count(get_preset("tiny-llama", **MODEL))
  copies = 3 if kind == "bc" else 5  # params + 2 Adam moments (+ theta_bar and phi)
  scalars = 3 * 4  # step, Adam's count and the learning-rate schedule's count, int32, replicated
  assert state_bytes == copies * params * 4 // 4 + scalars
  # batch: 6 int32 + 4 float32 + 2 bool arrays of [32, 128], rows split over the 4 chips
  assert batch_bytes == (32 // 4) * 128 * (10 * 4 + 2 * 1)
  r = results[kind]
  assert r["argument_bytes"] == pytest.approx(state_bytes + batch_bytes, rel=0.02)
  # the donated state comes back in place: aliased bytes ~ the state's
  assert r["alias_bytes"] == pytest.approx(state_bytes, rel=0.02)
  assert r["fits"] and r["peak_bytes"] < r["hbm_bytes"]


@pytest.mark.parametrize("kind", ["bc", "qsft"])
def test_compiled_flops_match_analytic(results, kind):
  r = results[kind]
  assert r["cost_source"] == "compiled program"  # loop-free: chunk_size (128) >= seq (128), no scan
  assert 0.9 <= r["flops_ratio"] <= 1.1, r
  # Forward FLOPs per token by hand: 2 x the matmul weights (per layer q 512x1024, k and v 512x1024
  # each, o 1024x512, gate / up / down 512x1024 each; the unembedding 512 x 128 padded columns) plus
  # q.k and p.v over the 128 positions (2 x 2 x 128 x 1024 per layer), 2 layers.
  forward = 2 * (2 * 7 * 512 * 1024 + 512 * 128) + 2 * 2 * 2 * 128 * 1024
  assert r["analytic_flops_per_chip"] == (3 if kind == "bc" else 5) * forward * 32 * 128 / 4



@pytest.mark.parametrize("kind, passes", [("bc", 2), ("qsft", 4)])
def test_lora_analytic_flops_leave_out_the_base_weight_gradients(kind, passes):
  # LoRA: forward (and theta_bar's and phi's forwards) plus the backward to activations; no [in, out]
  # weight gradient of the frozen base. Forward per token by hand as in the test above.
  mc = get_preset("tiny-llama", **MODEL)
  forward = 2 * (2 * 7 * 512 * 1024 + 512 * 128) + 2 * 2 * 2 * 128 * 1024
  assert costs.analytic_flops(kind, mc, 32, 128, lora=True) == passes * forward * 32 * 128

def test_ilql_step_holds_phi_and_the_heads_state(mesh, chip):
  # The ILQL step with its heads on the frozen phi, at Q-SFT's batch: its arguments are phi, the heads
  # with their two Adam moments and the target Q heads, and the batch; FLOPs one forward of phi plus
  # the two Q heads' [D, V] logits forward and backward.
  r = driver.compile_step("ilql", CONFIG, TARGET, mesh, chip)
  params = param_count(get_preset("tiny-llama", **MODEL))
  d, v = 512, 128  # d_model and tiny-llama's padded vocabulary
  # q_kernel [2, D, V] and v_kernel [D] split over fsdp=4 along `embed`; q_bias [2, V] (`vocab` ->
  # tensor, size 1) and v_bias whole on every chip
  q_part = 2 * d * v * 4 // 4 + 2 * v * 4
  heads = q_part + d * 4 // 4 + 4
  state = params * 4 // 4 + 3 * heads + q_part + 3 * 4
  batch = (32 // 4) * 128 * (10 * 4 + 2 * 1)
  assert r["argument_bytes"] == pytest.approx(state + batch, rel=0.02)
  forward = 2 * (2 * 7 * 512 * 1024 + 512 * 128) + 2 * 2 * 2 * 128 * 1024
  assert r["analytic_flops_per_chip"] == (forward + 12 * d * v) * 32 * 128 / 4
  assert 0.9 <= r["flops_ratio"] <= 1.1, r


def test_qsft_over_bc_flops_is_five_thirds(results):
  ratio = results["qsft"]["flops_per_chip"] / results["bc"]["flops_per_chip"]
  assert ratio == pytest.approx(5 / 3, rel=0.05)


def test_probe_extrapolation_equals_direct_count(mesh, chip):
  """With scanned layers (a while loop) costs come from 1- and 2-layer probes; at 3 layers the
  extrapolation must equal the costs of the same step compiled unrolled (loop-free). The decode step
  is used because it compiles fastest; the train steps take the same code path."""
  def config(scan):  # plain tiny-llama dimensions: only costs are compared here, and they compile fastest
    c = job(rows=8, length=64)
    c.model.overrides = {"num_layers": 3, "scan_layers": scan}
    return c
  a = driver.compile_step("decode", config(True), TARGET, mesh, chip)
  b = driver.compile_step("decode", config(False), TARGET, mesh, chip)
  assert a["cost_source"].startswith("probes") and b["cost_source"] == "compiled program"
  assert a["flops_per_chip"] == pytest.approx(b["flops_per_chip"], rel=0.01)
  assert a["hbm_bytes_per_chip"] == pytest.approx(b["hbm_bytes_per_chip"], rel=0.05)
  # collectives come from the real program, the scanned one's weighted by the loop's trip count
  assert a["collectives_source"].startswith("compiled program, loop trip counts applied")
  assert a["ici_bytes_per_chip"] == pytest.approx(b["ici_bytes_per_chip"], rel=0.05)


def test_decode_step_compiles_with_caches(mesh, chip):
  r = driver.compile_step("decode", CONFIG, TARGET, mesh, chip)
  assert 0.9 <= r["flops_ratio"] <= 1.15, r
  assert (r["rows"], r["length"]) == (32, 128)  # qsft.batch_size rows, data.max_length cache slots
  config = get_preset("tiny-llama", **MODEL)
  # k and v of theta and phi, f32, rows over the 4 chips: donated and updated in place
  cache_bytes = 2 * 2 * config.num_layers * 32 * 128 * config.num_kv_heads * config.head_dim * 4
  assert r["alias_bytes"] >= cache_bytes / 4


def test_parse_collectives_sizes_and_groups():
  hlo = "\n".join([
      "  %ag = (bf16[512,1024]{1,0}, bf16[2048,1024]{1,0}) all-gather-start(%p), channel_id=1, "
      "replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true",
      "  %ag.done = bf16[2048,1024]{1,0} all-gather-done(%ag)",
      "  %ar = f32[1024]{0} all-reduce(%x), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, "
      "to_apply=%add",
      "  %rs = f32[256]{0} reduce-scatter(%y), channel_id=3, replica_groups=[2,4]<=[4,2]T(1,0), "
      "dimensions={0}",
      "  %ag2 = bf16[128,256]{1,0:T(8,128)(2,1)} all-gather(%q), channel_id=4, "
      "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}, use_global_device_ids=true",
  ])
  colls = costs.parse_collectives(hlo, slice_of_device=[0, 0, 0, 0, 1, 1, 1, 1])
  assert [c.op for c in colls] == ["all-gather", "all-reduce", "reduce-scatter", "all-gather"]
  ag, ar, rs, ag2 = colls
  # mesh-axes form: groups along axis_0 of a [2, 4] iota mesh = {0,4}, {1,5}, ...: across slices
  assert ag2.group_size == 2 and ag2.dcn and ag2.moved_bytes == pytest.approx(128 * 256 * 2 / 2)
  assert ag.result_bytes == 2048 * 1024 * 2 and ag.group_size == 4 and not ag.dcn
  assert ag.moved_bytes == pytest.approx(ag.result_bytes * 3 / 4)
  assert ar.group_size == 2 and ar.dcn and ar.moved_bytes == pytest.approx(2 * 4096 * 1 / 2)
  # iota [4,2]T(1,0) -> groups {0,2,4,6}, {1,3,5,7}: span both slices
  assert rs.group_size == 4 and rs.dcn and rs.moved_bytes == 1024 * 3


TPU_HLO = """\
%fused_computation.1 (param_0: bf16[128,1024]) -> (bf16[128,1024], bf16[512,1024], u32[]) {
  %param_0 = bf16[128,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.1 = bf16[512,1024]{1,0:T(8,128)(2,1)} all-gather(%param_0), channel_id=8, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true, frontend_attributes={chain_id="0"}
  ROOT %custom-call.1 = (bf16[128,1024]{1,0:T(8,128)(2,1)S(1)}, bf16[512,1024]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.2 (param_0.1: bf16[128,1024]) -> (f32[8,8], bf16[512,1024]) {
  %param_0.1 = bf16[128,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.2 = bf16[512,1024]{1,0:T(8,128)(2,1)S(1)} all-gather(%param_0.1), channel_id=8, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true, frontend_attributes={chain_id="0"}
  ROOT %tuple.2 = (f32[8,8]{1,0}, bf16[512,1024]{1,0}) tuple(%c, %all-gather.2)
}

%fused_computation.3 (param_0.2: bf16[128,1024]) -> bf16[512,1024] {
  %param_0.2 = bf16[128,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.3 = bf16[512,1024]{1,0:T(8,128)(2,1)} all-gather(%param_0.2), channel_id=8, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true, frontend_attributes={chain_id="0"}
  ROOT %custom-call.3 = bf16[512,1024]{1,0:T(8,128)(2,1)S(1)} custom-call(%param_0.2, %all-gather.3), custom_call_target="AsyncCollectiveDone"
}

%all-reduce-scatter.4 (input_0: f32[512,1024], input_1: f32[1024,512]) -> (f32[128,1024], f32[1024,128]) {
  %input_0 = f32[512,1024]{1,0:T(8,128)} parameter(0)
  %input_1 = f32[1024,512]{1,0:T(8,128)} parameter(1)
  %all-reduce.4 = (f32[512,1024]{1,0:T(8,128)}, f32[1024,512]{1,0:T(8,128)}) all-reduce(%input_0, %input_1), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  ROOT %tuple.4 = (f32[128,1024]{1,0}, f32[1024,128]{1,0}) tuple(%ds.1, %ds.2)
}

%body.5 (p: (s32[], bf16[128,1024])) -> (s32[], bf16[128,1024]) {
  %p = (s32[], bf16[128,1024]) parameter(0)
  %fusion.1 = (bf16[128,1024], bf16[512,1024], u32[]) fusion(%x), kind=kCustom, calls=%fused_computation.1
  %fusion.2 = (f32[8,8], bf16[512,1024]) fusion(%fusion.1), kind=kCustom, calls=%async_collective_fusion.2
  %fusion.3 = bf16[512,1024] fusion(%fusion.2), kind=kCustom, calls=%fused_computation.3
  ROOT %t = (s32[], bf16[128,1024]) tuple(%i, %x)
}

%cond.6 (p.1: (s32[], bf16[128,1024])) -> pred[] {
  %p.1 = (s32[], bf16[128,1024]) parameter(0)
  %constant.6 = s32[]{:T(128)} constant(24)
  %gte.6 = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  ROOT %lt.6 = pred[]{:T(512)} compare(%gte.6, %constant.6), direction=LT
}

ENTRY %main.7 (param.1: bf16[128,1024]) -> bf16[128,1024] {
  %param.1 = bf16[128,1024]{1,0} parameter(0)
  %while.7 = (s32[], bf16[128,1024]) while(%tuple.7), condition=%cond.6, body=%body.5
  %fusion.8 = (f32[128,1024], f32[1024,128]) fusion(%a, %b), kind=kOutput, calls=%all-reduce-scatter.4
  %all-reduce.9 = f32[]{:T(128)} all-reduce(%s), channel_id=25, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0','axis_1'}, use_global_device_ids=true, to_apply=%add
  ROOT %r = bf16[128,1024]{1,0} get-tuple-element(%while.7), index=1
}
"""


def test_parse_collectives_tpu_fusions_and_loops():
  """libtpu's form: an async all-gather as start / continuation / done fusions (one collective), a
  reduce-scatter as an all-reduce-scatter fusion, a collective in a while body of 24 trips."""
  colls = sorted(costs.parse_collectives(TPU_HLO), key=lambda c: c.op)
  assert [c.op for c in colls] == ["all-gather", "all-reduce", "reduce-scatter"]
  ag, ar, rs = colls
  assert ag.trips == 24 and ag.trips_known and ag.group_size == 4
  assert ag.moved_bytes == pytest.approx(512 * 1024 * 2 * 3 / 4)
  # two f32 gradients of 512 x 1024, scattered over 4: each device sends 3/4 of the full inputs
  assert rs.group_size == 4 and rs.trips == 1
  assert rs.result_bytes == pytest.approx(2 * 512 * 1024 * 4 / 4)
  assert rs.moved_bytes == pytest.approx(2 * 512 * 1024 * 4 * 3 / 4)
  assert ar.group_size == 4 and ar.moved_bytes == pytest.approx(2 * 4 * 3 / 4)
  total = costs.collective_costs(TPU_HLO)
  assert total["collectives"]["all-gather"]["count"] == 24
  assert total["ici_bytes"] == pytest.approx(24 * ag.moved_bytes + rs.moved_bytes + ar.moved_bytes)
  # a multi-slice program's cross-slice all-reduce: a megascale host-transfer send (and its recv)
  dcn = TPU_HLO.replace("  ROOT %r = ", "  %send = (f32[128,1024]{1,0}, u32[], token[]) send(%g, %aa), channel_id=4, "
                        "is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="
                        "\"xla_megascale_runtime\",_xla_megascale_transfer_type=\"ALL_REDUCE\"}\n"
                        "  %recv = (f32[128,1024]{1,0}, u32[], token[]) recv(%aa), channel_id=3, "
                        "is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type=\"ALL_REDUCE\"}\n"
                        "  ROOT %r = ")
  c = costs.collective_costs(dcn, slice_of_device=[0, 0, 0, 0, 1, 1, 1, 1])
  assert c["dcn_bytes"] == pytest.approx(2 * 128 * 1024 * 4 * 1 / 2)
  assert c["collectives"]["all-reduce"]["dcn_count"] == 1
  # an unreadable loop condition: counted once and flagged
  broken = TPU_HLO.replace("direction=LT", "direction=NE")
  assert not costs.collective_costs(broken)["trips_known"]


def test_parse_oom_message():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
         "Used 20.61G of 15.75G hbm. Exceeded hbm capacity by 4.86G.")
  oom = costs.parse_oom(msg)
  assert oom["used_bytes"] == int(20.61 * 2**30) and oom["limit_bytes"] == int(15.75 * 2**30)
  assert costs.parse_oom("no such message") == {}
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
         "(25.17G) exceeds available HBM (15.75G).")
  assert costs.parse_oom(msg) == {"used_bytes": int(25.17 * 2**30), "limit_bytes": int(15.75 * 2**30),
                                  "temporaries_only": True}


@pytest.mark.parametrize("kind", ["bc", "qsft"])
def test_compiled_collectives_match_fsdp_hand_count(results, kind):
  """FSDP over 4 chips on a loop-free program: every float32 gradient is reduce-scattered once
  (3/4 of it sent per chip) and the bf16 weights are all-gathered for each forward pass: theta for
  the forward and again for the remat-free backward's reuse (BC: 1 to 2 gathers), plus theta_bar and
  phi for Q-SFT (two more)."""
  params = param_count(get_preset("tiny-llama", **MODEL))
  colls = results[kind]["collectives"]
  assert results[kind]["ici_bytes_per_chip"] > 0 and results[kind]["dcn_bytes_per_chip"] == 0
  assert colls["reduce-scatter"]["moved_bytes"] == pytest.approx(params * 4 * 3 / 4, rel=0.02)
  gather = params * 2 * 3 / 4  # one bf16 all-gather of every parameter
  bc_gathers = results["bc"]["collectives"]["all-gather"]["moved_bytes"] / gather
  assert 1.0 <= bc_gathers <= 2.05
  if kind == "qsft":  # theta_bar's and phi's forwards gather two more parameter sets
    extra = colls["all-gather"]["moved_bytes"] - results["bc"]["collectives"]["all-gather"]["moved_bytes"]
    assert extra == pytest.approx(2 * gather, rel=0.05)
  assert results[kind]["ici_bytes_per_chip"] == pytest.approx(
      sum(c["moved_bytes"] for c in colls.values()))


def test_frozen_sets_in_bf16_halve_their_bytes(results, mesh, chip):
  """qsft.target_dtype = behaviour_dtype = bfloat16: theta_bar and phi stored in bf16 (theta and AdamW
  moments stay f32); the trainer's compiled Q-SFT step takes them as they are and returns them in place
  (aliased)."""
  r = driver.compile_step("qsft", job(qsft__target_dtype="bfloat16", qsft__behaviour_dtype="bfloat16"),
                          TARGET, mesh, chip)
  params = param_count(get_preset("tiny-llama", **MODEL))
  saved = 2 * params * (4 - 2) // 4  # two sets, 2 bytes less per parameter, over 4 chips
  full = results["qsft"]
  assert full["argument_bytes"] - r["argument_bytes"] == pytest.approx(saved, rel=0.02)
  assert full["alias_bytes"] - r["alias_bytes"] == pytest.approx(saved, rel=0.02)
  assert r["fits"] and r["peak_bytes"] < full["peak_bytes"]


def test_chunk_loops_do_not_gather_the_unembedding(mesh):
  """The compiled Q-SFT step (bf16 compute, fsdp 4: the unembedding [D, V_pad] split over D) gathers
  the unembedding of theta, theta_bar and phi once, before the loss's chunk loops (4 chunks here), not
  in every trip: no all-gather of a [D, V_pad] (or [V_pad, D]) array in a loop body."""
  config = job(rows=8, length=256, loss__chunk_size=64)
  config.model.overrides = {**MODEL, "dtype": "bfloat16", "vocab_size": 300,  # V_pad 384
                            "tie_embeddings": False}
  hlo = driver.lower("qsft", config, TARGET, mesh).compile().as_text()
  comps, entry = costs._computations(hlo)
  trips = costs._multiplicities(comps, entry)
  pattern = re.compile(r"=\s*\w+(\[\d+,\d+\])\S*\s+all-gather(-start)?\(")
  gathers = [(name, trips.get(name, (1.0, True))[0]) for name, lines in comps.items() for line in lines
             if (m := pattern.search(line)) and m.group(1) in ("[512,384]", "[384,512]")]
  assert gathers, "no all-gather of the unembedding: the test no longer sees it"
  assert all(n == 1 for _, n in gathers), f"the unembedding is all-gathered in loop bodies: {gathers}"


def test_multislice_gradient_reduction_counted_over_dcn(results):
  """Two v5e:2x2 slices, mesh data 2 (one per slice) x fsdp 4: inside a slice the gradients are
  reduce-scattered as on one slice; across slices each chip all-reduces its float32 gradient shard
  through the megascale runtime (host-transfer send / recv in the HLO): 2 x (2-1)/2 x shard = the
  shard's bytes over the DCN per chip."""
  config, target = job(rows=64, mesh_data=2), driver.Target(topology="v5e:2x2", num_slices=2)
  r = driver.compile_step("bc", config, target, driver.slice_mesh(config, target), get_chip("v5e"))
  params = param_count(get_preset("tiny-llama", **MODEL))
  assert r["dcn_bytes_per_chip"] == pytest.approx(params * 4 / 4, rel=0.02)
  assert r["collectives"]["all-reduce"]["dcn_count"] >= 1
  # the in-slice traffic is that of one slice with the same rows per chip
  assert r["ici_bytes_per_chip"] == pytest.approx(results["bc"]["ici_bytes_per_chip"], rel=0.02)
  assert r["dcn_s"] > 0


def test_roofline_takes_the_slowest_resource(chip):
  t = costs.roofline(chip, flops=chip.bf16_flops, hbm_bytes=0.5 * chip.hbm_bytes_per_s,
                   ici_bytes=0.0, dcn_bytes=0.0)
  assert t["step_s"] == pytest.approx(1.0) and t["bound"] == "compute"
  t = costs.roofline(chip, flops=0.0, hbm_bytes=0.0, ici_bytes=2 * chip.ici_bytes_per_s, dcn_bytes=0.0)
  assert t["step_s"] == pytest.approx(2.0) and t["bound"] == "ici"
  assert math.isfinite(t["step_s"])


def test_command_line_runs_the_config_with_overrides(tmp_path, capsys):
  """`python -m qsft_jax.aot --config=FILE --config.FIELD=VALUE ...`: the trainer's config file and
  overrides reach the job; the figures come back as JSON; a bad topology is a one-line usage error."""
  out, tiny = tmp_path / "aot.json", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
  assert aot_main.main(["aot", f"--config={tiny}", "--config.qsft.batch_size=16", "--topology=v5e:2x2",
                        "--config.qsft.target_dtype=bfloat16", "--config.qsft.nu_dtype=bfloat16",
                        "--steps=decode", "--no-probes", f"--json={out}"]) == 0
  result = json.loads(out.read_text())
  assert result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}  # tiny.py: data -1 over the 4 chips
  assert list(result["steps"]) == ["decode"] and result["steps"]["decode"]["rows"] == 16
  assert [result[f"{k}_dtype"] for k in ("param", "target", "behaviour", "mu", "nu")] == [
      "float32", "bfloat16", "float32", "float32", "bfloat16"]
  printed = capsys.readouterr().out
  assert "[decode] compiled" in printed
  assert "theta_bar bfloat16, phi float32, AdamW mu/nu float32/bfloat16" in printed
  with pytest.raises(SystemExit) as e:
    aot_main.main(["aot", f"--config={tiny}", "--topology=v5e-4"])
  assert e.value.code == 2 and "expected GEN:AxB" in capsys.readouterr().err
