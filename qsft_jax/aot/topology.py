"""TPU slices described on a machine without TPU chips: compile-only devices and their mesh.

With the `libtpu` package installed, `jax.experimental.topologies.get_topology_desc(NAME, "tpu", ...)`
describes the devices of a TPU slice (compile-only: nothing runs on them) while the CPU stays JAX's
default backend.

Platform notes (jax 0.10.2 with libtpu 0.0.42.1, jax 0.12.0.1 with libtpu 0.0.50.1):
- v4 and v5p need chip_config_name="megacore" for one device per chip ("default" gives one per
  TensorCore on v4); num_slices > 1 returns the devices of N slices with `slice_index` set.
- libtpu takes /tmp/libtpu_lockfile when it initialises, and any JAX process started without
  JAX_PLATFORMS=cpu initialises it at start-up (then falls back to the CPU), so a second process
  fails to describe a topology with "Internal error when accessing libtpu multi-process lockfile".
  On a machine without TPU chips (no /dev/accel*, /dev/vfio/N) this module therefore sets
  ALLOW_MULTIPLE_LIBTPU_LOAD=1, and also TPU_SKIP_MDS_QUERY=1, TPU_WORKER_HOSTNAMES=localhost and
  TPU_ACCELERATOR_TYPE, which silence libtpu's warnings about the missing TPU metadata server (only
  where unset; they do not change the described topology; never set on a TPU host).
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from qsft_jax import config_lib
from qsft_jax import platforms
from qsft_jax import sharding
from qsft_jax.chips import Chip, get_chip

TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


def _prepare_libtpu_env() -> None:
  """libtpu settings for describing a topology on a machine without TPU chips (see module doc)."""
  if platforms.has_tpu_chips():
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
    desc = topologies.get_topology_desc(f"{chip.name}:{'x'.join(map(str, dims))}", "tpu", **kwargs)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise RuntimeError("AOT compilation for TPU needs the libtpu package matching jax "
                         f"(pip install -r requirements-test.txt, or pip install 'jax[tpu]=={jax.__version__}')") from e
    raise
  devices = list(desc.devices)
  expected = math.prod(dims) * num_slices
  if len(devices) != expected:
    raise RuntimeError(f"topology {topology} x {num_slices} slices: libtpu returned {len(devices)} "
                       f"devices, expected {expected} (one per chip)")
  return devices


def topology_mesh(mesh_shape: Mapping[str, int], devices: Sequence, num_slices: int = 1) -> Mesh:
  """The config's mesh.shape (one -1 allowed) on compile-only TPU devices, all axes AxisType.Auto.

  One slice: the trainer's `sharding.make_mesh`. Several slices: the slices go on the outer part of
  the `data` axis (data = num_slices x data_per_slice), so only the data-parallel gradient reduction
  crosses the DCN; fsdp and tensor stay inside a slice.
  """
  shape = config_lib.resolved_mesh_shape(mesh_shape, len(devices))
  if num_slices == 1:
    return sharding.make_mesh(shape, devices)
  from jax.experimental import mesh_utils
  if shape["data"] % num_slices:
    raise ValueError(f"mesh {shape}: with {num_slices} slices the data axis must be a multiple of "
                     f"{num_slices} (slices are laid out on the data axis)")
  ici = (shape["data"] // num_slices, shape["fsdp"], shape["tensor"])
  grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
  return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def slice_of_devices(mesh: Mesh) -> list[int]:
  """Slice index of each device of the mesh, by logical device id (0 everywhere on one slice)."""
  return [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]
