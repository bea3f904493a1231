"""Wordle with a trap behaviour policy: the second task on which greedy BC is provably poor.

    python -m qsft_jax.main --config=configs/wordle_trap_cpu.py --workdir=/tmp/qsft_wordle_trap

A smaller game than wordle_cpu.py, sized for the ~0.4M-parameter character model: 64 answers
(`answer_subset(64)`, evenly spaced over the 2315; the 12972 allowed guesses are unchanged), six
guesses, -1 per guess that is not the answer, and an invalid word ends the game as a loss (return -6).
The "trap" behaviour policy (qsft_jax/envs/policies.py) guesses the invalid "xxxxx" 40% of the time at
every turn, which makes it the single most frequent guess wherever two or more answers remain; the rest
of the time it opens with "arose" (30% of first guesses) or guesses a random answer consistent with
the feedback so far. Dataset mean return -4.69 (success 0.28, 5000 episodes); the same policy without
the trap (opening "arose", then consistent guesses) averages -1.41. Greedy BC opens with the trap (-6),
and so does the control; only weighting the guesses by value recovers the consistent play.

Training and evaluation settings are wordle_cpu.py's (config_lib.cpu_value_learning): 600 BC steps, 400
Q-SFT and 400 control steps, about 12 minutes on 2 idle CPU cores. Expected (docs/results.md, "Wordle,
trap behaviour policy", 200 episodes): BC -6.0 and the control -6.0 (both open with the trap), Q-SFT
-2.37 +- 0.15 at beta 64 (success 0.76); held-out value correlation at the first guess 0.51 for Q-SFT
(the data's ceiling is 0.51) and -0.12 for the control. With `--config.seed=1 --config.dataset.seed=100`:
Q-SFT -2.20 +- 0.13, correlation 0.45 (ceiling 0.46). The paper's phase-2 setting:
`--config=configs/wordle_trap_cpu.py:paper`.
"""
import os

from qsft_jax import config_lib


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=configs/wordle_trap_cpu.py:paper`), as wordle_cpu.py."""
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "wordle_cpu.py"), setting)
  c.dataset.policy = "trap"
  c.env.num_answers = 64
  c.env.invalid = "end"
  return c
