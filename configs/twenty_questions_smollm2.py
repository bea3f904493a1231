"""Q-SFT from a pretrained model: SmolLM2-135M-Instruct with LoRA, in chat format, on Twenty Questions.

    python experiments/pretrained_twenty_questions.py --root /tmp/qsft_pretrained

runs everything (experiments/README.md): the three phases of this config, scripts/results.py on them,
then the character model (`--config=configs/twenty_questions_smollm2.py:char`) on the same data for the
same wall time, its results, and a summary. One phase alone:

    python -m qsft_jax.main --config=configs/twenty_questions_smollm2.py --workdir=DIR \
        --config.eval.enabled=False

Why Twenty Questions. The paper uses pretrained weights for it, and the scripted-oracle game has a
behaviour policy on which greedy BC is provably poor (the trap below; docs/results.md, "Twenty
Questions"). The full Wordle (2315 answers, the trap in the data) cannot show anything in this budget:
with the trap ("xxxxx", 40% per guess) the data average -5.43 (success 0.16), and once a policy stops
guessing the trap it still scores about -6 unless it guesses consistently with the feedback over 2315
answers, which a 135M model does not learn from a few thousand episodes in an hour of CPU; BC, the
control and Q-SFT would all sit near -6. In Twenty Questions avoiding the trap is worth most of the
return on its own, and the questions are short English, which the instruct model already writes.

The game (qsft_jax/envs/twenty_questions.py), as configs/twenty_questions_cpu.py but with at most 10
questions: 16 hidden objects, yes/no attribute questions and guesses, -1 per question that is not the
right guess (returns in [-10, 0]); the optimal expected return is -3.5, reached within 5 questions.
The "trap" behaviour asks the redundant "Is it red?" 50% of the time at every question, guesses a random
consistent object 10%, and otherwise asks the question that halves the objects left; greedy BC asks
"Is it red?" until the questions run out (-10). Ten questions rather than twenty halve what a trapped
game costs to evaluate (a 135M model re-reads the whole history at every question): 205 tokens at most
in chat format, against 374. Dataset (5000 episodes): mean return -7.46, success 0.68; chat tokens per
episode with this system prompt and SmolLM2's ChatML template: mean 170, at most 205.

Model. SmolLM2-135M-Instruct from the offline GGUF (`model.init=smollm2`, `tokenizer=smollm2`), chat
format (`data.format="chat"`: observations are user messages, questions assistant messages, the
action ends at <|im_end|>), LoRA rank 8 (alpha 16) on every attention and MLP projection over a float32
base with float32 compute: on this 2-core CPU a [4, 384] LoRA step took 6.9 s (BC) and 9.5 s (Q-SFT)
with float32 base and compute, 7.0 s / 16-18 s with a bfloat16 base, 8.5-9.8 s / 11-15 s with bfloat16
compute (load average of the 2 cores about 1.5 during the float32 runs, 1.4-2.6 and 2.2-3.7 during the
others, so part of the gap is load; float32 was never slower, and the base's 540 MB fit easily).

Value learning: config_lib.cpu_value_learning, except the dummy token: its default (the character
tokenizer's unk, id 3) would be a real token of SmolLM2's vocabulary ("<repo_name>"); with 49152 tokens
the even spread of 1 - w (`qsft.dummy_token=-1`) biases a ratio by at most (1 - w) / (49151 * 0.01)
< 0.003 over the support (pi_phi >= qsft.support_min = 0.01), so no dummy is needed. A hard target copy
every 15 steps (4 copies in 60 steps).

Budget (one idle 2-core CPU, about 3 hours in all; the experiment records the measured wall time of
every phase). Batches of 8 rows of 384 tokens (about 16 episodes; a step ~14 s for BC, ~19 s for Q-SFT
and the control, from the [4, 384] step times above): BC 80 steps (~19 min), Q-SFT 60 steps (~19 min),
the control 60 steps (~19 min). scripts/results.py: beta among 4, 16, 64 on 32 separate episodes
each, 64 evaluation episodes per policy, held-out value diagnostics on 200 episodes, ~45 min (up to
~60 if every policy but Q-SFT stays in the trap: each question re-reads the whole history, ~1900
prompt tokens per row over a 10-question game). The character model for the same training wall time
(~57 min) and its results (~10 min). A checkpoint every 15 steps: an interrupted phase loses at most
~5 minutes. The measured wall time of each phase is in docs/results.md.

Result (docs/results.md, "Twenty Questions from a pretrained model"): at this budget Q-SFT does not
leave the trap: BC, the control and Q-SFT all score -10 (dataset -7.52). 60 LoRA steps leave p_theta /
pi_phi far below its targets and unordered by return (held-out correlation 0.02). The character model
(`:char`) trained on the same data for the same wall time (3091 Q-SFT steps) does: Q-SFT -3.66 +- 0.09
(optimum -3.5) against -10 for its BC and its control, held-out correlation 0.54.

setting "char" (`--config=configs/twenty_questions_smollm2.py:char`): the ~0.4M-parameter character
model of configs/twenty_questions_cpu.py on the same game and the same data (same task, env, dataset
and reward fields, so the generated files are identical), plain format; its step counts are set on the
command line by the experiment from the measured wall time.
"""
import os

import ml_collections

from qsft_jax import config_lib

SETTINGS = ("", "char")
SYSTEM_PROMPT = ("You are playing Twenty Questions. Find the hidden object: ask one yes/no question per "
                 "turn, or guess it with \"Is it a ...?\".")


def _game(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The game, data and rewards both models share: twenty_questions_cpu.py's (16 objects, the trap
  behaviour, 5000 episodes, gamma 0.7 per question) with at most 10 questions."""
  c.env.max_questions = 10
  c.dataset.heldout_episodes = 200
  # The normalised return on the final question, discounted by 0.7 per question.
  c.data.reward_transform = "terminal_return:-10,0"
  c.log.value_diagnostics_every = 0  # held-out diagnostics once, by scripts/results.py
  c.eval.betas = (4.0, 16.0, 64.0)
  c.eval.episodes = 64
  c.eval.batch_size = 64
  return c


def get_config(setting: str = ""):
  """setting: "" (SmolLM2-135M-Instruct, LoRA, chat format) or "char" (the character model)."""
  if setting not in SETTINGS:
    raise config_lib.ConfigError(f"config file argument: {setting!r} is not one of {SETTINGS} (e.g. "
                                 "--config=configs/twenty_questions_smollm2.py:char)")
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "twenty_questions_cpu.py"))
  c = _game(c)
  if setting == "char":
    return c
  c.tokenizer = "smollm2"
  c.model.init = "smollm2"
  c.model.preset = "smollm2-135m"
  c.model.overrides = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32"))
  c.model.lora.rank = 8
  c.model.lora.alpha = 16.0
  c.model.lora.base_dtype = "float32"
  c.data.format = "chat"
  c.data.system_prompt = SYSTEM_PROMPT
  # Every episode fits in 205 tokens: mean 170, so most rows hold two packed episodes.
  c.data.max_length = 384
  c.bc.steps = 80
  c.qsft.steps = 60
  c.bc.batch_size = c.qsft.batch_size = 8
  c.bc.learning_rate = c.qsft.learning_rate = 5e-4
  c.bc.warmup_steps = c.qsft.warmup_steps = 10
  c.qsft.dummy_token = -1
  c.qsft.target_update_every = 15
  c.checkpoint.every_steps = 15
  c.log.every_steps = 10
  # The longest question of the knowledge base is 8 tokens ("Is it bigger than a breadbox?"), then <|im_end|>.
  c.eval.max_new_tokens = 16
  return c
