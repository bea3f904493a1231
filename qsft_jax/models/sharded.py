"""A model's parameters and KV caches on a mesh: shapes, logical specs, shardings, sharded init.

Every parameter of `Transformer(config)` carries logical axis names (see qsft_jax.models.transformer);
`qsft_jax.sharding`'s rule table maps them to mesh axes. "Params" below means the Flax variables
dict `{"params": tree}` that `Transformer.apply` takes; for a model with LoRA adapters
(`Transformer(config, lora=...)`, qsft_jax.models.lora) the shapes, specs and shardings below cover its
variables `{"params": base, "lora": adapters}`.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qsft_jax.models.config import ModelConfig
from qsft_jax.models.transformer import Transformer, cache_logical_axes, init_cache
from qsft_jax.sharding import Rules, logical_to_sharding


@functools.lru_cache(maxsize=32)
def _abstract_init(config: ModelConfig, lora: Any = None):
  """Boxed (LogicallyPartitioned) abstract variables of Transformer(config, lora=lora).init ({"params"},
  plus "lora" with adapters); cached per config."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda rng: Transformer(config, lora=lora).init(rng, dummy, dummy, dummy + 1),
                        jax.random.key(0))


def _lora(model: nn.Module):
  lora = getattr(model, "lora", None)
  return lora if lora is not None and lora.enabled else None


def _config_of(model: nn.Module, config: ModelConfig | None) -> ModelConfig:
  config = model.config if config is None else config
  if model.config != config:
    raise ValueError("model.config and config differ")
  return config


def param_logical_specs(model: nn.Module, config: ModelConfig | None = None) -> Any:
  """Pytree (like the params) of PartitionSpecs holding each parameter's logical axis names."""
  return nn.get_partition_spec(_abstract_init(_config_of(model, config), _lora(model)))


def param_shapes(model: nn.Module, config: ModelConfig | None = None) -> Any:
  """Pytree of ShapeDtypeStructs of the (unboxed) params, without allocating anything."""
  return nn.unbox(_abstract_init(_config_of(model, config), _lora(model)))


def param_shardings(model: nn.Module, config: ModelConfig | None, mesh: Mesh, rules: Rules) -> Any:
  """NamedSharding for every parameter of `model` (a `Transformer(config)`) on `mesh`."""
  boxed = _abstract_init(_config_of(model, config), _lora(model))
  return logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules, shapes=nn.unbox(boxed))


def init_adapters_sharded(config: ModelConfig, lora: Any, rng: jax.Array, mesh: Mesh, rules: Rules) -> dict:
  """New LoRA adapters {"lora": tree} of Transformer(config, lora=lora) (A random, B = 0), created in
  their shards (the base init that `init` runs alongside is dead code under jit)."""
  model = Transformer(config, lora=lora)
  shardings = {"lora": param_shardings(model, config, mesh, rules)["lora"]}
  dummy = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda r: {"lora": nn.unbox(model.init(r, dummy, dummy, dummy + 1))["lora"]},
                 out_shardings=shardings)
  return init(rng)


def init_params_sharded(config: ModelConfig, rng: jax.Array, mesh: Mesh, rules: Rules) -> Any:
  """Randomly initialised params of Transformer(config), created directly in their shards.

  Init is jitted with out_shardings, so no device ever holds a full copy of a sharded parameter.
  """
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
  shapes = jax.eval_shape(lambda: init_cache(config, batch_size, cache_len, dtype))
  return logical_to_sharding(cache_logical_axes(config), mesh, rules, shapes=shapes)
