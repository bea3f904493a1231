"""jsonl_episodes: your own JSONL episodes (docs/algorithm.md section 1) as an array_record TFDS dataset.

    python -m qsft_jax.data build data/jsonl_episodes --data_dir=DIR --manual_dir=YOUR_JSONL_DIR

Files named train*.jsonl / validation*.jsonl / test*.jsonl go to those splits; otherwise all to train.
"""
from qsft_jax.data.tfds_builders import JsonlEpisodeBuilder


class Builder(JsonlEpisodeBuilder):
    """A user's JSONL episodes; one example = one episode's JSON line."""
