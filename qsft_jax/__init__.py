"""qsft_jax: Q-SFT (Q-learning as weighted supervised fine-tuning) for language models, in JAX/Flax."""

from qsft_jax import platforms as _platforms

__version__ = "0.1.0"

# Before any backend starts: no libtpu start-up errors on hosts without TPU chips (qsft_jax/platforms.py).
_platforms.default_jax_platforms()
