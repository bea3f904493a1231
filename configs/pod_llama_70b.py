"""Llama-70B-shaped Q-SFT on a TPU v5p-128 slice (v5p:4x4x8, 128 chips of 95 GiB).

    python -m qsft_jax.aot --config=configs/pod_llama_70b.py

Choices: 70.6B parameters; theta, theta_bar, phi and AdamW's two moments in float32 are
5 x 282 GB = 1.41 TB, plus 282 GB of gradients: 13.2 GB per chip under FSDP over 128 chips.
128 rows x 2048 tokens (one row per chip), bf16 compute, scanned layers with full remat.
Not compiled yet (a fitting 70B program takes well over the 42 min the 8B one took on 2 shared CPU
cores); analytic float32 state + gradients 12.3 GiB per chip of 95 GiB, activations as in the 8B
config scaled by d_model and layers (docs/scaling.md, row 70b-v5p128).

Random init (the shape only); point model.init at an HF folder (hf:PATH) to train real weights.
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5p:4x4x8"
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("llama-70b", batch_size=128, vocab_size=128256)
