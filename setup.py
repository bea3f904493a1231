"""qsft_jax: offline multi-turn RL for language models with Q-SFT, in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="qsft_jax",
    version="0.1.0",
    description="Q-SFT: offline multi-turn RL for language models as weighted supervised fine-tuning, in JAX",
    packages=find_packages(include=["qsft_jax", "qsft_jax.*"]),
    package_data={"qsft_jax.kernels": ["csrc/*.cc"]},  # the CPU decode-attention kernel, compiled on first use
    python_requires=">=3.11",
    install_requires=requirements,
)
