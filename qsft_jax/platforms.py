"""JAX's platform choice on a machine without TPU chips that has `libtpu` installed.

With `JAX_PLATFORMS` unset, JAX initialises every backend it can register, TPU included whenever the
`libtpu` package is importable (the test requirements install it for `qsft_jax.aot`). On a host
without TPU chips libtpu then prints its start-up errors on every process start (no accelerator
type, no worker hostnames from the GCE metadata server, `common_lib.cc ... INVALID_ARGUMENT`), takes
/tmp/libtpu_lockfile, and JAX falls back to the CPU anyway.

`default_jax_platforms()` (run when `qsft_jax` is imported) sets `JAX_PLATFORMS=cpu` in exactly that
case: `JAX_PLATFORMS` absent from the environment, `libtpu` installed, no TPU chip device node
(/dev/accel*, /dev/vfio/N) and no NVIDIA GPU device node (/dev/nvidia*, where the CUDA backend
decides). A TPU VM, a GPU host and any explicit choice are left alone: `JAX_PLATFORMS=` (set and
empty) restores JAX's own discovery. `qsft_jax.aot` still describes TPU topologies with the CPU as the
backend (jax.experimental.topologies loads libtpu itself).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys


def has_tpu_chips() -> bool:
  """Whether this host has TPU chips: their device nodes (/dev/accel* on v4/v5p, /dev/vfio/N on v5e/v6e)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _has_nvidia_gpu() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/nvidiactl"))


def default_jax_platforms() -> str | None:
  """Sets JAX_PLATFORMS=cpu where only libtpu's failing start-up would change (see module doc).

  Returns the value set, or None when the environment is left as it is. When jax was imported first
  and no backend is initialised yet, the setting goes to jax.config as well (jax reads the variable
  once, at import).
  """
  if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
    return None
  if has_tpu_chips() or _has_nvidia_gpu() or importlib.util.find_spec("libtpu") is None:
    return None
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    import jax
    from jax._src import xla_bridge
    if jax.config.jax_platforms is None and not xla_bridge.backends_are_initialized():
      jax.config.update("jax_platforms", "cpu")
  return "cpu"
