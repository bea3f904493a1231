"""Llama-3-8B-shaped Q-SFT on a TPU v5p-128 slice (v5p:4x4x8, 128 chips of 95 GiB).

    python -m qsft_jax.aot --config=configs/pod_llama3_8b.py

Choices: 8.03B parameters (untied 128256-token embedding and unembedding); theta, theta_bar, phi and
AdamW's two moments in float32 are 5 x 32.1 GB = 161 GB, plus 32 GB of gradients: 1.5 GB per chip
under FSDP over all 128 chips, so the state is small next to 95 GiB and the batch can be large:
256 rows x 2048 tokens (2 rows per chip), bf16 compute, scanned layers with full remat.
Compiled per chip on v5p:4x4x8: Q-SFT peak 7.3 GiB (arguments 1.17 = the float32 state exactly, temporaries
6.2) of 95 GiB: fits; roofline 820 ms/step, compute-bound, MFU <= 88%; collectives 341 GB sent per chip
per step (XLA makes the FSDP gathers and gradient reductions all-reduces), 285 ms at full ICI bandwidth
(row 8b-v5p128 of docs/scaling.md). theta_bar and phi stored in bf16 (--frozen_dtype=bfloat16): peak
7.1 GiB (row 8b-v5p128-bf16frozen). The BC step (--steps=bc --no-probes, 116 s): peak 6.9 GiB (arguments
0.70, temporaries 6.2), collectives 219 GB sent per chip per step: Q-SFT / BC 1.07x peak memory, 1.56x
collective bytes, 5/3 analytic FLOPs. On a v5e:4x4 slice (--topology=v5e:4x4 --batch=16, one row per
chip) the Q-SFT step fits too: 13.9 GiB (arguments 9.35 + temporaries 4.5) of 16 GiB (row 8b-v5e16);
its BC step peaks higher, 15.6 GiB (arguments 5.6 + temporaries 10.0; 0.4 GiB free), collectives 171 GB
against Q-SFT's 260 GB.

Random init (the shape only); point model.init at an HF folder (hf:PATH) of Llama-3-8B and the
tokenizer at the same folder to train it.
"""
from qsft_jax import config_lib

AOT_TOPOLOGY = "v5p:4x4x8"
AOT_NUM_SLICES = 1


def get_config():
  return config_lib.pod_config("llama3-8b", batch_size=256, vocab_size=128256)
