"""Quantised storage of the frozen base's kernels (QLoRA): int8 per output channel, or 4-bit NormalFloat.

A LoRA run never updates its base, so the base's adapted kernels may be stored quantised and turned back
into dense arrays of the compute dtype where the model reads them (`dense`). Two modes:

- "int8": symmetric absmax per output channel. A kernel [lead..., in..., out...] is stored as int8 codes
  of the same shape and float32 scales [lead..., out...] = absmax over the input dims * float32(1 / 127);
  codes = round(w / scale) (half to even), so w ~ code * scale with |error| <= scale / 2.
- "nf4": QLoRA's 4-bit NormalFloat (Dettmers et al. 2023; the 16-value table of bitsandbytes,
  `NF4_CODEBOOK`), blockwise absmax over the flattened input dims in blocks of BLOCK_SIZE = 64 (the
  input dims are flattened row-major to n_in values per output channel and zero-padded to a multiple of
  64). Each value is stored as the index of the codebook entry nearest w / absmax(block) (ties to the
  lower entry), two indices per uint8 (the even position in the high nibble, as bitsandbytes packs):
  values [lead..., n_blocks, 32, out...] uint8 and float32 scales (the block absmax) [lead..., n_blocks,
  out...]; w ~ NF4_CODEBOOK[code] * absmax. The scales are not quantised again (no double quantisation):
  4.5 bits per weight instead of QLoRA's ~4.127.

`lead` are leading dims quantised independently (the "layers" axis of a scanned stack); a kernel's input
dims are those its matmul contracts ([D] of attn/q, k, v and mlp/gate, up; [H, Dh] of attn/o; [F] of
mlp/down: `kernel_in_ndim`). Scales are float32 in both modes; dequantisation multiplies in float32 and
casts the product to the requested dtype once.

Whole base trees (quantise every LoRA-targeted kernel, their shardings) are `qsft_jax.models.quant_base`;
this module imports no model code, so the model can read kernels through `dense`.

`QuantizedArray` is a pytree node whose children are the stored arrays (values, scales) and whose static
data are the mode, the input dims' shape, the number of output dims and the original dtype. It carries
no leading-dim sizes, so slicing every child along a leading axis (nn.scan over layers,
`unstack_layers`) or stacking several (`stack_layers`) gives a valid QuantizedArray again.

Sharding: `logical_axes` names the stored arrays' axes after the kernel's (the packed and blocked input
axis keeps the name of the kernel's first input dim, the within-block axis is None); the rule table
replicates an axis its mesh axes do not divide.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "nf4")
BLOCK_SIZE = 64  # nf4: values per absmax block (bitsandbytes' and QLoRA's default)
INT8_MAX = 127
# int8 scale = absmax * float32(1 / 127): a product, which every backend computes alike (XLA turns a
# division by a constant into this product on some backends and not on others).
_INT8_STEP = np.float32(1 / INT8_MAX)

# The 4-bit NormalFloat table of QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 constants):
# 7 negative and 8 positive normal quantiles, exact zero, normalised to [-1, 1].
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
# Decision boundaries between neighbouring entries: code = number of boundaries below the value.
_NF4_MIDPOINTS = ((NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2).astype(np.float32)


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
  """A quantised kernel: stored `values` and `scales` (pytree children) and static layout data.

  values: int8 [lead..., in..., out...] ("int8") or uint8 [lead..., n_blocks, 32, out...] ("nf4");
  scales: float32 [lead..., out...] ("int8") or [lead..., n_blocks, out...] ("nf4"). The children may
  also be ShapeDtypeStructs (jax.eval_shape) or logical axis names (`logical_axes`).
  """

  def __init__(self, values: Any, scales: Any, mode: str, in_shape: tuple[int, ...], out_ndim: int,
               dtype: str):
    self.values, self.scales = values, scales
    self.mode, self.in_shape, self.out_ndim, self.dtype = mode, tuple(in_shape), int(out_ndim), str(dtype)

  def tree_flatten_with_keys(self):
    # Dict keys, so that paths into a quantised tree read like paths into the plain params dict.
    key = jax.tree_util.DictKey
    children = ((key("values"), self.values), (key("scales"), self.scales))
    return children, (self.mode, self.in_shape, self.out_ndim, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def replace(self, values: Any, scales: Any) -> "QuantizedArray":
    """The same layout with other children (e.g. shardings or logical names)."""
    return QuantizedArray(values, scales, self.mode, self.in_shape, self.out_ndim, self.dtype)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape[len(self.values.shape) - self.out_ndim:])

  @property
  def lead_shape(self) -> tuple[int, ...]:
    return tuple(self.scales.shape[:len(self.scales.shape) - self.out_ndim - (self.mode == "nf4")])

  @property
  def shape(self) -> tuple[int, ...]:
    """The dense kernel's shape [lead..., in..., out...]."""
    return self.lead_shape + self.in_shape + self.out_shape

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def astype(self, dtype: Any) -> jax.Array:
    """The dense kernel in `dtype` (`dequantize`), so that code reading a kernel as an array (e.g.
    `lora.merge`) reads a quantised one alike."""
    return dequantize(self, dtype)

  def __repr__(self):
    return (f"QuantizedArray(mode={self.mode!r}, in_shape={self.in_shape}, out_ndim={self.out_ndim}, "
            f"dtype={self.dtype}, values={self.values!r}, scales={self.scales!r})")


def _check_split(shape: Sequence[int], in_ndim: int, lead_ndim: int) -> None:
  if in_ndim < 1 or lead_ndim < 0 or lead_ndim + in_ndim >= len(shape):
    raise ValueError(f"quantize: a kernel of shape {tuple(shape)} cannot have {lead_ndim} leading and "
                     f"{in_ndim} input dims and at least one output dim")


def quantize(x: jax.Array, mode: str, in_ndim: int = 1, lead_ndim: int = 0) -> QuantizedArray:
  """Quantises a kernel x [lead..., in..., out...] (any float dtype) in `mode` ("int8" | "nf4").

  in_ndim: how many dims after the `lead_ndim` leading ones the matmul contracts (see the module
  docstring). Runs under jit and jax.eval_shape; the result's dtype records x's dtype.
  """
  if mode not in MODES:
    raise ValueError(f"quantize: mode={mode!r}, expected one of {MODES}")
  shape = tuple(x.shape)
  _check_split(shape, in_ndim, lead_ndim)
  lead, ins, outs = shape[:lead_ndim], shape[lead_ndim:lead_ndim + in_ndim], shape[lead_ndim + in_ndim:]
  x32 = jnp.asarray(x).astype(jnp.float32)
  if mode == "int8":
    in_axes = tuple(range(lead_ndim, lead_ndim + in_ndim))
    scales = jnp.max(jnp.abs(x32), axis=in_axes) * _INT8_STEP  # [lead..., out...]
    safe = jnp.expand_dims(jnp.where(scales > 0, scales, 1.0), in_axes)
    codes = jnp.clip(jnp.round(x32 / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return QuantizedArray(codes, scales, mode, ins, len(outs), x.dtype)
  n_in = int(np.prod(ins))
  n_blocks = -(-n_in // BLOCK_SIZE)
  flat = x32.reshape(lead + (n_in,) + outs)
  if n_blocks * BLOCK_SIZE != n_in:
    pad = [(0, 0)] * len(lead) + [(0, n_blocks * BLOCK_SIZE - n_in)] + [(0, 0)] * len(outs)
    flat = jnp.pad(flat, pad)
  blocks = flat.reshape(lead + (n_blocks, BLOCK_SIZE) + outs)
  block_axis = lead_ndim + 1
  scales = jnp.max(jnp.abs(blocks), axis=block_axis)  # [lead..., n_blocks, out...]
  normed = blocks / jnp.expand_dims(jnp.where(scales > 0, scales, 1.0), block_axis)
  # Nearest codebook entry as the count of decision boundaries below the value: elementwise compares
  # that fuse into one pass (no [..., 16] distance array).
  codes = sum((normed > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS)
  pairs = codes.reshape(lead + (n_blocks, BLOCK_SIZE // 2, 2) + outs)
  high = jax.lax.index_in_dim(pairs, 0, block_axis + 1, keepdims=False)
  low = jax.lax.index_in_dim(pairs, 1, block_axis + 1, keepdims=False)
  packed = (high << 4) | low  # [lead..., n_blocks, 32, out...] uint8
  return QuantizedArray(packed, scales, mode, ins, len(outs), x.dtype)


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
  """The dense kernel [lead..., in..., out...] of `q` in `dtype` (default: the quantised array's dtype).

  The product code * scale is formed in float32 and cast once, so dequantize(q, d) equals
  dequantize(q, float32).astype(d).
  """
  dtype = jnp.dtype(q.dtype if dtype is None else dtype)
  lead, outs = q.lead_shape, q.out_shape
  if q.mode == "int8":
    in_axes = tuple(range(len(lead), len(lead) + len(q.in_shape)))
    w = q.values.astype(jnp.float32) * jnp.expand_dims(q.scales.astype(jnp.float32), in_axes)
    return w.astype(dtype)
  if q.mode != "nf4":
    raise ValueError(f"dequantize: unknown mode {q.mode!r}")
  block_axis = len(lead) + 1
  high, low = q.values >> 4, q.values & 15
  codes = jnp.stack([high, low], axis=block_axis + 1)  # [lead..., n_blocks, 32, 2, out...]
  n_blocks = q.values.shape[len(lead)]
  codes = codes.reshape(lead + (n_blocks, BLOCK_SIZE) + outs)
  w = jnp.take(jnp.asarray(NF4_CODEBOOK), codes.astype(jnp.int32), axis=0)
  w = w * jnp.expand_dims(q.scales.astype(jnp.float32), block_axis)
  n_in = int(np.prod(q.in_shape))
  w = w.reshape(lead + (n_blocks * BLOCK_SIZE,) + outs)
  if n_blocks * BLOCK_SIZE != n_in:
    w = jax.lax.slice_in_dim(w, 0, n_in, axis=len(lead))
  return w.reshape(lead + q.in_shape + outs).astype(dtype)


def dense(x: Any, dtype: Any) -> jax.Array:
  """A stored kernel as a dense array of `dtype`: x.astype(dtype), or dequantize(x, dtype) for a
  QuantizedArray. The one function the model reads a kernel through."""
  if isinstance(x, QuantizedArray):
    return dequantize(x, dtype)
  return x.astype(dtype)


def kernel_in_ndim(axes: Sequence[str | None]) -> int:
  """How many dims a kernel's matmul contracts, from its logical axes without a leading "layers":
  one ("embed") for kernels that read the residual stream, else all but the last (attn/o [H, Dh, D],
  mlp/down [F, D])."""
  axes = tuple(axes)
  return 1 if axes[0] == "embed" else len(axes) - 1


def logical_axes(kernel_axes: Sequence[str | None], q: QuantizedArray) -> QuantizedArray:
  """Logical axis names of q's stored arrays, given the dense kernel's names [lead..., in..., out...]
  (a QuantizedArray whose children are tuples of names, for `qsft_jax.sharding.logical_to_sharding`).

  int8: values keep the kernel's names, scales those of the lead and output dims. nf4: the block axis
  keeps the name of the first input dim (the rule table replicates it where its mesh axes do not divide
  n_blocks), the within-block axis is None.
  """
  names = tuple(kernel_axes)
  lead_ndim = len(names) - len(q.in_shape) - q.out_ndim
  if lead_ndim < 0:
    raise ValueError(f"logical_axes: {names} has fewer dims than a kernel with input dims {q.in_shape} and "
                     f"{q.out_ndim} output dims")
  n_in = len(q.in_shape)
  lead, ins, outs = names[:lead_ndim], names[lead_ndim:lead_ndim + n_in], names[lead_ndim + n_in:]
  if q.mode == "int8":
    return q.replace(names, lead + outs)
  return q.replace(lead + (ins[0], None) + outs, lead + (ins[0],) + outs)
