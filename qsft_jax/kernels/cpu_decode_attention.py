"""Decode-step attention on the CPU as an XLA FFI custom call (a plug-in; see qsft_jax.kernels).

A decode step's attention reads the whole KV cache to answer one query per row. XLA's CPU backend
runs that contraction as generic reductions (or tiny GEMMs), which makes the per-token cost grow
with the context far more than the bytes do; the C++ loop (csrc/decode_attention.cc) reads each
cache row once for all query heads of its kv head and spreads (row, kv head) pairs over XLA's
intra-op threads (benchmarks/sampler.py measures the effect). It runs on the CPU, in float32, on one
device; `qsft_jax.sampler.Sampler` picks it there ("auto") when it builds.

The library is compiled on first use with the system C++ compiler (g++ or $CXX) against jaxlib's FFI
headers, into ~/.cache/qsft_jax (or $QSFT_JAX_CACHE), keyed by the source, jaxlib's version and this
CPU's model and flags (it is built with -march=native). Without a compiler `available()` is False and
the Sampler keeps XLA's path.

Shapes: B rows, K kv heads, G query heads per kv head, S cache slots, Dh head dim.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = "qsft_decode_attention"
SOURCE = pathlib.Path(__file__).parent / "csrc" / "decode_attention.cc"
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")


def _cpu_signature() -> str:
  """This CPU's model name and feature flags (the library is built for them)."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return "unknown"
  keep = [l for l in lines if l.startswith(("model name", "flags"))]
  return "\n".join(sorted(set(keep)))


def library_path() -> pathlib.Path:
  """Where the built library for this source, jaxlib and CPU lives (built or not)."""
  digest = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), _cpu_signature().encode(), " ".join(_FLAGS).encode()):
    digest.update(part)
  root = pathlib.Path(os.environ.get("QSFT_JAX_CACHE", pathlib.Path.home() / ".cache" / "qsft_jax"))
  return root / f"decode_attention_{digest.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
  """Compiles the library if it is not there yet; returns its path. Raises RuntimeError on failure."""
  path = library_path()
  if path.exists():
    return path
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++, c++, clang++ or $CXX) to build the CPU decode-attention kernel")
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = pathlib.Path(tmp) / path.name
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"building {SOURCE} failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
    os.replace(out, path)  # atomic: concurrent builders (pytest workers) never see half a file
  return path


@functools.cache
def available() -> bool:
  """True once the kernel is built and registered with XLA for the CPU platform (tried once)."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.QsftDecodeAttention), platform="cpu")
  except (RuntimeError, OSError) as error:
    warnings.warn(f"CPU decode-attention kernel unavailable: {error}")
    return False
  return True


def decode_attention(q, k_cache, v_cache, cache_mask, k_new, v_new, scale: float) -> jax.Array:
  """One decode step's attention, by the C++ kernel.

  q [B, K, G, Dh]; k_cache, v_cache [B, K, S, Dh]; cache_mask [B, S] bool (slots each row attends to);
  k_new, v_new [B, K, Dh] (the new token's key and value; it always attends to itself); all float32.
  Returns [B, K, G, Dh] float32: softmax over [valid slots, new token] of scale * q.k, times the values.
  """
  if not available():
    raise RuntimeError("the CPU decode-attention kernel is not available (see the warning above)")
  for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
    if x.dtype != jnp.float32:
      raise TypeError(f"decode_attention: {name} must be float32, got {x.dtype}")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="broadcast_all")
  return call(q, k_cache, v_cache, cache_mask.astype(bool), k_new, v_new, scale=np.float32(scale))

