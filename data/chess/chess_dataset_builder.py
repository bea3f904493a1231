"""chess: games against Stockfish (/usr/games/stockfish) from qsft_jax.envs.

    python -m qsft_jax.data build data/chess --data_dir=DIR [--config default|small]

Generation runs the engine, so it is slow (games per second, not thousands).
"""
from qsft_jax.data.tfds_builders import TaskConfig, TaskEpisodeBuilder


class Builder(TaskEpisodeBuilder):
    """Generated chess games; one example = one game's JSON line."""

    TASK = "chess"
    BUILDER_CONFIGS = [
        TaskConfig(name="default", description="2000 paper-policy games", num_train=2000, num_validation=200),
        TaskConfig(name="small", description="10 games, for tests and smoke runs", num_train=10, num_validation=2),
    ]
