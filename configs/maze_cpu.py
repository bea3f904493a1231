"""Maze at CPU scale: the README's main job (a few minutes on 2 CPU cores).

    python -m qsft_jax.main --config=configs/maze_cpu.py --workdir=/tmp/qsft_maze

A 6x6 text maze (qsft_jax/envs/maze.py), 2000 episodes from the "paper" behaviour policy (20%
shortest-path / 80% random moves per step), character tokens, a ~0.4M-parameter Llama-style model.
Phase 1 trains phi by BC, phase 2 trains theta by Q-SFT from phi, then `evaluate` plays 100 maze
episodes with BC, Q-SFT extraction at several beta and the greedy p_theta / pi_phi policy.
Returns are -1 per step (the optimal average over start cells is -6.3). Expected results are
written to WORKDIR/eval/results.md; see docs/results.md for measured numbers and their controls.
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
  c.eval.betas = (0.0, 4.0, 16.0, 64.0)
  return c
