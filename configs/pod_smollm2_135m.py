"""SmolLM2-135M Q-SFT on a TPU v5e-4 slice (v5e:2x2): the pod-config template at the smallest scale.

Check it on a CPU machine before launching (libtpu installed; compiles BC, Q-SFT and decode steps):

    python -m qsft_jax.aot --config=configs/pod_smollm2_135m.py

Choices: 4 chips of 16 GiB; all three parameter sets (theta, theta_bar, phi) and AdamW's two moments
in float32 are 5 x 0.54 GB = 2.7 GB, so plain data parallelism would fit, but FSDP over the 4 chips
costs nothing at this size and keeps the layout of the larger configs. bf16 compute, scanned layers
with full remat: without remat the compiled Q-SFT step needs 21.25 GB of temporaries per chip at
32 x 1024 tokens (the saved activations of 30 layers, including [8, 9, 1024, 1024] f32 attention
scores per layer), more than the 15.75 GB XLA can use on a v5e chip.
Compiled per chip on v5e:2x2 (qsft_jax.aot): Q-SFT peak 2.4 GiB (arguments 0.7 + temporaries 1.7) of 16 GiB;
BC 2.0 GiB. Row 135m-v5e4 of docs/scaling.md.

Train with the pretrained weights (model.init = "smollm2": the bundled SmolLM2-135M-Instruct GGUF) on
every worker of the slice, with a workdir every worker sees at the same path (a bucket mounted with
gcsfuse; gs:// URLs are not accepted yet, launch/README.md):

    launch/tpu_pod.sh -n TPU_NAME -z ZONE -c configs/pod_smollm2_135m.py -w /gcs/BUCKET/run1 -s -u
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5e:2x2"  # read by qsft_jax.aot and scripts/scaling_table.py
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("smollm2-135m", batch_size=32, max_length=1024, chunk_size=256,
                               init="smollm2", theta_init="pretrained")
