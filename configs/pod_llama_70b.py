"""Llama-70B-shaped Q-SFT on a TPU v5p-128 slice (v5p:4x4x8, 128 chips of 95 GiB).

    python -m qsft_jax.aot --config=configs/pod_llama_70b.py

Choices: 70.6B parameters; theta, theta_bar, phi and AdamW's two moments in float32 are
5 x 282 GB = 1.41 TB, plus 282 GB of gradients: 13.2 GB per chip under FSDP over 128 chips.
128 rows x 2048 tokens (one row per chip), bf16 compute, scanned layers with full remat.
Compiled per chip on v5p:4x4x8 (--no-probes, 178 s): Q-SFT peak 24.6 GiB (arguments 10.27 = the
float32 state exactly, temporaries 14.3) of 95 GiB: fits with 70 GiB free; collectives 1.79 TB sent per
chip per step (all as all-reduces), 1.5 s at full ICI bandwidth against 3.2 s of analytic compute.
theta_bar and phi stored in bf16 (--frozen_dtype=bfloat16): 22.5 GiB. The BC step (--steps=bc
--no-probes, 109 s): peak 20.5 GiB (arguments 6.16, temporaries 14.3), collectives 1.11 TB sent per chip
per step: Q-SFT / BC 1.20x peak memory (1.10x with bf16 frozen sets), 1.61x collective bytes, 5/3
analytic FLOPs. Rows 70b-v5p128 and 70b-v5p128-bf16frozen of docs/scaling.md.

Random init (the shape only); point model.init at an HF folder (hf:PATH) to train real weights.
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5p:4x4x8"
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("llama-70b", batch_size=128, vocab_size=128256)
