"""Maze with a trap behaviour policy: a dataset on which greedy BC is provably suboptimal (CPU scale).

    python -m qsft_jax.main --config=configs/maze_trap_cpu.py --workdir=/tmp/qsft_maze_trap

The "trap" behaviour policy (qsft_jax/envs/policies.py) takes a wrong move most often in three cells
(about 52% of the moves there), while the shortest-path move still appears in over 30% of them and
everywhere else 80% of the moves are shortest-path moves. Greedy BC therefore walks into the traps
(its return from the empirical most-frequent actions is about -19 against the optimal -6.3 and the
data's -13), so a policy can only beat the data by weighting actions by their value. This is the
task on which Q-SFT must beat both BC and the targets-equal-1 control (docs/results.md).
"""
import os

from qsft_jax import config_lib


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=configs/maze_trap_cpu.py:paper`), as maze_cpu.py."""
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "maze_cpu.py"), setting)
  c.dataset.policy = "trap"
  return c
