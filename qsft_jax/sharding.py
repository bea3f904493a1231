"""Device mesh, logical-axis rules and sharded parameter creation.

Every parameter and key activation of the model carries logical axis names (`vocab`, `embed`, `heads`,
...). A rule table maps each logical name to mesh axes (`data`, `fsdp`, `tensor`); the same table
shards parameters, optimizer state and batches on any mesh.

Rule resolution (`logical_to_mesh_spec`) follows Flax's: rules are tried in order; a rule applies to a
dimension when the dimension is still unassigned and none of the rule's mesh axes is already used by
another dimension of the same array. One addition: a rule is also skipped when the dimension's size is
not divisible by the product of the rule's mesh-axis sizes (e.g. kv_heads=3 over tensor=2), so such a
dimension is replicated instead of failing. Unassigned dimensions are replicated.

"Params" below means the Flax variables dict `{"params": tree}` that `Transformer.apply` takes.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:  # qsft_jax.models imports this module; avoid the import cycle
  from qsft_jax.models.config import ModelConfig

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


@functools.lru_cache(maxsize=32)
def _abstract_init(config: ModelConfig):
  """Boxed (LogicallyPartitioned) abstract variables of Transformer(config).init; cached per config."""
  from qsft_jax.models.transformer import Transformer  # the model module imports this one
  dummy = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda rng: Transformer(config).init(rng, dummy, dummy, dummy + 1), jax.random.key(0))


def _config_of(model: nn.Module, config: ModelConfig | None) -> ModelConfig:
  config = model.config if config is None else config
  if model.config != config:
    raise ValueError("model.config and config differ")
  return config


def param_logical_specs(model: nn.Module, config: ModelConfig | None = None) -> Any:
  """Pytree (like the params) of PartitionSpecs holding each parameter's logical axis names."""
  return nn.get_partition_spec(_abstract_init(_config_of(model, config)))


def param_shapes(model: nn.Module, config: ModelConfig | None = None) -> Any:
  """Pytree of ShapeDtypeStructs of the (unboxed) params, without allocating anything."""
  return nn.unbox(_abstract_init(_config_of(model, config)))


def param_shardings(model: nn.Module, config: ModelConfig | None, mesh: Mesh, rules: Rules) -> Any:
  """NamedSharding for every parameter of `model` (a `Transformer(config)`) on `mesh`."""
  boxed = _abstract_init(_config_of(model, config))
  return logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules, shapes=nn.unbox(boxed))


def init_params_sharded(config: ModelConfig, rng: jax.Array, mesh: Mesh, rules: Rules) -> Any:
  """Randomly initialised params of Transformer(config), created directly in their shards.

  Init is jitted with out_shardings, so no device ever holds a full copy of a sharded parameter.
  """
  from qsft_jax.models.transformer import Transformer
  model = Transformer(config)
  shardings = param_shardings(model, config, mesh, rules)
  dummy = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda r: nn.unbox(model.init(r, dummy, dummy, dummy + 1)), out_shardings=shardings)
  return init(rng)


def shard_params(host_params: Any, config: ModelConfig, mesh: Mesh, rules: Rules) -> Any:
  """Places a host (numpy) params tree of Transformer(config) onto `mesh` by the rule table.

  `host_params` must have exactly the structure and shapes of the model's params (either the
  variables dict {"params": ...} or the inner tree; the result has the same form). Each device
  receives only its own slice.
  """
  from qsft_jax.models.transformer import Transformer
  model = Transformer(config)
  shardings = param_shardings(model, config, mesh, rules)
  shapes = param_shapes(model, config)
  wrapped = not (isinstance(host_params, Mapping) and set(host_params) == {"params"})
  tree = {"params": host_params} if wrapped else host_params
  expected, got = jax.tree.structure(shapes), jax.tree.structure(tree)
  if expected != got:
    raise ValueError(f"shard_params: params tree does not match the model's.\n expected {expected}\n got {got}")

  def put(path, x, want, sharding):
    if tuple(np.shape(x)) != tuple(want.shape):
      raise ValueError(f"shard_params: {jax.tree_util.keystr(path)} has shape {np.shape(x)}, "
                       f"the model expects {tuple(want.shape)}")
    x = np.asarray(x, dtype=want.dtype)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  out = jax.tree.map_with_path(put, tree, shapes, shardings)
  return out["params"] if wrapped else out


def cache_shardings(config: ModelConfig, batch_size: int, cache_len: int, mesh: Mesh, rules: Rules,
                    dtype=None) -> dict:
  """NamedShardings of init_cache(config, batch_size, cache_len, dtype) by its logical axes."""
  from qsft_jax.models.transformer import cache_logical_axes, init_cache
  shapes = jax.eval_shape(lambda: init_cache(config, batch_size, cache_len, dtype))
  return logical_to_sharding(cache_logical_axes(config), mesh, rules, shapes=shapes)


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
