"""One row per method over several seeds: the mean across seeds +- the standard error across seeds.

    python scripts/results.py --name twenty_questions_seed0 --run /tmp/tq0 --out docs/results/twenty_questions_seed0.md
    ...  (one finished run and one scripts/results.py table per seed: data, held-out set and initialisation)
    python scripts/combine_seeds.py --name "Twenty Questions" --out docs/results/twenty_questions.md \\
        docs/results/twenty_questions_seed0.json docs/results/twenty_questions_seed1.json ...

Each input is the JSON that scripts/results.py writes beside its table. For every method (dataset, BC, the
control and Q-SFT at the beta chosen on that seed's selection episodes, and the greedy ratio policies) the
table gives the mean over seeds of each seed's mean return, the standard error across seeds (sample standard
deviation / sqrt(seeds)), each seed's own figure, and the held-out value correlations
(all turns, turn 0) averaged the same way.
The seed-to-seed spread (data, held-out set and initialisation all change) is the uncertainty that matters
when methods are compared; the per-seed episode stderr is in each seed's own table.
"""
from __future__ import annotations

import json
import math

from absl import flags

from qsft_jax import cli
from qsft_jax.errors import UserError


def mean_se(values: list[float]) -> tuple[float, float]:
  """(mean, sample standard deviation / sqrt(n)); the error is nan for a single value."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, float("nan")
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var / n)


def method_rows(result: dict) -> dict[str, dict]:
  """Per method of one scripts/results.py JSON: mean return, beta, turn-0 value correlation."""
  rows = {"dataset": {"mean_return": result["dataset_mean_return"]},
          "BC (pi_phi)": {"mean_return": result["bc"]["mean_return"], "beta": 0.0}}
  labels = [k for k in result if k not in ("bc", "dataset_mean_return")]
  for label in labels:
    r = result[label]
    rows[label] = {"mean_return": r["extract"]["mean_return"], "beta": r["best_beta"],
                   "turn0": r["diagnostics"]["first_turn_correlation"],
                   "all_turns": r["diagnostics"]["correlation"]}
  for label in labels:
    rows[f"{label}, greedy p_theta/pi_phi"] = {"mean_return": result[label]["ratio"]["mean_return"]}
  return rows


def combine(results: list[dict]) -> list[dict]:
  """Rows in the first result's method order: label, mean, se, per-seed returns, betas, turn-0 corr."""
  per_seed = [method_rows(r) for r in results]
  out = []
  for label in per_seed[0]:
    if not all(label in rows for rows in per_seed):
      raise UserError(f"method {label!r} is missing from some of the inputs")
    returns = [rows[label]["mean_return"] for rows in per_seed]
    mean, se = mean_se(returns)
    row = {"label": label, "mean": mean, "se": se, "returns": returns,
           "betas": [rows[label].get("beta") for rows in per_seed]}
    for key in ("all_turns", "turn0"):
      if key in per_seed[0][label]:
        row[key] = mean_se([rows[label][key] for rows in per_seed])
    out.append(row)
  return out


def table(name: str, paths: list[str], rows: list[dict]) -> str:
  lines = [f"## {name}: {len(paths)} seeds", "",
           "Mean over seeds +- standard error across seeds; each seed's own mean return in brackets. Inputs: "
           + ", ".join(f"`{p}`" for p in paths) + ".", "",
           "| method | mean return | per seed | beta per seed | value corr. (all turns) | value corr. (turn 0) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    se = "" if math.isnan(r["se"]) else f" +- {r['se']:.2f}"
    seeds = ", ".join(f"{v:.2f}" for v in r["returns"])
    betas = "-" if r["betas"][0] is None else ", ".join(f"{b:g}" for b in r["betas"])
    corr = []
    for key in ("all_turns", "turn0"):
      m, s = r.get(key, (None, None))
      corr.append("-" if m is None else f"{m:.2f}" + ("" if math.isnan(s) else f" +- {s:.2f}"))
    lines.append(f"| {r['label']} | {r['mean']:.2f}{se} | [{seeds}] | {betas} | {' | '.join(corr)} |")
  return "\n".join(lines) + "\n"


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("name", None, "The table's heading.", flag_values=fv)
  flags.DEFINE_string("out", None, "Markdown file to write (and the same name .json).", flag_values=fv)
  return fv


def main(argv: list[str] | None = None) -> int:
  """Writes the combined table; argv as sys.argv holds it (program name first, then the JSON files)."""
  prog = "python scripts/combine_seeds.py"
  args = define_flags()
  paths = cli.parse(args, argv, prog=prog, doc=__doc__, required=["name", "out"], positional="JSON...")
  if not paths:
    cli.usage_error(prog, "give one scripts/results.py JSON file per seed")
  results = []
  for p in paths:
    try:
      with open(p) as f:
        results.append(json.load(f))
    except OSError as e:
      raise UserError(f"{p}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
      raise UserError(f"{p}: line {e.lineno}: not JSON ({e.msg})") from None
  rows = combine(results)
  text = table(args.name, paths, rows)
  with open(args.out, "w") as f:
    f.write(text)
  with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
    json.dump({"inputs": paths, "rows": rows}, f, indent=1, default=float)
  print(text)
  return 0


if __name__ == "__main__":
  cli.run(main)
