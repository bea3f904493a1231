"""qsft_jax.platforms: JAX_PLATFORMS=cpu where libtpu would only print start-up errors, nothing elsewhere."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from qsft_jax import platforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
no_libtpu = importlib.util.find_spec("libtpu") is None


def _env_without_platforms() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.mark.skipif(no_libtpu or platforms.has_tpu_chips(), reason="needs libtpu on a host without TPU chips")
def test_import_silences_libtpu_on_a_host_without_tpu():
  # jax first, then qsft_jax: the setting must still reach jax before its backends start.
  code = ("import os, jax, qsft_jax; print(os.environ['JAX_PLATFORMS'], jax.devices()[0].platform)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=_env_without_platforms())
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["cpu", "cpu"]
  for word in ("TPU", "libtpu", "common_lib"):
    assert word not in out.stderr, out.stderr


def test_explicit_and_accelerator_hosts_are_left_alone(monkeypatch):
  monkeypatch.setattr(platforms.importlib.util, "find_spec", lambda name: object())
  monkeypatch.setattr(platforms, "has_tpu_chips", lambda: False)
  monkeypatch.setattr(platforms, "_has_nvidia_gpu", lambda: False)
  for value in ("", "tpu,cpu"):  # set, even empty: the user's choice
    monkeypatch.setenv("JAX_PLATFORMS", value)
    assert platforms.default_jax_platforms() is None and os.environ["JAX_PLATFORMS"] == value
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(platforms, "has_tpu_chips", lambda: True)
  assert platforms.default_jax_platforms() is None and "JAX_PLATFORMS" not in os.environ
  monkeypatch.setattr(platforms, "has_tpu_chips", lambda: False)
  monkeypatch.setattr(platforms, "_has_nvidia_gpu", lambda: True)
  assert platforms.default_jax_platforms() is None and "JAX_PLATFORMS" not in os.environ
  monkeypatch.setattr(platforms, "_has_nvidia_gpu", lambda: False)
  monkeypatch.setattr(platforms.importlib.util, "find_spec", lambda name: None)  # no libtpu: nothing prints
  assert platforms.default_jax_platforms() is None and "JAX_PLATFORMS" not in os.environ
  monkeypatch.setattr(platforms.importlib.util, "find_spec", lambda name: object())
  # This process's backends are already initialised: only the variable is set, jax.config is untouched.
  assert platforms.default_jax_platforms() == "cpu" and os.environ["JAX_PLATFORMS"] == "cpu"
