"""Llama-3-8B-shaped Q-SFT on a TPU v5p-128 slice (v5p:4x4x8, 128 chips of 95 GiB).

8.03B parameters (untied 128256-token embedding and unembedding), FSDP over all 128 chips, 256 rows
x 2048 tokens (2 rows per chip), bf16 compute, scanned layers with full remat; theta, theta_bar, phi
and AdamW's two moments in float32. Random init (the shape only): point model.init and the tokenizer
at an HF folder of Llama-3-8B (hf:PATH) to train it.

Compile its steps for the slice on a CPU machine (rows 8b-v5p128 and, with
--config.qsft.target_dtype=bfloat16 --config.qsft.behaviour_dtype=bfloat16, 8b-v5p128-bf16frozen of
docs/scaling.md; with
--topology=v5e:4x4 --config.bc.batch_size=16 --config.qsft.batch_size=16, row 8b-v5e16):

    python -m qsft_jax.aot --config=configs/pod_llama3_8b.py --steps=qsft

Train on the slice (a workdir every worker sees at the same path, launch/README.md):

    launch/tpu_pod.sh -n TPU_NAME -z ZONE -c configs/pod_llama3_8b.py -w /gcs/BUCKET/run1 -s -u
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5p:4x4x8"  # the slice `python -m qsft_jax.aot` compiles for by default
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("llama3-8b", batch_size=256, vocab_size=128256)
