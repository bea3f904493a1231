"""Results table for one task: dataset average, BC, the targets-equal-1 control and Q-SFT, with value
diagnostics (DESIGN.md section 8).

    python scripts/results.py --name maze_trap --bc /tmp/trap --control /tmp/trapctl \
        --qsft token=/tmp/trap --qsft turn_hard20=/tmp/trapturn --out docs/results_maze_trap.md

Each workdir is a finished `qsft_jax.main` run; the control and every Q-SFT variant share phase 1
(phi) with the BC run (copy its bc/ and data/ directories before running phase 2). For each phase-2
run, beta is chosen on selection seeds (eval.seed + 100000, --select_episodes episodes) and the chosen
beta is then reported on the evaluation seeds, so the choice does not fit the reported episodes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from qsft_jax import checkpoints, diagnostics, evaluate
from qsft_jax.main import prepare_data


def evaluate_run(workdir: str, betas, select_episodes: int, episodes: int) -> dict:
  loaded = checkpoints.load_for_inference(workdir)
  config = loaded["config"]
  seed = config.eval.seed
  out = {"workdir": workdir}
  if loaded["theta_params"] is None:
    raise ValueError(f"{workdir}: no phase-2 checkpoint to evaluate")
  selection = evaluate.run(workdir, loaded, episodes=select_episodes, seed=seed + 100000,
                           betas=[b for b in betas if b > 0], ratio=False)
  best = max(selection["policies"].items(), key=lambda kv: kv[1]["mean_return"])
  beta = best[1]["beta"]
  res = evaluate.run(workdir, loaded, episodes=episodes, seed=seed, betas=(beta,), ratio=True)
  name = next(k for k in res["policies"] if k.startswith("qsft"))
  out.update(selection={k: v["mean_return"] for k, v in selection["policies"].items()},
             best_beta=beta, qsft=res["policies"][name], ratio=res["policies"].get("ratio"),
             dataset_mean_return=res["dataset_mean_return"])
  data_config = prepare_data(config, workdir)
  out["diagnostics"] = diagnostics.heldout_value_diagnostics(workdir, loaded, data_config)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--name", required=True)
  parser.add_argument("--bc", required=True, help="workdir whose phase 1 is the BC baseline")
  parser.add_argument("--control", required=True, help="phase-2 run with qsft.targets_mode=ones")
  parser.add_argument("--qsft", action="append", default=[], help="LABEL=WORKDIR of a Q-SFT run")
  parser.add_argument("--betas", default="1,4,16")
  parser.add_argument("--select_episodes", type=int, default=50)
  parser.add_argument("--episodes", type=int, default=100)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  betas = [float(b) for b in args.betas.split(",")]
  start = time.time()
  runs = {"control": evaluate_run(args.control, betas, args.select_episodes, args.episodes)}
  for item in args.qsft:
    label, workdir = item.split("=", 1)
    runs[f"qsft[{label}]"] = evaluate_run(workdir, betas, args.select_episodes, args.episodes)
  dataset_return = runs["control"]["dataset_mean_return"]
  # BC is the beta = 0 policy (phi alone) of the run named by --bc.
  loaded = checkpoints.load_for_inference(args.bc)
  bc_res = evaluate.run(args.bc, loaded, episodes=args.episodes, seed=loaded["config"].eval.seed,
                        betas=(0.0,), ratio=False)["policies"]["bc"]
  elapsed = time.time() - start

  lines = [f"## {args.name}", "",
           f"Dataset mean return: {dataset_return:.3f} (original units). "
           f"{args.episodes} evaluation episodes per policy (seeds eval.seed + i); beta chosen among "
           f"{betas} on {args.select_episodes} separate episodes.", "",
           "| policy | beta | mean return | stderr | success | value corr. (all turns) | value corr. (turn 0) |",
           "| --- | --- | --- | --- | --- | --- | --- |",
           f"| dataset | - | {dataset_return:.3f} | - | - | - | - |",
           f"| BC (pi_phi) | 0 | {bc_res['mean_return']:.3f} | {bc_res['stderr']:.3f} | "
           f"{bc_res['success_rate']:.2f} | - | - |"]
  for label, r in runs.items():
    d = r["diagnostics"]
    lines.append(f"| {label} | {r['best_beta']:g} | {r['qsft']['mean_return']:.3f} | {r['qsft']['stderr']:.3f} | "
                 f"{r['qsft']['success_rate']:.2f} | {d['correlation']:.3f} | {d['first_turn_correlation']:.3f} |")
  for label, r in runs.items():
    if r.get("ratio"):
      q = r["ratio"]
      lines.append(f"| {label} greedy p_theta/pi_phi | - | {q['mean_return']:.3f} | {q['stderr']:.3f} | "
                   f"{q['success_rate']:.2f} | - | - |")
  lines += ["", f"Evaluation wall time: {elapsed / 60:.1f} min.", ""]
  with open(args.out, "w") as f:
    f.write("\n".join(lines))
  with open(args.out.replace(".md", ".json"), "w") as f:
    json.dump({"bc": bc_res, **runs}, f, indent=1, default=float)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
