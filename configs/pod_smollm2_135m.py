"""SmolLM2-135M Q-SFT on a TPU v5e-4 slice (v5e:2x2): the pod-config template at the smallest scale.

4 chips of 16 GiB, FSDP over the 4 (plain data parallelism would fit at this size, FSDP keeps the
layout of the larger configs), 32 rows x 1024 tokens, bf16 compute, scanned layers with full remat
(without remat the saved activations of 30 layers, [8, 9, 1024, 1024] f32 attention scores among
them, exceed what XLA may use of a v5e chip). Pretrained weights: model.init = "smollm2", the bundled
SmolLM2-135M-Instruct GGUF.

Compile its BC, Q-SFT and decode steps for the slice on a CPU machine (row 135m-v5e4 of
docs/scaling.md):

    python -m qsft_jax.aot --config=configs/pod_smollm2_135m.py

Train on every worker of the slice, with a workdir every worker sees at the same path (a bucket
mounted with gcsfuse; gs:// URLs are not accepted yet, launch/README.md):

    launch/tpu_pod.sh -n TPU_NAME -z ZONE -c configs/pod_smollm2_135m.py -w /gcs/BUCKET/run1 -s -u
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5e:2x2"  # the slice `python -m qsft_jax.aot` compiles for by default
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("smollm2-135m", batch_size=32, max_length=1024, chunk_size=256,
                               init="smollm2", theta_init="pretrained")
