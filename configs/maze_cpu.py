"""Maze at CPU scale with the paper-like behaviour policy (configs/maze_trap_cpu.py is the README's job).

    python -m qsft_jax.main --config=configs/maze_cpu.py --workdir=/tmp/qsft_maze

A 6x6 text maze (qsft_jax/envs/maze.py), 2000 episodes from the "paper" behaviour policy (20%
shortest-path / 80% random moves per step), character tokens, a ~0.4M-parameter Llama-style model. Phase
1 trains phi by BC, phase 2 trains theta by Q-SFT from phi (with `:paper`, the paper's Algorithm 1, from
the random initialisation phi started from, with V over the whole vocabulary) and then the
targets-equal-1 control, then `evaluate` plays 100 maze episodes with BC, Q-SFT and the control at
several beta and their greedy p_theta / pi_phi policies, and writes the held-out value diagnostics.
Returns are -1 per step (the optimal average over start cells is -6.3). On this data the most frequent
action is a shortest-path move in every cell, so greedy BC is already near-optimal (-6.9,
docs/results.md) and Q-SFT has almost nothing to add: this config checks the machinery and the value
diagnostics; maze_trap_cpu.py is the one where values decide the return.

Exact values (`python -m qsft_jax.envs.maze_values --config=configs/maze_cpu.py`: dynamic programming with
data.gamma and the reward transform, mean over the start cells, evaluation units): optimal -6.30
(transformed 0.2168), greedy in Q^beta -6.30 (0.2168), the behaviour -23.31 (0.0472). The argmax of
Q^beta is optimal at every start; it differs from Q*'s in 32 late states (8-12 moves left after many wall
bumps) that the behaviour reaches 0.08 times per episode.
"""
from qsft_jax import config_lib


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=THIS_FILE:paper`): config_lib.cpu_value_learning."""
  c = config_lib.base_config()
  c.task = "maze"
  c.dataset.policy = "paper"
  c.dataset.num_episodes = 2000
  c.dataset.heldout_episodes = 200
  c.data.max_length = 256
  # Maze returns lie in [-40, -1] (20 steps, -1 each, -1 more per wall bump); the transform maps the
  # episode's return onto its final action token in [0, 1], and gamma = 0.7 per turn makes a state's
  # value fall with its distance to G (0.7^d), so that actions' values differ by far more than the 1/39
  # per step of the undiscounted return (docs/results.md).
  c.data.reward_transform = "terminal_return:-40,-1"
  c.data.gamma = 0.7
  c.model.preset = "tiny-llama"
  c.bc.steps = 400
  c.qsft.steps = 400
  c.bc.batch_size = c.qsft.batch_size = 16
  # Q-SFT, then the control, with the value-learning settings of config_lib.cpu_value_learning (the
  # paper's: `--config=THIS_FILE:paper`).
  config_lib.cpu_value_learning(c, setting)
  c.checkpoint.every_steps = 100
  c.eval.episodes = 100
  c.eval.betas = (0.0, 16.0, 64.0)  # Q-SFT and the control at each (docs/results.md chose 64 of 1-64)
  return c
