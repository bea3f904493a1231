"""Test set-up: every test runs on the CPU with 8 simulated devices.

The flags must be set before jax is first imported, which is why they live here.
Single-device tests simply place arrays on jax.devices()[0] or use no sharding.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402  (after the flags above, which must precede jax's first import)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer of the offline GGUF, loaded once per session (seconds)."""
    from qsft_jax.tokenizers import load_tokenizer

    return load_tokenizer("smollm2")
