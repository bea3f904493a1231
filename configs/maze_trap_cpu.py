"""Maze with a trap behaviour policy: the README's main job, on data where greedy BC is provably poor.

    python -m qsft_jax.main --config=configs/maze_trap_cpu.py --workdir=/tmp/qsft_maze

The "trap" behaviour policy (qsft_jax/envs/policies.py) takes a wrong move most often in three cells
(about 52% of the moves there), while the shortest-path move still appears in over 30% of them and
everywhere else 80% of the moves are shortest-path moves. Greedy BC therefore walks into the traps
(its return from the empirical most-frequent actions is about -19 against the optimal -6.3 and the
data's -13), so a policy can only beat the data by weighting actions by their value.

Phases: BC (400 steps), Q-SFT (400) and the targets-equal-1 control (400, same batches), then 100
evaluation episodes per policy and the held-out value diagnostics; settings from maze_cpu.py
(config_lib.cpu_value_learning). Expected (docs/results.md, measured on 2 shared CPU cores): BC about
-20 (success 6%), the control at best -16.5 (beta 64), Q-SFT -8.3 +- 0.8 at beta 64 (success 95%),
value correlation at the first turn about 0.9 for Q-SFT and about 0 for the control. The paper's
phase-2 setting: `--config=configs/maze_trap_cpu.py:paper`.

Exact values (`python -m qsft_jax.envs.maze_values --config=configs/maze_trap_cpu.py`, as maze_cpu.py):
optimal -6.30 (transformed 0.2168), greedy in Q^beta -6.30 (0.2168), the behaviour -12.91 (0.1057); the
argmax of Q^beta is optimal in every state. One step of policy improvement over this behaviour is already
optimal, so Monte Carlo returns (return-weighted regression, qsft.mc_mix=1) can reach the optimum here
without bootstrapping; configs/maze_stitch_cpu.py is the task where they cannot.
"""
import os

from qsft_jax import config_lib


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=configs/maze_trap_cpu.py:paper`), as maze_cpu.py."""
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "maze_cpu.py"), setting)
  c.dataset.policy = "trap"
  return c
