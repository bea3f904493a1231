"""qsft_jax: Q-SFT (Q-learning as weighted supervised fine-tuning) for language models, in JAX/Flax."""

__version__ = "0.1.0"
