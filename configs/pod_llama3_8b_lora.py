"""Llama-3-8B-shaped LoRA Q-SFT on small slices: a TPU v5e-8 (v5e:2x4, 8 chips of 16 GiB) or a v4-8
(v4:2x2x1, 4 chips of 32 GiB).

8.03B parameters (untied 128256-token embedding and unembedding) in ONE frozen bf16 base, shared by phi,
theta and theta_bar, which are rank-16 adapters (alpha 32) on every attention and MLP projection
(model.lora; float32 adapters and AdamW moments); FSDP over every chip, 8 rows x 2048 tokens, bf16
compute, scanned layers with full remat. Full fine-tuning of this model on either slice does not fit
(rows 8b-v5e8 and 8b-v4-4 of docs/scaling.md). Random init (the shape only): point model.init and
the tokenizer at an HF folder of Llama-3-8B (hf:PATH) to train it.

Compile its steps for the slice on a CPU machine (row 8b-v5e8-lora of docs/scaling.md; with
--topology=v4:2x2x1, row 8b-v4-4-lora):

    python -m qsft_jax.aot --config=configs/pod_llama3_8b_lora.py --no-probes --steps=qsft,bc

Train on the slice (a workdir every worker sees at the same path, launch/README.md):

    launch/tpu_pod.sh -n TPU_NAME -z ZONE -c configs/pod_llama3_8b_lora.py -w /gcs/BUCKET/run1 -s -u
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5e:2x4"  # the slice `python -m qsft_jax.aot` compiles for by default
AOT_NUM_SLICES = 1


def get_config():
  c = config_lib.pod_config("llama3-8b", batch_size=8, vocab_size=128256)
  c.model.lora.rank = 16
  c.model.lora.alpha = 32.0
  return c
