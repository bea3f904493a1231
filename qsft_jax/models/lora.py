"""LoRA: low-rank adapters over one frozen base model, the parameter sets of a LoRA run.

With LoRA, the three parameter sets of Q-SFT (phi, theta, theta_bar) share one frozen base (model.init's
weights, stored in `base_dtype`) and differ only in small adapters. The model keeps the adapters in a
variable collection of their own, beside the base's "params":

    variables = {"params": base_tree, "lora": adapter_tree}

For an adapted kernel at params path P + ("kernel",) of shape [in..., out...] (attn/q/kernel [D, H, Dh],
attn/o/kernel [H, Dh, D], mlp/up/kernel [D, F], ...) the adapter tree holds, at the same module path P:

    P + ("lora_a",)  [in..., r]   logical axes (in axes..., "lora_rank")   init normal(1 / sqrt(fan_in))
    P + ("lora_b",)  [r, out...]  logical axes ("lora_rank", out axes...)  init zeros

(with scan_layers a leading num_layers axis, logical name "layers"), stored in the model's param_dtype.
The forward is unmerged: y = x.W + scale * ((x.A).B) in the compute dtype, scale = alpha / rank
(`Transformer(config, lora=LoraConfig(...))`, qsft_jax.models.transformer). With B = 0 (a new adapter)
the model is exactly the base model. `merge` folds the adapters into the kernels (W + scale * A.B).

Targets are `re.search` patterns over module paths such as "layers_3/attn/q" (scanned: "layers/attn/q");
every projection of attention (q, k, v, o) and of the MLP (gate, up, down) can be adapted, the embedding
and the unembedding cannot.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsft_jax.models.config import ModelConfig

DEFAULT_TARGETS = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")
QUANTIZATIONS = ("none", "int8", "nf4")
COLLECTION = "lora"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings (config.model.lora; the fields are documented in config_lib.base_config).

  rank: adapter rank r; 0 turns LoRA off (full fine-tuning).
  alpha: the adapter term is scaled by alpha / rank.
  targets: re.search patterns over module paths ("layers_3/attn/q"); a projection whose path matches
    one of them is adapted.
  base_dtype: storage dtype of the frozen base ("" = the model's param_dtype).
  quantization: "none" | "int8" | "nf4": storage of the frozen base's kernels.
  """
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  base_dtype: str = "bfloat16"
  quantization: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """alpha / rank: the factor of the adapter term."""
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, lora: Mapping[str, Any]) -> LoraConfig:
    """From config.model.lora (a ConfigDict or dict)."""
    d = lora.to_dict() if hasattr(lora, "to_dict") else dict(lora)
    return cls(rank=int(d.get("rank", 0)), alpha=float(d.get("alpha", 16.0)),
               targets=tuple(d.get("targets", DEFAULT_TARGETS)), base_dtype=str(d.get("base_dtype", "bfloat16")),
               quantization=str(d.get("quantization", "none")))

  def matches(self, module_path: str) -> bool:
    """Whether the module at `module_path` ("layers_0/attn/q") is adapted."""
    return any(re.search(t, module_path) for t in self.targets)


def problems(lora: LoraConfig) -> list[tuple[str, str]]:
  """[(field, message)] of what is wrong with the settings alone (config_lib.check_config reports them)."""
  out = []
  if not isinstance(lora.rank, (int, np.integer)) or lora.rank < 0:
    out.append(("rank", f"must be an integer >= 0 (0: no LoRA); got {lora.rank!r}"))
  if not np.isfinite(lora.alpha) or lora.alpha <= 0:
    out.append(("alpha", f"must be a finite number > 0; got {lora.alpha!r}"))
  if lora.enabled and not lora.targets:
    out.append(("targets", "is empty: LoRA needs at least one pattern of the modules to adapt"))
  for t in lora.targets:
    try:
      re.compile(t)
    except re.error as e:
      out.append(("targets", f"{t!r} is not a regular expression ({e})"))
  if lora.base_dtype:
    try:
      if not jnp.issubdtype(jnp.dtype(lora.base_dtype), jnp.floating):
        raise TypeError
    except TypeError:
      out.append(("base_dtype", f"{lora.base_dtype!r} is not a floating-point dtype (\"\" = param_dtype)"))
  if lora.quantization not in QUANTIZATIONS:
    out.append(("quantization", f"{lora.quantization!r}: expected one of {QUANTIZATIONS}"))
  return out


# ----------------------------------------------------------------------------------------------
# The variables of a LoRA model


@functools.lru_cache(maxsize=32)
def abstract_variables(model_config: ModelConfig, lora: LoraConfig) -> dict:
  """Boxed abstract variables {"params", "lora"} of Transformer(model_config, lora=lora).init."""
  from qsft_jax.models.transformer import Transformer
  dummy = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda rng: Transformer(model_config, lora=lora).init(rng, dummy, dummy, dummy + 1),
                        jax.random.key(0))


def adapter_paths(model_config: ModelConfig, lora: LoraConfig) -> tuple[str, ...]:
  """Module paths ("layers_0/attn/q") of the adapted kernels, in tree order."""
  tree = nn.unbox(abstract_variables(model_config, lora)).get(COLLECTION, {})
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [p.key for p in path]
    if keys[-1] == "lora_a":
      paths.append("/".join(keys[:-1]))
  return tuple(paths)


def unmatched_targets(model_config: ModelConfig, lora: LoraConfig) -> tuple[str, ...]:
  """The target patterns that match no adaptable module of the model (a config error)."""
  paths = adapter_paths(model_config, lora)
  return tuple(t for t in lora.targets if not any(re.search(t, p) for p in paths))


def split(variables: Mapping[str, Any]) -> tuple[dict, dict]:
  """{"params": base, "lora": adapters} -> ({"params": base}, {"lora": adapters})."""
  return {"params": variables["params"]}, {COLLECTION: variables[COLLECTION]}


def store_base(base: Mapping[str, Any], lora: LoraConfig) -> dict:
  """The frozen base {"params": tree} as stored in a LoRA state: floating leaves cast to base_dtype
  ("" keeps them as they are)."""
  if not lora.base_dtype:
    return dict(base)
  dtype = jnp.dtype(lora.base_dtype)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, dict(base))


def merge(variables: Mapping[str, Any], model_config: ModelConfig, lora: LoraConfig) -> dict:
  """{"params": base, "lora": adapters} -> {"params": merged}: W + scale * A.B for every adapted kernel
  (computed in float32, stored in the kernel's dtype), the other parameters unchanged. The merged
  params run on the plain `Transformer(model_config)`."""
  del model_config  # the layout is read off the trees
  base, adapters = variables["params"], variables[COLLECTION]

  def walk(b, a):
    if "lora_a" in a:
      w, la, lb = b["kernel"], a["lora_a"], a["lora_b"]
      batch = la.ndim + lb.ndim - 2 - w.ndim  # 1 with a leading layer axis (scan_layers)
      letters = "abcdefghijklmnopqstuvwxyz"
      lead, n_in = letters[:batch], la.ndim - 1 - batch
      ins, outs = letters[batch:batch + n_in], letters[batch + n_in:batch + n_in + lb.ndim - 1 - batch]
      delta = jnp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", la.astype(jnp.float32),
                         lb.astype(jnp.float32))
      return {**b, "kernel": (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype)}
    return {k: walk(v, a[k]) if k in a else v for k, v in b.items()}

  return {"params": walk(dict(base), adapters)}


def base_checksum(base: Any) -> str:
  """A checksum of the values of a (sharded) parameter tree, the same on every mesh.

  Each leaf's bits (as unsigned integers) are mixed with their flat positions and summed modulo 2**32
  on the devices (integer sums do not depend on the order of reduction, hence on the sharding); the
  per-leaf sums, paths, shapes and dtypes are hashed on the host.
  """
  def leaf_sum(x):
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[
        x.dtype.itemsize]).astype(jnp.uint32)
    flat = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
      flat = flat + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
      stride *= x.shape[axis]
    mixed = (bits ^ (flat * jnp.uint32(0x9E3779B1))) * (flat * jnp.uint32(2) + jnp.uint32(1))
    return jnp.sum(mixed, dtype=jnp.uint32)

  leaves = jax.tree_util.tree_flatten_with_path(base)[0]
  sums = jax.device_get(jax.jit(lambda xs: [leaf_sum(x) for x in xs])([x for _, x in leaves]))
  h = hashlib.sha256()
  for (path, x), s in zip(leaves, sums):
    h.update(f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype}:{int(s)};".encode())
  return h.hexdigest()[:16]


def base_record(base: Any, init: str, lora: LoraConfig) -> dict:
  """What a LoRA checkpoint records of the base it was trained over (the base is not saved)."""
  return {"init": init, "base_dtype": lora.base_dtype, "quantization": lora.quantization,
          "checksum": base_checksum(base)}


def describe_record(record: Mapping[str, Any]) -> str:
  return (f"model.init={record.get('init')!r}, base_dtype={record.get('base_dtype')!r}, "
          f"quantization={record.get('quantization')!r}, checksum {record.get('checksum')}")

