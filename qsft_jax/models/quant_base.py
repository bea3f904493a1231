"""The frozen base of a LoRA run with its targeted kernels quantised (QLoRA), and its shardings.

`quantize_base(params, model_config, lora_config)` stores every kernel a LoRA target pattern matches
(`lora_config.targets`, re.search over module paths such as "layers_3/attn/q" or scanned
"layers/attn/q") as a `qsft_jax.models.quant.QuantizedArray` in `lora_config.quantization` ("int8" |
"nf4"), and every other leaf (embeddings, norms, biases, lm_head) in `lora_config.base_dtype`. A
kernel's leading "layers" axis (scanned layout) is quantised per layer; its input dims are those its
logical axes name as contracted (`quant.kernel_in_ndim`). `base_shapes`, `base_logical_specs` and
`base_shardings` describe that tree without building it (for jax.jit's out_shardings and AOT).

lora_config: anything with `targets`, `base_dtype` ("" = the model's param_dtype) and `quantization`
(`qsft_jax.models.lora.LoraConfig`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from qsft_jax.models import quant
from qsft_jax.models import sharded
from qsft_jax.models.config import ModelConfig
from qsft_jax.models.transformer import Transformer
from qsft_jax.sharding import Rules, logical_to_sharding

QUANTIZATIONS = ("none",) + quant.MODES


def _path_str(keypath) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def targeted_kernels(model_config: ModelConfig, targets) -> dict[str, tuple[str | None, ...]]:
  """Module path -> the kernel's logical axes, for every kernel of Transformer(model_config) whose
  module path a pattern of `targets` matches (re.search)."""
  specs = sharded.param_logical_specs(Transformer(model_config), model_config)["params"]
  patterns = [re.compile(p) for p in targets]
  out = {}
  for keypath, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=_is_spec):
    path = _path_str(keypath)
    if path.endswith("/kernel") and any(p.search(path[:-len("/kernel")]) for p in patterns):
      out[path[:-len("/kernel")]] = tuple(spec)
  return out


def quantize_base(params: Mapping[str, Any], model_config: ModelConfig, lora_config) -> Any:
  """The frozen base: targeted kernels quantised, every other leaf cast to base_dtype (see the module
  docstring); quantization "none" only casts.

  params: the model's params (variables dict {"params": tree} or the tree; the result has the same
  form) in any float dtype; kernels are quantised from their values cast to base_dtype (kernels already
  quantised are kept). Pure jnp:
  usable under jax.jit with out_shardings=`base_shardings(...)` and under jax.eval_shape.
  """
  mode = lora_config.quantization
  if mode not in QUANTIZATIONS:
    raise ValueError(f"quantize_base: quantization={mode!r}, expected one of {QUANTIZATIONS}")
  wrapped = isinstance(params, Mapping) and set(params) == {"params"}
  tree = params["params"] if wrapped else params
  dtype = jnp.dtype(lora_config.base_dtype or model_config.param_dtype)
  targets = targeted_kernels(model_config, lora_config.targets) if mode != "none" else {}

  def convert(keypath, x):
    if isinstance(x, quant.QuantizedArray):
      return x  # already quantised
    x = jnp.asarray(x).astype(dtype)
    module = _path_str(keypath)[:-len("/kernel")]
    if module not in targets:
      return x
    axes = targets[module]
    lead_ndim = 1 if axes[0] == "layers" else 0
    return quant.quantize(x, mode, quant.kernel_in_ndim(axes[lead_ndim:]), lead_ndim)

  out = jax.tree_util.tree_map_with_path(convert, tree, is_leaf=lambda x: isinstance(x, quant.QuantizedArray))
  return {"params": out} if wrapped else out


def quantized_base(base: Mapping[str, Any], model_config: ModelConfig, lora_config, mesh: Mesh,
                   rules: Rules) -> dict:
  """quantize_base of a LoRA run's frozen base {"params": tree}, computed in the shards of
  `base_shardings` (jitted with out_shardings): what the trainer and `run.load` store as the base."""
  shardings = base_shardings(model_config, lora_config, mesh, rules)
  return jax.jit(lambda b: quantize_base(b, model_config, lora_config), out_shardings=shardings)(
      {"params": base["params"]})


def base_shapes(model_config: ModelConfig, lora_config) -> Any:
  """ShapeDtypeStructs of quantize_base's tree ({"params": ...}, QuantizedArray nodes included),
  without allocating anything."""
  shapes = sharded.param_shapes(Transformer(model_config), model_config)
  return jax.eval_shape(lambda p: quantize_base(p, model_config, lora_config), shapes)


def base_logical_specs(model_config: ModelConfig, lora_config) -> Any:
  """Logical axis names of quantize_base's tree ({"params": ...}): the model's PartitionSpecs, with a
  QuantizedArray of names (`quant.logical_axes`) at each quantised kernel."""
  specs = sharded.param_logical_specs(Transformer(model_config), model_config)
  return jax.tree.map(
      lambda spec, shape: quant.logical_axes(tuple(spec), shape) if isinstance(shape, quant.QuantizedArray)
      else spec,
      specs, base_shapes(model_config, lora_config), is_leaf=_is_spec)


def variables_shardings(model: Transformer, model_config: ModelConfig, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings of the model's variables: `sharded.param_shardings`, with the base's ("params")
  those of `quantize_base`'s tree when the model's LoRA base is quantised (int8 / nf4)."""
  shardings = sharded.param_shardings(model, model_config, mesh, rules)
  lora_config = getattr(model, "lora", None)
  if lora_config is not None and lora_config.enabled and lora_config.quantization != "none":
    shardings = {**shardings, **base_shardings(model_config, lora_config, mesh, rules)}
  return shardings


def base_shardings(model_config: ModelConfig, lora_config, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings of quantize_base's tree ({"params": ...}) on `mesh` by the rule table."""
  return logical_to_sharding(base_logical_specs(model_config, lora_config), mesh, rules,
                             shapes=base_shapes(model_config, lora_config))
