"""Llama-70B-shaped Q-SFT on a TPU v5p-128 slice (v5p:4x4x8, 128 chips of 95 GiB).

70.6B parameters, FSDP over all 128 chips, 128 rows x 2048 tokens (one row per chip), bf16 compute,
scanned layers with full remat; theta, theta_bar, phi and AdamW's two moments in float32. Random
init (the shape only): point model.init at an HF folder (hf:PATH) to train real weights.

Train on the slice (a workdir every worker sees at the same path, launch/README.md):

    launch/tpu_pod.sh -n TPU_NAME -z ZONE -c configs/pod_llama_70b.py -w /gcs/BUCKET/run1 -s -u

after compiling its steps for the slice on a CPU machine, which shows the memory they need per chip
(rows 70b-v5p128 and, with --config.qsft.target_dtype=bfloat16 --config.qsft.behaviour_dtype=bfloat16,
70b-v5p128-bf16frozen of docs/scaling.md; the cost probes of this size take well over 10 minutes,
hence --no-probes):

    python -m qsft_jax.aot --config=configs/pod_llama_70b.py --no-probes --steps=bc,qsft
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5p:4x4x8"  # the slice `python -m qsft_jax.aot` compiles for by default
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("llama-70b", batch_size=128, vocab_size=128256)
