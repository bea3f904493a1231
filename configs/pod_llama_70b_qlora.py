"""Llama-70B-shaped QLoRA Q-SFT on a TPU v6e-64 slice (v6e:8x8, 64 chips of 32 GiB).

70.6B parameters in ONE frozen base whose attention and MLP kernels are stored in 4-bit NormalFloat
(model.lora.quantization = "nf4": blocks of 64, float32 block scales; embedding, unembedding and norms
in bf16), shared by phi, theta and theta_bar, which are rank-16 adapters (alpha 32) on every one of
those projections (float32 adapters and AdamW moments); FSDP over all 64 chips, 64 rows x 2048 tokens
(one row per chip), bf16 compute, scanned layers with full remat. Full fine-tuning of this model on
this slice does not fit (row 70b-v6e64 of docs/scaling.md). Random init (the shape only): point
model.init at an HF folder (hf:PATH) to train real weights (they are quantised when the base is built).

Compile its steps for the slice on a CPU machine (row 70b-v6e64-qlora of docs/scaling.md):

    python -m qsft_jax.aot --config=configs/pod_llama_70b_qlora.py --no-probes --steps=qsft,bc

Train on the slice (a workdir every worker sees at the same path, launch/README.md):

    launch/tpu_pod.sh -n TPU_NAME -z ZONE -c configs/pod_llama_70b_qlora.py -w /gcs/BUCKET/run1 -s -u
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v6e:8x8"  # the slice `python -m qsft_jax.aot` compiles for by default
AOT_NUM_SLICES = 1


def get_config():
  c = config_lib.pod_config("llama-70b", batch_size=64, vocab_size=128256)
  c.model.lora.rank = 16
  c.model.lora.alpha = 32.0
  c.model.lora.quantization = "nf4"
  return c
