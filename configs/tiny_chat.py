"""configs/tiny.py in chat format: SmolLM2's BPE tokenizer and its ChatML template, a tiny random model.

    python -m qsft_jax.main --config=configs/tiny_chat.py --workdir=/tmp/qsft_tiny_chat

Checks the chat-format machinery end to end (data/chat.py, acting through mdp.prompt_tokens and the
end-of-turn stop); the model is random and its vocabulary SmolLM2's 49152 tokens, so expect nothing
learned. For SmolLM2's own weights add --config.model.init=smollm2 --config.model.lora.rank=4.
"""
import os

from qsft_jax import config_lib


def get_config():
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "tiny.py"))
  c.tokenizer = "smollm2"
  c.data.format = "chat"
  c.data.system_prompt = "You are in a maze. Answer with one move."
  c.data.max_length = 384
  c.model.overrides = {**c.model.overrides, "max_position_embeddings": 2048}
  return c
