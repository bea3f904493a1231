"""Wordle at CPU scale, the paper's setting with a character-level model.

    python -m qsft_jax.main --config=configs/wordle_cpu.py --workdir=/tmp/qsft_wordle

Standard rules (2315 answers, 12972 allowed guesses), six guesses, reward -1 for each guess that is
not the answer (returns in [-6, 0]). The "paper" behaviour policy mixes guesses consistent with the
feedback so far and random allowed words; its dataset averages -4.12, as the paper's. Set
`--config.dataset.policy=biased` for a dataset whose most frequent guesses are wrong (a poor opening,
then repeats). Expected on the biased data (docs/results.md, "Wordle, biased behaviour policy"): the
~0.4M-parameter character model cannot spell words from 2315 answers, so BC, the control and Q-SFT
all score -6, while Q-SFT's held-out value correlation at guesses 3-6 is about 0.5 (the control's at
most 0.25). The paper-like data is not measured. configs/wordle_trap_cpu.py is the Wordle on which
Q-SFT beats BC.
"""
from qsft_jax import config_lib


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=THIS_FILE:paper`): config_lib.cpu_value_learning."""
  c = config_lib.base_config()
  c.task = "wordle"
  c.dataset.policy = "paper"
  c.dataset.num_episodes = 5000
  c.dataset.heldout_episodes = 300
  c.data.max_length = 256
  # The normalised return on the final guess, discounted by 0.7 per guess: solving sooner is worth more.
  c.data.reward_transform = "terminal_return:-6,0"
  c.data.gamma = 0.7
  c.model.preset = "tiny-llama"
  c.bc.steps = 600
  c.qsft.steps = 400
  c.bc.batch_size = c.qsft.batch_size = 16
  # Q-SFT, then the control, with the value-learning settings of config_lib.cpu_value_learning (the
  # paper's: `--config=THIS_FILE:paper`).
  config_lib.cpu_value_learning(c, setting)
  c.checkpoint.every_steps = 100
  c.eval.episodes = 200
  c.eval.max_new_tokens = 8
  c.eval.betas = (0.0, 4.0, 16.0, 64.0)
  return c
