"""Peak figures of TPU chips, for roofline estimates and model FLOPs utilisation (MFU).

One `Chip` per TPU generation, keyed by the generation name used in topology strings ("v5p:4x4x8").
All figures are per chip (a v4 or v5p chip has two TensorCores that JAX drives as one "megacore"
device, so one device = one chip for every generation here).

Sources (Google Cloud TPU system-architecture pages, read 2026):
  v4   https://cloud.google.com/tpu/docs/v4   : 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GB/s, 3D torus.
       ICI: the page gives no per-chip figure; 6 links x 2 directions x 45 GB/s = 540 GB/s from the
       per-link one-way bandwidth in "How to Scale Your Model" (jax-ml.github.io/scaling-book, TPU
       chapter). DCN per chip: not published; left unknown.
  v5e  https://cloud.google.com/tpu/docs/v5e  : 197 TFLOP/s bf16, 16 GB HBM, bidirectional ICI
       400 GB/s per chip (1600 Gbps), 2D torus; 2 x 100 Gbps NIC per 8-chip host -> 25 Gbps =
       3.125 GB/s DCN per chip. HBM bandwidth 819 GB/s as in the v5e column of the v6e page (the v5e
       page itself writes "800 GiBps").
  v5p  https://cloud.google.com/tpu/docs/v5p  : 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s,
       bidirectional ICI 1200 GB/s per chip (4800 Gbps), 3D torus; DCN 50 Gbps = 6.25 GB/s per chip.
  v6e  https://cloud.google.com/tpu/docs/v6e  : 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s,
       bidirectional ICI 800 GB/s per chip (the comparison table says 3584 Gbps = 448 GB/s one way),
       2D torus; 4 x 200 Gbps NIC per 8-chip host -> 100 Gbps = 12.5 GB/s DCN per chip.

HBM capacities: the pages write "GiB" for v4/v5p and "GB" for v5e/v6e; the v5e and v6e chips hold
16 GiB and 32 GiB, which is what XLA allocates against, so all capacities below are GiB.

`ici_bytes_per_s` is the chip's total bidirectional ICI bandwidth: a collective that keeps every link
of the chip busy in both directions. Roofline collective times computed with it are lower bounds
(a ring over one mesh axis uses 2 of the 4-6 links).
"""
from __future__ import annotations

import dataclasses

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip peaks. FLOP/s are dense bf16 matmul peaks; bandwidths in bytes per second."""
  name: str
  device_kind: str  # jax.Device.device_kind of this chip ("TPU v5 lite", ...)
  bf16_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float
  ici_bytes_per_s: float
  dcn_bytes_per_s: float | None  # data-centre network (between slices) per chip; None = unknown
  megacore: bool  # two TensorCores per chip driven as one device (chip_config_name="megacore")


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 540e9, None, True),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 400e9, 3.125e9, False),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 1200e9, 6.25e9, True),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1640e9, 800e9, 12.5e9, False),
}


def get_chip(name: str) -> Chip:
  """Chip by generation name ("v4", "v5e", "v5p", "v6e"); ValueError naming the known ones."""
  if name not in CHIPS:
    raise ValueError(f"unknown TPU generation {name!r}; known: {', '.join(CHIPS)}")
  return CHIPS[name]


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The chip whose `device_kind` matches a jax.Device.device_kind, or None (CPU, GPU, unknown TPU)."""
  for chip in CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  return None


def peak_flops_for_device(device) -> float | None:
  """Peak dense bf16 FLOP/s of a jax.Device (one chip), or None where unknown (CPU, GPU)."""
  chip = chip_for_device_kind(getattr(device, "device_kind", ""))
  return None if chip is None else chip.bf16_flops
