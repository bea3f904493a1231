"""SmolLM2-1.7B-shaped Q-SFT on a TPU v5e-16 slice (v5e:4x4).

    python -m qsft_jax.aot --config=configs/pod_smollm2_1p7b.py

Choices: Q-SFT holds theta, theta_bar, phi and AdamW's two moments: 5 x 1.71B x 4 bytes = 34 GB in
float32, plus 6.8 GB of gradients: 2.6 GB per chip under FSDP over 16 chips (v5e: 16 GiB each).
bf16 compute, layers scanned with full rematerialisation (saves one [rows, L, D] activation per layer),
64 rows x 2048 tokens (4 rows per chip). Compiled per chip on v5e:4x4: Q-SFT peak 8.9 GiB (arguments
2.0 + temporaries 6.9) of 16 GiB; BC 8.0 GiB (row 1.7b-v5e16 of docs/scaling.md). On two v5e:4x4 slices
over DCN (--num_slices=2 --mesh=data:2,fsdp:-1,tensor:1 --batch=128): Q-SFT 8.5 GiB, BC 7.7 GiB
(row 1.7b-2xv5e16).

Random init (the shape only); point model.init at an HF folder (hf:PATH) of SmolLM2-1.7B to train it.
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5e:4x4"
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("smollm2-1.7b", batch_size=64, chunk_size=256, vocab_size=49152)
