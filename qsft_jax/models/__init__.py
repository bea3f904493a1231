"""Model family: configs, the Flax transformer, KV cache and parameter-layout helpers."""
from qsft_jax.models.config import (ModelConfig, flops_per_token, from_hf_config, get_preset,
                                    param_count, preset_names)
from qsft_jax.models.transformer import (PAD_LOGIT, Transformer, cache_logical_axes, init_cache,
                                         logits_from_hidden, mask_padded_vocab, stack_layers, unembedding,
                                         unstack_layers)
