"""Maze stitching task: placeholder docstring."""
import os

from qsft_jax import config_lib

LAYOUT = (
    ".....",
    ".###G",
    ".###.",
    ".###.",
    ".....",
)
EVAL_STARTS = ((0, 0), (0, 1), (1, 0), (2, 0))


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=configs/maze_stitch_cpu.py:paper`), as maze_cpu.py."""
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "maze_cpu.py"), setting)
  c.env.layout = LAYOUT
  c.env.starts = EVAL_STARTS
  c.dataset.policy = "detour"
  data_starts = tuple((r, col) for r, row in enumerate(LAYOUT) for col, ch in enumerate(row) if ch == ".")
  c.dataset.options = {"starts": data_starts, "avoid": ("0,4",), "optimal_prob": 0.8}
  return c
