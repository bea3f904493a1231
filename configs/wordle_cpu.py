"""Wordle at CPU scale, the paper's setting with a character-level model.

    python -m qsft_jax.main --config=configs/wordle_cpu.py --workdir=/tmp/qsft_wordle

Standard rules (2315 answers, 12972 allowed guesses), six guesses, reward -1 for each guess that is
not the answer (returns in [-6, 0]). The "paper" behaviour policy mixes guesses consistent with the
feedback so far and random allowed words; its dataset averages -4.12, as the paper's. A 0.3M-parameter
character model cannot memorise the word lists: expect BC near the data's average and Q-SFT's gain,
if any, to come from preferring consistent guesses (see docs/results.md for the measured numbers).
Set `--config.dataset.policy=biased` for the dataset on which greedy BC is provably poor.
"""
from qsft_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.task = "wordle"
  c.dataset.policy = "paper"
  c.dataset.num_episodes = 5000
  c.dataset.heldout_episodes = 300
  c.data.max_length = 256
  c.data.reward_transform = "terminal_return:-6,0"
  c.model.preset = "tiny-llama"
  c.bc.steps = 600
  c.qsft.steps = 600
  c.bc.batch_size = c.qsft.batch_size = 16
  # Value propagation (docs/value_propagation.md): per-turn bootstrap with a hard target copy every
  # 20 steps reached the first turn fastest on the tabular corridor MDP while ranking actions like Q*;
  # the paper's setting is one flag away: --config.qsft.targets_mode=token
  # --config.qsft.target_update_every=0 (Polyak, tau = 0.005).
  c.qsft.targets_mode = "turn"
  c.qsft.target_update_every = 20
  c.checkpoint.every_steps = 200
  c.eval.episodes = 200
  c.eval.max_new_tokens = 8
  return c
