"""Device mesh, logical-axis rules, and the shardings they give arrays and batches.

Every parameter and key activation of the model carries logical axis names (`vocab`, `embed`, `heads`,
...). A rule table maps each logical name to mesh axes (`data`, `fsdp`, `tensor`); the same table
shards parameters, optimizer state and batches on any mesh.

Rule resolution (`logical_to_mesh_spec`) follows Flax's: rules are tried in order; a rule applies to a
dimension when the dimension is still unassigned and none of the rule's mesh axes is already used by
another dimension of the same array. One addition: a rule is also skipped when the dimension's size is
not divisible by the product of the rule's mesh-axis sizes (e.g. kv_heads=3 over tensor=2), so such a
dimension is replicated instead of failing. Unassigned dimensions are replicated.

This module knows meshes and logical names only; a model's parameters and KV caches on a mesh are
`qsft_jax.models.sharded`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("length", None),
    ("head_dim", None),
    ("lora_rank", None),
)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes ("data", "fsdp", "tensor"), all AxisType.Auto (logical-rule sharding).

  Args:
    mesh_shape: sizes per axis, e.g. {"data": -1, "fsdp": 2, "tensor": 1}; missing axes get 1 and at
      most one axis may be -1 (filled with the remaining devices).
    devices: devices to use (default: all of jax.devices()).
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh shape {dict(mesh_shape)}: unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
  sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh shape {dict(mesh_shape)}: sizes must be positive, with at most one -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh shape {dict(mesh_shape)} does not fit {len(devices)} devices "
                       f"({len(devices)} is not a multiple of {known})")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh shape {dict(mesh_shape)} needs {math.prod(sizes)} devices, "
                     f"but there are {len(devices)} devices")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _as_tuple(mesh_axes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_mesh_spec(names: Sequence[str | None], shape: Sequence[int] | None,
                         axis_sizes: Mapping[str, int], rules: Rules) -> PartitionSpec:
  """PartitionSpec for one array from its logical dimension names (see the module docstring).

  Args:
    names: one logical name (or None) per dimension.
    shape: the array's shape, for the divisibility fallback; None skips that check.
    axis_sizes: mesh axis name -> size.
    rules: the logical-axis rule table.
  """
  names = tuple(names)
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"logical names {names} do not match array shape {tuple(shape)}")
  assigned: list[tuple[str, ...] | None] = [None] * len(names)
  used: set[str] = set()
  for logical, mesh_axes in rules:
    if logical not in names:
      continue
    pos = names.index(logical)
    axes = _as_tuple(mesh_axes)
    missing = [a for a in axes if a not in axis_sizes]
    if missing:
      raise ValueError(f"rule ({logical!r}, {mesh_axes!r}) names mesh axes {missing} that the mesh "
                       f"{dict(axis_sizes)} does not have")
    if assigned[pos] is not None or used.intersection(axes):
      continue
    if shape is not None and shape[pos] % math.prod(axis_sizes[a] for a in axes):
      continue  # does not divide: replicate this dimension rather than fail
    assigned[pos] = axes
    used.update(axes)
  spec = [None if not a else (a[0] if len(a) == 1 else a) for a in assigned]
  return PartitionSpec(*spec)


def _is_names(x) -> bool:
  return isinstance(x, PartitionSpec) or (isinstance(x, tuple) and all(
      e is None or isinstance(e, str) for e in x))


def logical_to_sharding(logical_spec_tree: Any, mesh: Mesh, rules: Rules, shapes: Any = None) -> Any:
  """Maps a pytree of logical specs (tuples / PartitionSpecs of logical names) to NamedShardings.

  `shapes` (optional): a matching pytree of arrays or ShapeDtypeStructs, enabling the
  divisibility fallback.
  """
  axis_sizes = dict(mesh.shape)
  if shapes is None:
    return jax.tree.map(lambda n: NamedSharding(mesh, logical_to_mesh_spec(n, None, axis_sizes, rules)),
                        logical_spec_tree, is_leaf=_is_names)
  return jax.tree.map(
      lambda n, x: NamedSharding(mesh, logical_to_mesh_spec(n, x.shape, axis_sizes, rules)),
      logical_spec_tree, shapes, is_leaf=_is_names)


def logical_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, using the ambient mesh (jax.set_mesh) and rules
  (nn.logical_axis_rules). A no-op when either is absent; indivisible dimensions are replicated."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec = logical_to_mesh_spec(names, x.shape, dict(mesh.shape), rules)
  return jax.lax.with_sharding_constraint(x, spec)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `shapes` (arrays or ShapeDtypeStructs) carrying the matching `shardings`:
  what `jax.jit(...).lower` and checkpoint restores take for sharded inputs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of [B, L] batch arrays: rows over the `batch` rule's mesh axes, length by `length`."""
  return NamedSharding(mesh, logical_to_mesh_spec(("batch", "length"), None, dict(mesh.shape), rules))


def global_batch_from_host_local(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict:
  """Assembles global [B, ...] jax.Arrays from this process's local rows of every array.

  Each process passes its own consecutive slice of the global batch (B / process_count rows); the
  global batch is their concatenation in process order. Works unchanged with one process.
  """
  axis_sizes = dict(mesh.shape)
  out = {}
  for key, local in host_batch.items():
    local = np.asarray(local)
    if local.ndim < 1:
      raise ValueError(f"global_batch_from_host_local: {key!r} must have a leading batch dimension")
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    names = (("batch", "length") + (None,) * local.ndim)[:local.ndim]
    sharding = NamedSharding(mesh, logical_to_mesh_spec(names, global_shape, axis_sizes, rules))
    out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out
