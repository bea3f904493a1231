"""twenty_questions: Twenty Questions episodes from qsft_jax.envs (behaviour policies "paper" and "trap").

    python -m qsft_jax.data build data/twenty_questions --data_dir=DIR [--config default|trap|small]
"""
from qsft_jax.data.tfds_builders import TaskConfig, TaskEpisodeBuilder


class Builder(TaskEpisodeBuilder):
    """Generated Twenty Questions episodes; one example = one episode's JSON line."""

    TASK = "twenty_questions"
    BUILDER_CONFIGS = [
        TaskConfig(name="default", description="5000 paper-policy episodes, all 176 objects", num_train=5000,
                   num_validation=500),
        TaskConfig(name="trap", description="5000 trap-policy episodes, the 16-object game of "
                   "configs/twenty_questions_cpu.py", num_train=5000, num_validation=500, policy="trap",
                   options={"num_objects": 16}),
        TaskConfig(name="small", description="200 episodes, for tests and smoke runs", num_train=200, num_validation=20),
    ]
