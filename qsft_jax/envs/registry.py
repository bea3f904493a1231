"""Environments by name."""
from __future__ import annotations

from qsft_jax.envs.base import TextEnv
from qsft_jax.envs.chess_env import ChessEnv
from qsft_jax.envs.maze import MazeEnv
from qsft_jax.envs.twenty_questions import TwentyQuestionsEnv
from qsft_jax.envs.wordle import WordleEnv

ENVS: dict[str, type[TextEnv]] = {"wordle": WordleEnv, "chess": ChessEnv, "maze": MazeEnv,
                                  "twenty_questions": TwentyQuestionsEnv}


def make_env(name: str, **kwargs) -> TextEnv:
    """The environment called ``name`` ("wordle", "chess", "maze", "twenty_questions") built with ``kwargs``."""
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}; known: {sorted(ENVS)}")
    return ENVS[name](**kwargs)
