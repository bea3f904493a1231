"""Bundled text environments (Wordle, Chess, Maze, Twenty Questions) and their dataset generators.

``make_env(name, **kwargs)`` builds an environment by name; ``generate_episodes(task, num_episodes,
seed, **kwargs)`` yields episodes in the JSONL format of docs/algorithm.md section 1; ``play_batch`` steps a
list of environments together with an acting function (the evaluator drives it with the sampler).
"""
from __future__ import annotations

from qsft_jax.envs.base import StepResult, TextEnv, episode_summary, parse_action_line, play_batch
from qsft_jax.envs.chess_env import ChessEnv
from qsft_jax.envs.maze import MazeEnv
from qsft_jax.envs.registry import ENVS, make_env
from qsft_jax.envs.twenty_questions import TwentyQuestionsEnv
from qsft_jax.envs.wordle import WordleEnv


def __getattr__(name: str):
    # generate_episodes is imported on first use: importing qsft_jax.envs.generate here would make
    # `python -m qsft_jax.envs.generate` run a module that is already imported (runpy warns).
    if name == "generate_episodes":
        from qsft_jax.envs.generate import generate_episodes

        return generate_episodes
    raise AttributeError(f"module 'qsft_jax.envs' has no attribute {name!r}")


__all__ = [
    "ENVS",
    "ChessEnv",
    "MazeEnv",
    "StepResult",
    "TextEnv",
    "TwentyQuestionsEnv",
    "WordleEnv",
    "episode_summary",
    "generate_episodes",
    "make_env",
    "parse_action_line",
    "play_batch",
]
