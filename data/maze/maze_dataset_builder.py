"""maze: text-maze episodes from qsft_jax.envs (behaviour policies "paper" and "trap").

    python -m qsft_jax.data build data/maze --data_dir=DIR [--config default|trap|small]
"""
from qsft_jax.data.tfds_builders import TaskConfig, TaskEpisodeBuilder


class Builder(TaskEpisodeBuilder):
    """Generated maze episodes; one example = one episode's JSON line."""

    TASK = "maze"
    BUILDER_CONFIGS = [
        TaskConfig(name="default", description="5000 paper-policy episodes", num_train=5000, num_validation=500),
        TaskConfig(name="trap", description="5000 episodes of the trap policy", num_train=5000, num_validation=500, policy="trap"),
        TaskConfig(name="small", description="200 episodes, for tests and smoke runs", num_train=200, num_validation=20),
    ]
