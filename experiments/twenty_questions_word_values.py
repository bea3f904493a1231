"""Q-SFT's and the control's values where Twenty Questions' questions part: the word after "Is it".

    python experiments/twenty_questions_word_values.py --workdir=ROOT/pretrained

Every question starts "Is it", so the first action token says nothing of a question's value (the
turn-0 correlation of docs/results.md reads that token). The questions part at the next token: " red"
(the trap's redundant question), " big" and " an" (questions that halve the objects), " food". For a
few game states (the first question, after one and three "Is it red? No.", after "Is it big? Yes.")
this prints, at that token of each question, p_theta, pi_phi and the ratio p_theta / pi_phi (Q-SFT's
value estimate) for Q-SFT's theta and for the control's, and, for each question whose p_theta is
above the trap's, the beta at which the extraction pi_phi * exp(beta p_theta) prefers it to the trap
at that token: (log pi_phi(red) - log pi_phi(q)) / (p_theta(q) - p_theta(red)).

WORKDIR: a finished run of configs/twenty_questions_smollm2.py (or its `:char` setting) with the
phases bc, qsft and control.
"""
from __future__ import annotations

import math

from absl import flags

from qsft_jax import analysis, cli
from qsft_jax import run as run_lib

PROG = "python experiments/twenty_questions_word_values.py"
FIRST_OBSERVATION = "Twenty Questions. Guess the object.\n"
STATES = {
    "the first question": [],
    "after 'Is it red? No.'": [("Is it red?\n", "No.\n")],
    "after 'Is it red? No.' three times": [("Is it red?\n", "No.\n")] * 3,
    "after 'Is it big? Yes.'": [("Is it big?\n", "Yes.\n")],
}
QUESTIONS = ("Is it red?\n", "Is it big?\n", "Is it an animal?\n", "Is it food?\n")  # the trap first
WORD = 2  # action tokens "Is", " it", then the word


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("workdir", None, "A finished run with the phases bc, qsft and control.",
                      flag_values=fv, required=True)
  return fv


def word_values(a: analysis.Analysis, history: list[tuple[str, str]]) -> list[dict]:
  """token_values at the word token of each of QUESTIONS asked after `history`."""
  rows = []
  for question in QUESTIONS:
    turns = [{"text": FIRST_OBSERVATION, "action": False}]
    for action, answer in history:
      turns += [{"text": action, "action": True, "reward": -1.0}, {"text": answer, "action": False}]
    turns += [{"text": question, "action": True, "reward": -1.0}, {"text": "No.\n", "action": False}]
    values = [v for v in a.token_values({"turns": turns, "done": False}) if v["turn"] == len(history)]
    rows.append({"question": question.strip(), **values[WORD]})
  return rows


def main(argv: list[str] | None = None) -> int:
  args = define_flags()
  cli.parse(args, argv, prog=PROG, doc=__doc__)
  loaded = run_lib.load(args.workdir)
  if loaded.theta_params is None or loaded.control_params is None:
    raise SystemExit(f"{PROG}: {args.workdir}: needs finished qsft and control phases")
  models = {"Q-SFT": analysis.from_loaded(loaded),
            "control": analysis.from_loaded(loaded.with_theta(loaded.control_params))}
  for state, history in STATES.items():
    print(f"== {state}")
    for label, a in models.items():
      rows = word_values(a, history)
      trap = rows[0]
      print(f"  {label}:")
      for r in rows:
        need = ""
        if r is not trap and r["p_theta"] > trap["p_theta"]:
          beta = (math.log(trap["pi_phi"]) - math.log(r["pi_phi"])) / (r["p_theta"] - trap["p_theta"])
          need = f"  beta to beat the trap: {beta:.0f}"
        print(f"    {r['question']:18s} {r['text']!r:9s} p_theta {r['p_theta']:.4f}  pi_phi "
              f"{r['pi_phi']:.4f}  ratio {r['ratio']:.4f}{need}")
  return 0


if __name__ == "__main__":
  cli.run(main)
