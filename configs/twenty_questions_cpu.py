"""Twenty Questions against the scripted oracle, with a trap behaviour policy, at CPU scale.

    python -m qsft_jax.main --config=configs/twenty_questions_cpu.py --workdir=/tmp/qsft_twenty_questions

The game (qsft_jax/envs/twenty_questions.py): 16 hidden objects (`object_subset(16)`, evenly spaced over
the 176 of the knowledge base: cat, hamster, bat, ostrich, deer, peach, cucumber, ice cream, steak, door,
cup, blanket, basket, tram, tractor, trumpet), yes/no attribute questions and guesses, -1 per question
that is not the right guess, at most 20 questions (returns in [-20, 0]); the optimal expected return is
-3.5 (exact, `TwentyQuestionsEnv(num_objects=16).expected_optimal_return()`). The "trap" behaviour policy
(qsft_jax/envs/policies.py) asks the redundant "Is it red?" (no object of the game is red) 50% of the time
at every question, guesses a random consistent object 10% of the time and otherwise asks the question that
halves the objects left (a guess when three or fewer remain), which is optimal. The redundant question is
the most frequent action wherever two or more objects remain, the first question included, so greedy BC
asks it until the 20 questions run out (-20). Dataset mean return -8.4 (success 0.99).

Phases: BC, Q-SFT and the targets-equal-1 control with config_lib.cpu_value_learning, then 200
evaluation episodes per policy and the held-out value diagnostics. A second seed: `--config.seed=1
--config.dataset.seed=100` (initialisation, data order, training and held-out data). The paper's phase-2
setting: `--config=configs/twenty_questions_cpu.py:paper`.
Expected (docs/results.md, "Twenty Questions", three seeds, mean +- stderr across seeds, 100 episodes
each): BC -20.0 on every seed, the control -17.6 +- 2.4, Q-SFT -4.38 +- 0.23 (optimal -3.5); held-out
value correlation over all turns 0.60 (Q-SFT) against -0.06 (control). Training alone on a lightly
loaded machine: 8.5 minutes.
"""
from qsft_jax import config_lib


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=THIS_FILE:paper`): config_lib.cpu_value_learning."""
  c = config_lib.base_config()
  c.task = "twenty_questions"
  c.env.num_objects = 16
  c.dataset.policy = "trap"
  c.dataset.num_episodes = 5000
  c.dataset.heldout_episodes = 300
  # Every trap-policy episode fits in 384 characters (mean 192; 20 redundant questions take 336).
  c.data.max_length = 384
  # The normalised return on the final question, discounted by 0.7 per question: finding sooner is worth more.
  c.data.reward_transform = "terminal_return:-20,0"
  c.data.gamma = 0.7
  c.model.preset = "tiny-llama"
  # A whole 20-question game must fit the model's context at evaluation, however long its questions:
  # 37 + 19 * (30 + 20) characters before the last question, plus its 30 (RoPE: no parameters change).
  c.model.overrides.max_position_embeddings = 1024
  c.bc.steps = 500
  c.qsft.steps = 400
  c.bc.batch_size = c.qsft.batch_size = 16
  # Q-SFT, then the control, with the value-learning settings of config_lib.cpu_value_learning (the
  # paper's: `--config=THIS_FILE:paper`).
  config_lib.cpu_value_learning(c, setting)
  c.checkpoint.every_steps = 100
  c.eval.episodes = 200
  c.eval.batch_size = 100
  c.eval.max_new_tokens = 30  # the longest question the policies ask, "Does it come from an animal?", and "\n"
  c.eval.betas = (0.0, 4.0, 16.0, 64.0)
  return c
