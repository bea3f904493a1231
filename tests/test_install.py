"""Installation: the requirement files' pins per Python version, setup.sh's modes and Python check, and
the README's install blocks as scripts/check_install.py reads them (offline: nothing is resolved)."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parent.parent


def _requirements(name: str, python: str) -> dict[str, Requirement]:
  """name -> Requirement of `name` (following -r) that apply on Linux with Python `python`."""
  env = {**default_environment(), "python_version": python, "python_full_version": python + ".0",
         "sys_platform": "linux", "platform_system": "Linux"}
  out = {}
  for line in (REPO / name).read_text().splitlines():
    line = line.strip()
    if line.startswith("-r "):
      out.update(_requirements(line[3:], python))
    elif line and not line.startswith("#"):
      req = Requirement(line)
      if req.marker is None or req.marker.evaluate(env):
        assert req.name not in out or req.extras, f"{name}: {req.name} pinned twice for Python {python}"
        out[req.name + "".join(f"[{e}]" for e in sorted(req.extras))] = req
  return out


@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
def test_every_set_pins_one_jax_per_python_version(python):
  runtime = _requirements("requirements.txt", python)
  jax_pin = str(runtime["jax"].specifier)
  assert jax_pin.startswith("==") and str(runtime["jaxlib"].specifier) == jax_pin
  assert str(_requirements("requirements-tpu.txt", python)["jax[tpu]"].specifier) == jax_pin
  assert str(_requirements("requirements-cuda12.txt", python)["jax[cuda12]"].specifier) == jax_pin
  test = _requirements("requirements-test.txt", python)
  assert "pytest" in test and "libtpu" in test
  # torch's CPU build is only a local wheel for Python 3.11; elsewhere the golden tests skip.
  assert ("torch" in test) == (python == "3.11")
  for name in ("requirements.txt", "requirements-tpu.txt", "requirements-cuda12.txt"):
    assert not {"torch", "pytest", "libtpu"} & set(_requirements(name, python)), name


def _setup(*args: str, python: str = "python3") -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(REPO / "scripts/setup.sh"), *args], capture_output=True, text=True,
                        timeout=60, env={**os.environ, "DRY_RUN": "1", "PYTHON": python})


def test_setup_modes_install_only_what_the_machine_needs():
  pip_lines = lambda out: [l for l in out.stdout.splitlines() if " pip install " in l]
  dev, tpu, cuda = _setup(), _setup("--tpu"), _setup("--cuda")
  for out in (dev, tpu, cuda):
    assert out.returncode == 0, out.stderr
    assert "python3 -m pip install -q --no-deps -r requirements-nodeps.txt" in out.stdout
  assert "-r requirements-test.txt" in pip_lines(dev)[0]
  assert "-r requirements-tpu.txt" in pip_lines(tpu)[0] and "requirements-test" not in tpu.stdout
  assert "-r requirements-cuda12.txt" in pip_lines(cuda)[0] and "requirements-test" not in cuda.stdout
  bad = _setup("--gpu")
  assert bad.returncode == 2 and "unknown argument '--gpu'" in bad.stderr


def test_setup_refuses_an_old_python_in_one_line(tmp_path):
  fake = tmp_path / "python3.10"  # answers setup.sh's two version probes as Python 3.10.12 would
  fake.write_text('#!/bin/sh\ncase "$2" in *python_version*) echo 3.10.12 ;; *version_info*) exit 1 ;; esac\n')
  fake.chmod(0o755)
  out = _setup("--tpu", python=str(fake))
  assert out.returncode == 1 and out.stdout == ""
  assert out.stderr.count("\n") == 1 and "is Python 3.10.12; qsft_jax needs 3.11 or newer" in out.stderr
  assert "deadsnakes" in out.stderr
  out = _setup(python=str(tmp_path / "absent"))
  assert out.returncode == 1 and "not found" in out.stderr


def test_readme_blocks_as_check_install_reads_them(capsys):
  spec = importlib.util.spec_from_file_location("check_install", REPO / "scripts/check_install.py")
  check_install = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check_install)
  blocks = check_install.readme_blocks((REPO / "README.md").read_text())
  assert [machine for machine, _, _ in blocks] == ["CPU", "TPU", "CUDA"]
  assert check_install.main(["--list"]) == 0
  text = capsys.readouterr().out
  tpu = text.split("== TPU")[1].split("== CUDA")[0]
  assert "pip: python3 -m pip install -q -r requirements-tpu.txt" in tpu
  assert "not checked: sudo add-apt-repository -y ppa:deadsnakes/ppa" in tpu
  assert "pip: python3 -m pip install -q -r requirements-cuda12.txt" in text.split("== CUDA")[1]


def test_wheels_that_need_a_newer_glibc_than_ubuntu_22_04_are_named():
  spec = importlib.util.spec_from_file_location("check_install", REPO / "scripts/check_install.py")
  check_install = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check_install)
  needs = check_install.needs_newer_glibc
  assert needs("a-1-cp311-cp311-manylinux_2_36_x86_64.whl")  # Ubuntu 22.04 has glibc 2.35
  assert not needs("jaxlib-0.10.2-cp311-cp311-manylinux_2_27_x86_64.whl")
  assert not needs("b-1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
  assert not needs("c-1-cp311-cp311-manylinux_2_39_x86_64.manylinux_2_31_x86_64.whl")  # one tag loads
  assert not needs("x-1-py3-none-any.whl") and not needs("chess-1.11.2.tar.gz")
