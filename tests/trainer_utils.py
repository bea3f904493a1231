"""Helpers of the trainer tests: start `python -m qsft_jax.main` in subprocesses, read checkpoints.

Subprocesses get JAX_PLATFORMS=cpu, their own simulated device count and a persistent compilation
cache shared by the whole test session (the tiny model's steps compile once, later processes load
them), so that a chain of killed and resumed runs costs little more than its process starts.
"""
from __future__ import annotations

import atexit
import functools
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")

# The config every resume / multi-process test shares, so that one uninterrupted reference run serves
# them all: enough steps that a kill polled from outside lands mid-phase, a checkpoint every 2 steps,
# two logical data shards (one process or two train on the same batches).
STEPS = 24
SHARED_OVERRIDES = (f"--config.bc.steps={STEPS}", f"--config.qsft.steps={STEPS}",
                    "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3",
                    "--config.data_shards=2", "--config.eval.enabled=False",
                    "--config.log.every_steps=2",
                    # held-out value diagnostics during phase 2 (read-only: the states do not change)
                    "--config.log.value_diagnostics_every=12")

_SESSION_DIR = None


def session_dir() -> str:
  """A temporary directory that lives as long as the test session (compilation cache, reference)."""
  global _SESSION_DIR
  if _SESSION_DIR is None:
    _SESSION_DIR = tempfile.mkdtemp(prefix="qsft_trainer_tests_")
    atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
  return _SESSION_DIR


def subprocess_env(device_count: int = 8, **extra) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}",
             JAX_COMPILATION_CACHE_DIR=os.path.join(session_dir(), "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
  env.pop("QSFT_DISTRIBUTED", None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def main_command(workdir: str, *overrides: str, config: str = TINY) -> list[str]:
  return [sys.executable, "-m", "qsft_jax.main", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def start(workdir: str, *overrides: str, device_count: int = 8, env: dict | None = None,
          log_name: str = "log") -> subprocess.Popen:
  """Starts the trainer; stdout and stderr go to a new WORKDIR.<log_name>N.txt (read with `output`)."""
  n = 0
  while os.path.exists(f"{workdir}.{log_name}{n}.txt"):
    n += 1
  log = open(f"{workdir}.{log_name}{n}.txt", "wb")
  proc = subprocess.Popen(main_command(workdir, *overrides), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, env=env or subprocess_env(device_count))
  proc.log_path = log.name
  log.close()
  return proc


def output(proc) -> str:
  with open(proc.log_path, errors="replace") as f:
    return f.read()


def wait(proc, timeout: float = 300) -> int:
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise AssertionError(f"trainer did not finish in {timeout} s:\n{output(proc)[-4000:]}")


def run_ok(workdir: str, *overrides: str, **kwargs) -> str:
  proc = start(workdir, *overrides, **kwargs)
  rc = wait(proc)
  text = output(proc)
  assert rc == 0, f"trainer exited {rc}:\n{text[-4000:]}"
  return text


def checkpoint_steps(workdir: str, phase: str) -> list[int]:
  """Complete (renamed) checkpoint steps of a phase, as orbax would list them."""
  path = os.path.join(workdir, phase, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def tmp_checkpoints(workdir: str, phase: str) -> list[str]:
  return glob.glob(os.path.join(workdir, phase, "checkpoints", "*.orbax-checkpoint-tmp*"))


def kill_when(proc, condition, sig=signal.SIGKILL, timeout: float = 300, poll: float = 0.01) -> None:
  """Sends `sig` to proc as soon as condition() holds (polled); fails if proc ends first."""
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"trainer ended (rc {proc.returncode}) before the kill point:\n"
                           f"{output(proc)[-4000:]}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError("kill point not reached in time")
    time.sleep(poll)
  proc.send_signal(sig)


def read_state(workdir: str, phase: str, step: int) -> dict:
  """The saved train state of a checkpoint as a flat {path: np.ndarray}."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, phase, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    metadata = ckptr.metadata(path)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ckptr.restore(path, restore_args=restore_args)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_states_equal(a: dict, b: dict, *, rtol: float = 0.0, atol: float = 0.0, what: str = ""):
  """Same leaves; bit for bit when rtol = atol = 0."""
  assert sorted(a) == sorted(b), f"{what}: different leaves {set(a) ^ set(b)}"
  bad = []
  for k in sorted(a):
    x, y = a[k], b[k]
    assert x.shape == y.shape and x.dtype == y.dtype, f"{what}{k}: {x.shape}{x.dtype} vs {y.shape}{y.dtype}"
    same = np.array_equal(x, y) if rtol == atol == 0 else np.allclose(x, y, rtol=rtol, atol=atol)
    if not same:
      diff = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))) if x.size else 0
      bad.append(f"{k} (max |diff| {diff:.3g})")
  assert not bad, f"{what}: {len(bad)} of {len(a)} leaves differ: {bad[:8]}"


@functools.lru_cache(maxsize=None)
def reference_run() -> str:
  """One uninterrupted run of the shared config (8 devices, one process); returns its workdir."""
  workdir = os.path.join(session_dir(), "reference")
  run_ok(workdir, *SHARED_OVERRIDES)
  return workdir
