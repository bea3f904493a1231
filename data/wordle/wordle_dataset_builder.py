"""wordle: Wordle episodes from qsft_jax.envs (behaviour policies "paper" and "biased").

    python -m qsft_jax.data build data/wordle --data_dir=DIR [--config default|biased|small]
"""
from qsft_jax.data.tfds_builders import TaskConfig, TaskEpisodeBuilder


class Builder(TaskEpisodeBuilder):
    """Generated Wordle episodes; one example = one episode's JSON line."""

    TASK = "wordle"
    BUILDER_CONFIGS = [
        TaskConfig(name="default", description="5000 paper-policy episodes", num_train=5000, num_validation=500),
        TaskConfig(name="biased", description="5000 biased-policy episodes", num_train=5000, num_validation=500, policy="biased"),
        TaskConfig(name="small", description="200 episodes, for tests and smoke runs", num_train=200, num_validation=20),
    ]
