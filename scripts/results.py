"""Results table for one task: dataset average, BC, the targets-equal-1 control and Q-SFT, with value
diagnostics (docs/algorithm.md section 7).

    python -m qsft_jax.main --config=configs/maze_trap_cpu.py --workdir=/tmp/trap
    python scripts/results.py --name maze_trap --run /tmp/trap --out docs/results/maze_trap.md

`--run` is a finished `qsft_jax.main` run with the phases bc, qsft and control (the CPU configs' default):
BC is its pi_phi, the control its control phase, Q-SFT its qsft phase. More Q-SFT variants that share
its phase 1 (copy its bc/, data/ and tokenizer.json into their workdir before training phase 2) are
added with `--qsft LABEL=WORKDIR`. For Q-SFT and the control alike, beta is chosen on selection seeds
(eval.seed + 100000, --select_episodes episodes) and the chosen beta is reported on the evaluation
seeds, so the choice does not fit the reported episodes; the greedy p_theta / pi_phi policy of each
is reported too.
"""
from __future__ import annotations

import json
import time

from absl import flags

from qsft_jax import cli, diagnostics, evaluate
from qsft_jax import run as run_lib


def evaluate_theta(loaded: run_lib.Run, theta_params, target_params, suffix: str, betas,
                   select_episodes: int, episodes: int) -> dict:
  """Best-beta extraction and the ratio policy of one theta, plus its held-out value diagnostics."""
  view = loaded.with_theta(theta_params, target_params)
  workdir = loaded.workdir
  seed = loaded.config.eval.seed
  common = dict(ratio=False, control=False, value_diagnostics=False)
  selection = evaluate.run(view, episodes=select_episodes, seed=seed + 100000,
                           betas=[b for b in betas if b > 0], **common)
  best = max((v for k, v in selection["policies"].items() if k != "bc"), key=lambda v: v["mean_return"])
  res = evaluate.run(view, episodes=episodes, seed=seed, betas=(best["beta"],),
                     **{**common, "ratio": True})
  name = next(k for k in res["policies"] if k.startswith("qsft_beta"))
  d = diagnostics.heldout_value_diagnostics(view, suffix)
  return {"workdir": workdir, "selection": {k: v["mean_return"] for k, v in selection["policies"].items()},
          "best_beta": best["beta"], "extract": res["policies"][name], "ratio": res["policies"]["ratio"],
          "bc": res["policies"]["bc"], "dataset_mean_return": res["dataset_mean_return"],
          "diagnostics": {"correlation": d["correlation"], "first_turn_correlation": d["first_turn_correlation"],
                          "by_turn": d["by_turn"]}}


def row(label: str, beta, r: dict, d: dict | None = None) -> str:
  corr = "- | -" if d is None else f"{d['correlation']:.3f} | {d['first_turn_correlation']:.3f}"
  beta = "-" if beta is None else f"{beta:g}"
  return (f"| {label} | {beta} | {r['mean_return']:.3f} | {r['stderr']:.3f} | {r['success_rate']:.2f} | "
          f"{corr} |")


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("name", None, "Task name, the table's heading.", flag_values=fv)
  flags.DEFINE_string("run", None, "Workdir with the phases bc, qsft and control.", flag_values=fv)
  flags.DEFINE_multi_string("qsft", [], "LABEL=WORKDIR of another Q-SFT run.",
                            flag_values=fv)
  flags.DEFINE_list("betas", ["1", "4", "16", "64"], "Betas the selection episodes choose from.",
                    flag_values=fv)
  flags.DEFINE_integer("select_episodes", 50, "Episodes per beta on the selection seeds.", flag_values=fv)
  flags.DEFINE_integer("episodes", 100, "Evaluation episodes per policy.", flag_values=fv)
  flags.DEFINE_string("out", None, "Markdown file to write (and the same name .json).", flag_values=fv)
  return fv


def main(argv: list[str] | None = None) -> int:
  """Writes the results table; argv as sys.argv holds it (the program name first)."""
  prog = "python scripts/results.py"
  args = define_flags()
  cli.parse(args, argv, prog=prog, doc=__doc__, required=["name", "run", "out"])
  for item in args.qsft:
    if "=" not in item:
      cli.usage_error(prog, f"--qsft expects LABEL=WORKDIR, got {item!r}")
  try:
    betas = [float(b) for b in args.betas]
  except ValueError:
    cli.usage_error(prog, f"--betas={','.join(args.betas)}: not a comma-separated list of numbers")
  start = time.time()
  loaded = run_lib.load(args.run)
  if loaded.theta_params is None or loaded.control_params is None:
    raise SystemExit(f"{args.run}: needs finished qsft and control phases "
                     "(--config.phases='(\"bc\",\"qsft\",\"control\")')")
  opts = dict(betas=betas, select_episodes=args.select_episodes, episodes=args.episodes)
  runs = {"control": evaluate_theta(loaded, loaded.control_params, None, "_control", **opts),
          "Q-SFT": evaluate_theta(loaded, loaded.theta_params, loaded.target_params, "", **opts)}
  for item in args.qsft:
    label, workdir = item.split("=", 1)
    other = run_lib.load(workdir)
    runs[f"Q-SFT [{label}]"] = evaluate_theta(other, other.theta_params, other.target_params, "", **opts)
  bc = runs["control"]["bc"]  # pi_phi alone on the evaluation seeds (the same for every row)
  dataset_return = runs["control"]["dataset_mean_return"]
  elapsed = time.time() - start
  config = loaded.config
  q = config.qsft

  lines = [f"## {args.name}", "",
           f"Run: `{args.run}` ({config.dataset.num_episodes} training episodes, policy "
           f"{config.dataset.policy!r}; {config.bc.steps} BC steps, {q.steps} steps each for Q-SFT and the "
           f"control, batch {q.batch_size} x {config.data.max_length}). Q-SFT: targets_mode={q.targets_mode}, "
           f"target copy every {q.target_update_every} steps (0: Polyak tau={q.tau}), mc_mix={q.mc_mix}, "
           f"n_step={q.n_step}, support_min={q.support_min}, dummy_token={q.dummy_token}, gamma="
           f"{config.data.gamma}, reward_transform={config.data.reward_transform}.", "",
           f"Dataset mean return: {dataset_return:.3f} (original units). {args.episodes} evaluation episodes "
           f"per policy (seeds eval.seed + i); beta chosen among {betas} on {args.select_episodes} separate "
           "episodes.", "",
           "| policy | beta | mean return | stderr | success | value corr. (all turns) | value corr. (turn 0) |",
           "| --- | --- | --- | --- | --- | --- | --- |",
           f"| dataset | - | {dataset_return:.3f} | - | - | - | - |",
           row("BC (pi_phi)", 0.0, bc)]
  for label, r in runs.items():
    lines.append(row(label, r["best_beta"], r["extract"], r["diagnostics"]))
  for label, r in runs.items():
    lines.append(row(f"{label}, greedy p_theta/pi_phi", None, r["ratio"]))
  lines += ["", f"Evaluation wall time: {elapsed / 60:.1f} min.", ""]
  text = "\n".join(lines)
  with open(args.out, "w") as f:
    f.write(text)
  with open(args.out.replace(".md", ".json"), "w") as f:
    json.dump({"bc": bc, "dataset_mean_return": dataset_return, **runs}, f, indent=1, default=float)
  print(text)
  return 0


if __name__ == "__main__":
  cli.run(main)
