"""SmolLM2-1.7B-shaped Q-SFT on a TPU v5e-16 slice (v5e:4x4).

FSDP over the 16 chips of 16 GiB, 64 rows x 2048 tokens (4 rows per chip), bf16 compute, layers
scanned with full rematerialisation (one [rows, L, D] activation saved per layer); theta, theta_bar,
phi and AdamW's two moments in float32. Random init (the shape only): point model.init at an HF
folder (hf:PATH) of SmolLM2-1.7B to train it.

Compile its steps for the slice on a CPU machine (row 1.7b-v5e16 of docs/scaling.md; on two slices
over the DCN, row 1.7b-2xv5e16: --num_slices=2 --config.mesh.shape.data=2
--config.bc.batch_size=128 --config.qsft.batch_size=128):

    python -m qsft_jax.aot --config=configs/pod_smollm2_1p7b.py --steps=bc,qsft

Train on the slice (a workdir every worker sees at the same path, launch/README.md):

    launch/tpu_pod.sh -n TPU_NAME -z ZONE -c configs/pod_smollm2_1p7b.py -w /gcs/BUCKET/run1 -s -u
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5e:4x4"  # the slice `python -m qsft_jax.aot` compiles for by default
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("smollm2-1.7b", batch_size=64, chunk_size=256, vocab_size=49152)
