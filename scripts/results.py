"""Results tables: one task's column of the paper's comparison over seeds, the four columns in one table
that opens docs/results.md, or one finished run's table.

A column (one task, every method, several seeds: data, held-out set and initialisation):

    python scripts/results.py --column=maze_trap --seeds=0,1,2 --root=/tmp/qsft_table --out=docs/results/

For each seed s it trains, with `--config.seed=s --config.dataset.seed=100*s` (s = 0 is the config's own
data), these workdirs under ROOT/COLUMN/seed{s}/ (the trainer, `qsft_jax.main`, in this process):
- main/: phases bc, filtered_bc, mc, ilql, qsft, control with the column config's CPU setting
  (config_lib.cpu_value_learning), one phase at a time so that each one's wall time is recorded;
- qsft_paper/: Q-SFT with the config's `:paper` setting (per-token bootstrap, Polyak tau, mc_mix 0,
  theta from phi's initialisation); qsft_mc1/: the CPU setting with qsft.mc_mix=1.0 (every target
  the Monte Carlo return); and, on the stitching task only, qsft_mc0/ and qsft_mc025/: the CPU setting
  with qsft.mc_mix 0 and 0.25. They
  share main's phase 1 (its bc/, data/ and tokenizer.json are copied in first, so that only their own
  phase trains).
The baselines get the same budget as the method they stand beside: filtered_bc the steps and batch of
bc (both train from the same initialisation), mc and ilql those of qsft (the same batches); `--set
FIELD=VALUE` overrides any config field in every workdir of the column, after these.
Then every method plays the same evaluation episodes (seeds eval.seed + i); MC, ILQL, the control and
each Q-SFT choose beta among --betas on separate selection episodes (eval.seed + 100000 + i) and are
reported at the chosen beta; BC and filtered BC have no beta. Q-SFT's variants and the control add their
held-out value correlations (`qsft_jax.diagnostics`). Re-running continues where it stopped: a phase with
its DONE marker is not started again (an unfinished one resumes from its checkpoint), and each method's
evaluation is cached in WORKDIR/table/METHOD.json (recomputed only when episodes, seeds or betas
change). The wall time of every phase and evaluation is kept in ROOT/COLUMN/seed{s}/timings.json;
compiled programs in ROOT/jax_cache (JAX's persistent cache, unless JAX_COMPILATION_CACHE_DIR is set), so
the workdirs, seeds and columns of one shape compile each step and sampler once.
Writes OUT/table_COLUMN.{md,json}: per method the mean over seeds +- the standard error across seeds
(sample standard deviation / sqrt(seeds)), each seed's return and chosen beta, and beside them the
column's exact optimal return and the return of the policy greedy in Q^beta (the behaviour policy's
Q; maze columns, `qsft_jax.envs.maze_values.config_values`; "-" for Wordle).

The four columns in one table (rows = methods, columns = tasks), written between marker comments at
the top of docs/results.md (a rerun replaces it), with the command of each column and the comparisons
computed from the numbers (differences paired by seed, mean +- standard error across seeds):

    python scripts/results.py --assemble --out=docs/results/ [--results_md=docs/results.md]

Columns (`--column`): maze (configs/maze_cpu.py), maze_trap (configs/maze_trap_cpu.py), wordle_trap
(configs/wordle_trap_cpu.py), maze_stitch (configs/maze_stitch_cpu.py); and maze_stitch_rare
(configs/maze_stitch_rare_cpu.py), a column of its own that --assemble leaves out of the one table.

Budget, measured on the idle 2-core CPU (2026-11-30; each column's table_COLUMN.md gives its own
minutes per seed). Per seed of a maze column (400 BC steps, 400 phase-2 steps, batch 16 x 256):
training ~8.5 minutes (bc and filtered_bc ~1 each, mc and ilql ~0.35 each: the frozen phi's forward
only, each Q-SFT variant and the control ~1.5), evaluation ~5.5-6.5 (128 episodes per method at the
chosen beta after 64 selection episodes for each of betas 4, 16, 64, 256; 15-45 s per method, plus the
value diagnostics): ~15 minutes a seed, ~45 a column; the stitching column's three more workdirs add
~3 minutes a seed. The Wordle trap (600 BC steps, 256 evaluation and 128 selection episodes) is in the
same range. The whole table: ~3.5 hours of idle CPU; one column and seed at a time can be run with
--seeds, and an interrupted column continues where it stopped.

One finished run (the phases bc, qsft and control; the CPU configs' default), with more Q-SFT runs that
share its phase 1 added with `--qsft LABEL=WORKDIR`:

    python -m qsft_jax.main --config=configs/maze_trap_cpu.py --workdir=/tmp/trap
    python scripts/results.py --name maze_trap --run /tmp/trap --out docs/results/maze_trap.md

For Q-SFT and the control alike, beta is chosen on selection seeds (eval.seed + 100000,
--select_episodes episodes) and the chosen beta is reported on the evaluation seeds, so the choice
does not fit the reported episodes; the greedy p_theta / pi_phi policy of each is reported too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags, logging

from qsft_jax import cli, diagnostics, evaluate
from qsft_jax import run as run_lib
from qsft_jax.errors import UserError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from combine_seeds import mean_se  # noqa: E402  (scripts/combine_seeds.py, beside this file)

PROG = "python scripts/results.py"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate_theta(loaded: run_lib.Run, theta_params, target_params, suffix: str, betas,
                   select_episodes: int, episodes: int, *, theta_step: int | None,
                   target_step: int | None = None) -> dict:
  """Best-beta extraction and the ratio policy of one theta (read from its phase's checkpoint of
  theta_step, recorded in the results), plus its held-out value diagnostics."""
  view = loaded.with_theta(theta_params, target_params, theta_step=theta_step, target_step=target_step)
  workdir = loaded.workdir
  seed = loaded.config.eval.seed
  common = dict(ratio=False, control=False, value_diagnostics=False, methods=("bc", "qsft"))
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


# ------------------------------------------------------------------------------------------------
# Columns: one task, every method, several seeds


@dataclasses.dataclass(frozen=True)
class Column:
  """One task of the table: its config file (relative to the repository), heading and evaluation sizes."""
  name: str
  title: str
  config: str
  # Evaluation episodes per method and seed, and selection episodes per beta and seed: multiples of the
  # configs' eval.batch_size (64), so that every batch has one shape (one compiled sampler) and is full.
  episodes: int
  select_episodes: int
  # Rows this column adds to every column's (keys of OPTIONAL_ROWS), and whether --assemble puts it in
  # the one table (a column kept for a finding of its own is not).
  extra: tuple[str, ...] = ()
  in_table: bool = True


COLUMNS = {c.name: c for c in (
    Column("maze", "maze, paper-like behaviour", "configs/maze_cpu.py", 128, 64),
    Column("maze_trap", "maze, trap", "configs/maze_trap_cpu.py", 128, 64),
    Column("wordle_trap", "Wordle, trap", "configs/wordle_trap_cpu.py", 256, 128),
    Column("maze_stitch", "maze, stitching", "configs/maze_stitch_cpu.py", 128, 64,
           extra=("qsft_mc0", "qsft_mc025")),
    Column("maze_stitch_rare", "maze, stitching with a rare shortcut", "configs/maze_stitch_rare_cpu.py",
           128, 64, in_table=False))}
COLUMN_BETAS = (4.0, 16.0, 64.0, 256.0)


@dataclasses.dataclass(frozen=True)
class Training:
  """One workdir of a seed: the config setting it trains with, its phases, its own overrides, and
  whether it takes phase 1 from the main workdir."""
  name: str
  setting: str
  phases: tuple[str, ...]
  overrides: tuple[str, ...] = ()
  shares_phase1: bool = False


TRAININGS = (
    Training("main", "", ("bc", "filtered_bc", "mc", "ilql", "qsft", "control")),
    Training("qsft_paper", "paper", ("bc", "qsft"), shares_phase1=True),
    Training("qsft_mc1", "", ("bc", "qsft"), ("--config.qsft.mc_mix=1.0",), shares_phase1=True),
    # Rows of the columns that list them (Column.extra): Q-SFT's CPU setting with less Monte Carlo mixing.
    Training("qsft_mc0", "", ("bc", "qsft"), ("--config.qsft.mc_mix=0.0",), shares_phase1=True),
    Training("qsft_mc025", "", ("bc", "qsft"), ("--config.qsft.mc_mix=0.25",), shares_phase1=True))
# Files of the main workdir that hold phase 1 and the data, copied into a workdir that shares them.
PHASE1_FILES = ("bc", "data", run_lib.TOKENIZER_FILE)


@dataclasses.dataclass(frozen=True)
class Method:
  """A row of the table: the workdir (a `Training` name) and the `evaluate.run` method it plays;
  `beta` when it chooses beta on the selection episodes; `values` when it has held-out value
  diagnostics (a theta whose p_theta / pi_phi is a value estimate)."""
  key: str
  label: str
  workdir: str
  method: str
  beta: bool
  values: bool = False


METHODS = (
    Method("bc", "BC", "main", "bc", beta=False),
    Method("filtered_bc", "filtered BC", "main", "filtered_bc", beta=False),
    Method("mc", "MC", "main", "mc", beta=True),
    Method("ilql", "ILQL", "main", "ilql", beta=True),
    Method("control", "control (targets 1)", "main", "control", beta=True, values=True),
    Method("qsft_paper", "Q-SFT, paper setting", "qsft_paper", "qsft", beta=True, values=True),
    Method("qsft", "Q-SFT, CPU setting", "main", "qsft", beta=True, values=True),
    Method("qsft_mc0", "Q-SFT, mc_mix 0", "qsft_mc0", "qsft", beta=True, values=True),
    Method("qsft_mc025", "Q-SFT, mc_mix 0.25", "qsft_mc025", "qsft", beta=True, values=True),
    Method("qsft_mc1", "Q-SFT, mc_mix 1", "qsft_mc1", "qsft", beta=True, values=True))
# Rows (and their workdirs, of the same name) that only the columns listing them in Column.extra have.
OPTIONAL_ROWS = ("qsft_mc0", "qsft_mc025")
ROW_ORDER = ("dataset",) + tuple(m.key for m in METHODS)
ROW_LABELS = {"dataset": "dataset", **{m.key: m.label for m in METHODS}}


def column_trainings(column: Column) -> tuple[Training, ...]:
  return tuple(t for t in TRAININGS if t.name not in OPTIONAL_ROWS or t.name in column.extra)


def column_methods(column: Column) -> tuple[Method, ...]:
  return tuple(m for m in METHODS if m.key not in OPTIONAL_ROWS or m.key in column.extra)


def seed_overrides(seed: int) -> list[str]:
  """Initialisation, data order, training and held-out data of seed `seed` (0: the config's own)."""
  return [f"--config.seed={seed}", f"--config.dataset.seed={100 * seed}"]


def read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror})") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: line {e.lineno}: not JSON ({e.msg})") from None


class Timings:
  """ROOT/COLUMN/seed{s}/timings.json: seconds of each phase ("train/WORKDIR/PHASE") and evaluation
  ("eval/METHOD"), written after each one ends. A phase resumed from a checkpoint counts the run that
  finished it."""

  def __init__(self, path: str):
    self.path = path
    self.seconds: dict[str, float] = read_json(path) if os.path.exists(path) else {}

  def record(self, key: str, seconds: float) -> None:
    self.seconds[key] = round(seconds, 1)
    run_lib.write_json_atomic(self.path, self.seconds)


def trainer_config(argv: Sequence[str]):
  """The config the trainer's command line `argv` (program name first) gives: its config file with the
  --config.FIELD=VALUE overrides applied. A bad override is a UserError naming it."""
  from qsft_jax import main as trainer
  fv = trainer.define_flags(argv)
  try:
    fv(list(argv))
    return fv.config
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    raise UserError(f"trainer command {' '.join(argv[1:])}: {e}") from None


def shell_command(argv: Sequence[str]) -> str:
  """argv (the program first, as one string such as "python -m qsft_jax.main") as a shell would take it."""
  return " ".join([argv[0], *(shlex.quote(a) for a in argv[1:])])


def budget_parity(config) -> list[str]:
  """The baselines' steps and batch: filtered_bc as bc (both from theta_0), mc and ilql as qsft."""
  out = [f"--config.filtered_bc.steps={config.bc.steps}",
         f"--config.filtered_bc.batch_size={config.bc.batch_size}"]
  for phase in ("mc", "ilql"):
    out += [f"--config.{phase}.steps={config.qsft.steps}",
            f"--config.{phase}.batch_size={config.qsft.batch_size}"]
  return out


def train(config_path: str, training: Training, workdir: str, seed: int, sets: Sequence[str],
          timings: Timings, main_workdir: str) -> list[str]:
  """Trains (or resumes) one workdir phase by phase; a phase with its DONE marker is not started. Returns
  the equivalent trainer command line (all phases)."""
  from qsft_jax import checkpoints
  from qsft_jax import main as trainer

  arg = f"--config={config_path}" + (f":{training.setting}" if training.setting else "")
  base = ["python -m qsft_jax.main", arg, f"--workdir={workdir}", *seed_overrides(seed)]
  extra = list(training.overrides)
  if set(training.phases) & {"filtered_bc", "mc", "ilql"}:
    extra = budget_parity(trainer_config([*base, *sets])) + extra
  extra += [*sets, "--config.eval.enabled=False"]
  phases = lambda n: "--config.phases=(" + "".join(f'"{p}",' for p in training.phases[:n]) + ")"
  command = [*base, phases(len(training.phases)), *extra]
  if training.shares_phase1 and not checkpoints.is_done(workdir, "bc"):
    copy_phase1(main_workdir, workdir)
  for i, phase in enumerate(training.phases):
    if checkpoints.is_done(workdir, phase):
      continue
    argv = [*base, phases(i + 1), *extra]
    print(f"{PROG}: train {workdir} {phase}: {shell_command(argv)}", flush=True)
    start = time.time()
    trainer.run(trainer_config(argv), workdir)
    timings.record(f"train/{training.name}/{phase}", time.time() - start)
  return command


def copy_phase1(src: str, dst: str) -> None:
  """Copies the main workdir's phase 1 (bc/), data/ and tokenizer.json into `dst` (each file or folder
  under a temporary name first, so that an interrupted copy is redone)."""
  os.makedirs(dst, exist_ok=True)
  for name in PHASE1_FILES:
    source, target = os.path.join(src, name), os.path.join(dst, name)
    if not os.path.exists(source):
      if name == run_lib.TOKENIZER_FILE:
        continue
      raise UserError(f"{source}: missing; the main workdir's phase 1 must finish first")
    if os.path.exists(target):
      shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    partial = target + ".partial"
    if os.path.isdir(partial):
      shutil.rmtree(partial)
    (shutil.copytree if os.path.isdir(source) else shutil.copyfile)(source, partial)
    os.replace(partial, target)


def play(loaded: run_lib.Run, method: str, betas: Sequence[float], episodes: int, seed: int,
         dataset_return: float | None) -> dict[str, dict]:
  """{policy name: {"mean_return", "stderr", "success_rate", "beta"}} of one method's policies."""
  results = evaluate.run(loaded, episodes=episodes, seed=seed, betas=tuple(betas), ratio=False,
                         control=method == "control", value_diagnostics=False, methods=(method,),
                         dataset_return=dataset_return)
  return results["policies"]


def evaluate_method(loaded: run_lib.Run, m: Method, settings: dict, dataset_return: float | None) -> dict:
  """One method of one seed: its beta chosen on the selection episodes (when it has one), its return on
  the evaluation episodes, and its held-out value diagnostics (when it has them)."""
  seed = settings["seed"]
  out: dict[str, Any] = {"beta": None, "selection": None, "diagnostics": None}
  if m.beta:
    selection = play(loaded, m.method, settings["betas"], settings["select_episodes"], seed + 100000,
                     dataset_return)
    out["selection"] = {f"{v['beta']:g}": v["mean_return"] for v in selection.values()}
    out["beta"] = max(selection.values(), key=lambda v: v["mean_return"])["beta"]  # ties: the smallest
    policies = play(loaded, m.method, (out["beta"],), settings["episodes"], seed, dataset_return)
  else:
    policies = play(loaded, m.method, (0.0,), settings["episodes"], seed, dataset_return)
  result = [v for k, v in policies.items() if k == m.method or k.startswith(f"{m.method}_beta")]
  if len(result) != 1:
    raise ValueError(f"{loaded.workdir}: {m.method}: expected one policy, got {sorted(policies)}")
  out["result"] = {k: result[0][k] for k in ("mean_return", "stderr", "success_rate")}
  if m.values:
    theta, target, suffix = ((loaded.control_params, None, "_control") if m.method == "control"
                             else (loaded.theta_params, loaded.target_params, ""))
    d = diagnostics.heldout_value_diagnostics(loaded.with_theta(theta, target), suffix)
    out["diagnostics"] = {k: d[k] for k in ("correlation", "first_turn_correlation")}
  return out


def cached_evaluation(workdir: str, m: Method, settings: dict, load: Callable[[], run_lib.Run],
                      dataset_return: float | None, timings: Timings) -> dict:
  """`evaluate_method` through its cache WORKDIR/table/METHOD.json (valid for the same settings)."""
  path = os.path.join(workdir, "table", f"{m.method}.json")
  if os.path.exists(path):
    cached = read_json(path)
    if cached.get("settings") == settings:
      return cached
    print(f"{PROG}: {path}: evaluated with other settings ({cached.get('settings')}); evaluating again",
          flush=True)
  start = time.time()
  out = evaluate_method(load(), m, settings, dataset_return)
  out.update(settings=settings, seconds=round(time.time() - start, 1))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  run_lib.write_json_atomic(path, out)
  timings.record(f"eval/{m.key}", out["seconds"])
  return out


def exact_returns(config) -> dict | None:
  """{"optimal", "greedy_q_beta"}: the expected return (original units, over the evaluation's start
  cells) of the optimal policy and of the policy greedy in the behaviour policy's Q, computed exactly
  for a maze (`maze_values.config_values`); None for other tasks."""
  if config.task != "maze":
    return None
  from qsft_jax.envs import maze_values
  values = maze_values.config_values(config)
  return {"optimal": float(values.optimal.original), "greedy_q_beta": float(values.greedy_q_beta.original)}


def summarize_rows(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
  """{row key: {"mean", "se", "returns", "betas", "turn0", "all_turns"}} over the seeds (in seed order)."""
  seeds = sorted(per_seed)
  rows = {}
  for key in (k for k in ROW_ORDER if k in per_seed[seeds[0]]):
    entries = [per_seed[s][key] for s in seeds]
    returns = [e["result"]["mean_return"] for e in entries]
    mean, se = mean_se(returns)
    row = {"mean": mean, "se": se, "returns": returns, "betas": [e.get("beta") for e in entries]}
    if entries[0].get("diagnostics"):
      row["all_turns"] = mean_se([e["diagnostics"]["correlation"] for e in entries])
      row["turn0"] = mean_se([e["diagnostics"]["first_turn_correlation"] for e in entries])
    rows[key] = row
  return rows


def fmt_mean(row: dict) -> str:
  return f"{row['mean']:.2f}" + ("" if math.isnan(row["se"]) else f" +- {row['se']:.2f}")


def fmt_betas(betas: Sequence[float | None]) -> str:
  return "-" if betas[0] is None else ", ".join(f"{b:g}" for b in betas)


def phase2_settings(config) -> str:
  """The phase-2 settings of a workdir's config, in one line."""
  q = config.qsft
  update = f"target copy every {q.target_update_every} steps" if q.target_update_every else f"Polyak tau {q.tau}"
  return (f"{q.steps} steps, targets_mode {q.targets_mode}, {update}, mc_mix {q.mc_mix}, n_step {q.n_step}, "
          f"support_min {q.support_min}, dummy_token {q.dummy_token}, theta_init {q.theta_init}")


def baseline_settings(config) -> str:
  """The baselines' settings of the main workdir's config, in one line."""
  fb, mc, il = config.filtered_bc, config.mc, config.ilql
  return (f"filtered BC: top_fraction {fb.top_fraction}, {fb.steps} steps; MC: trunk {mc.trunk}, {mc.steps} "
          f"steps; ILQL: trunk {il.trunk}, expectile {il.expectile}, cql_alpha {il.cql_alpha}, tau {il.tau}, "
          f"{il.steps} steps; batch {config.qsft.batch_size} x {config.data.max_length} tokens")


def column_markdown(data: dict) -> str:
  rows, exact = data["rows"], data["exact"]
  ev = data["evaluation"]
  lines = [f"## {data['title']} (`{data['config']}`), seeds {', '.join(map(str, data['seeds']))}", "",
           f"    {data['command']}", "",
           f"Mean over seeds +- standard error across seeds; each seed's own mean return in brackets. "
           f"{ev['episodes']} evaluation episodes per method and seed (seeds eval.seed + i); beta chosen "
           f"among {', '.join(f'{b:g}' for b in ev['betas'])} on {ev['select_episodes']} separate episodes "
           "per beta (eval.seed + 100000 + i).", ""]
  if exact:
    lines += [f"Exact (dynamic programming): optimal return {exact['optimal']:.2f}, the policy greedy in "
              f"Q^beta {exact['greedy_q_beta']:.2f}.", ""]
  labels = {**ROW_LABELS, "main": ROW_LABELS["qsft"] + " and the control", "baselines": "Baselines"}
  lines += [f"- {labels[w]}: {text}" for w, text in data["phase2_settings"].items()] + [""]
  lines += ["| method | mean return | per seed | beta per seed | value corr. (all turns) | "
            "value corr. (turn 0) |", "| --- | --- | --- | --- | --- | --- |"]
  for key in (k for k in ROW_ORDER if k in rows):
    r = rows[key]
    corr = [f"{r[k][0]:.2f}" + ("" if math.isnan(r[k][1]) else f" +- {r[k][1]:.2f}") if k in r else "-"
            for k in ("all_turns", "turn0")]
    seeds = ", ".join(f"{v:.2f}" for v in r["returns"])
    lines.append(f"| {ROW_LABELS[key]} | {fmt_mean(r)} | [{seeds}] | {fmt_betas(r['betas'])} | "
                 f"{' | '.join(corr)} |")
  lines += ["", "Wall time (minutes) per seed: " + "; ".join(
      f"seed {s}: training {t['train'] / 60:.1f}, evaluation {t['eval'] / 60:.1f}"
      for s, t in data["minutes_by_seed"].items()) + " (`timings.json` in each seed's folder).", ""]
  return "\n".join(lines)


def run_column(column: Column, config_path: str, seeds: Sequence[int], root: str, out: str,
               settings: dict, sets: Sequence[str], command: str) -> dict:
  """Trains and evaluates every method of `column` for each seed, then writes OUT/table_COLUMN.{md,json}."""
  per_seed, commands, minutes, settings_by_workdir = {}, {}, {}, {}
  trainings = column_trainings(column)
  for seed in seeds:
    seed_dir = os.path.join(root, column.name, f"seed{seed}")
    timings = Timings(os.path.join(seed_dir, "timings.json"))
    workdirs = {t.name: os.path.join(seed_dir, t.name) for t in trainings}
    commands[seed] = [shell_command(train(config_path, t, workdirs[t.name], seed, sets, timings,
                                          workdirs["main"])) for t in trainings]
    config = run_lib.read_config(workdirs["main"])
    if not settings_by_workdir:
      settings_by_workdir.update({t.name: phase2_settings(run_lib.read_config(workdirs[t.name]))
                                  for t in trainings})
      settings_by_workdir["baselines"] = baseline_settings(config)
    eval_settings = {**settings, "seed": int(config.eval.seed)}
    paths = evaluate.training_data_paths(workdirs["main"], config)
    dataset_return = evaluate.dataset_mean_return(paths, run_lib.data_config_from(config))
    per_seed[seed] = {"dataset": {"result": {"mean_return": dataset_return}}}
    loaded: dict[str, run_lib.Run] = {}

    def load(w: str) -> run_lib.Run:  # each workdir's checkpoints read once, and only when evaluated
      if w not in loaded:
        loaded[w] = run_lib.load(workdirs[w])
      return loaded[w]

    for m in column_methods(column):
      per_seed[seed][m.key] = cached_evaluation(workdirs[m.workdir], m, eval_settings,
                                                lambda w=m.workdir: load(w), dataset_return, timings)
    loaded.clear()
    minutes[seed] = {kind: sum(v for k, v in timings.seconds.items() if k.startswith(kind + "/"))
                     for kind in ("train", "eval")}
  exact = exact_returns(trainer_config(["python -m qsft_jax.main", f"--config={config_path}", *sets]))
  data = {"column": column.name, "title": column.title, "config": column.config, "command": command,
          "seeds": list(seeds), "evaluation": {k: v for k, v in settings.items()},
          "trainer_commands": commands, "exact": exact, "rows": summarize_rows(per_seed),
          "per_seed": per_seed, "minutes_by_seed": minutes, "phase2_settings": settings_by_workdir}
  os.makedirs(out, exist_ok=True)
  text = column_markdown(data)
  with open(os.path.join(out, f"table_{column.name}.md"), "w") as f:
    f.write(text)
  run_lib.write_json_atomic(os.path.join(out, f"table_{column.name}.json"), data)
  print(text, flush=True)
  return data


# ------------------------------------------------------------------------------------------------
# The one table: every column


BEGIN = "<!-- results-table:begin (scripts/results.py --assemble writes this part; reruns replace it) -->"
END = "<!-- results-table:end -->"


def paired(data: dict, a: str, b: str) -> tuple[float, float]:
  """Mean and standard error over seeds of row a's return minus row b's, seed by seed."""
  per_seed = data["per_seed"]
  return mean_se([per_seed[s][a]["result"]["mean_return"] - per_seed[s][b]["result"]["mean_return"]
                  for s in per_seed])


def has_row(data: dict, key: str) -> bool:
  return key in data["rows"]


def comparison(data: dict, a: str, b: str) -> str:
  mean, se = paired(data, a, b)
  passes = not math.isnan(se) and mean > 2 * se
  seeds = len(data["per_seed"])
  err = "" if math.isnan(se) else f" +- {se:.2f}"
  return (f"{ROW_LABELS[a]} - {ROW_LABELS[b]} = {mean:.2f}{err} (seeds: {seeds}, paired by seed): "
          + ("**more than two standard errors**" if passes else "not more than two standard errors"))


def statements(columns: Sequence[dict]) -> list[str]:
  """The comparisons the table is for, each stated with its numbers."""
  lines = ["Q-SFT against ILQL:"]
  for data in columns:
    for q in ("qsft", "qsft_paper"):
      lines.append(f"- {data['title']}: {comparison(data, q, 'ilql')}")
  stitch = [d for d in columns if d["column"] == "maze_stitch"]
  if stitch:
    lines += ["", "Stitching task, bootstrapped Q-SFT against return weighting and imitation of the best "
              "episodes:"]
    for q in (k for k in ("qsft_paper", "qsft_mc0", "qsft_mc025", "qsft") if has_row(stitch[0], k)):
      for other in ("qsft_mc1", "mc", "filtered_bc"):
        lines.append(f"- {comparison(stitch[0], q, other)}")
  lines += ["", "Where a comparison is not more than two standard errors, its measured reason is written by "
            "hand after the end of this generated part."]
  return lines


def assembled_markdown(columns: Sequence[dict], out: str) -> str:
  cell = lambda r: fmt_mean(r) + ("" if r["betas"][0] is None else f" (beta {fmt_betas(r['betas'])})")
  exact = lambda d, k: "-" if not d["exact"] else f"{d['exact'][k]:.2f}"
  lines = [BEGIN, "", "| method | " + " | ".join(d["title"] for d in columns) + " |",
           "| --- |" + " --- |" * len(columns),
           "| optimal (exact) | " + " | ".join(exact(d, "optimal") for d in columns) + " |",
           "| greedy in Q^beta (exact) | " + " | ".join(exact(d, "greedy_q_beta") for d in columns) + " |"]
  for key in (k for k in ROW_ORDER if any(has_row(d, k) for d in columns)):
    lines.append(f"| {ROW_LABELS[key]} | " + " | ".join(cell(d["rows"][key]) if has_row(d, key) else "-"
                                                         for d in columns) + " |")
  lines += ["", "Mean return over seeds +- standard error across seeds (data, held-out set and "
            "initialisation change with the seed), each beta-extracting method at the beta chosen on "
            "separate selection episodes (the betas of the seeds in brackets); per column: "
            + ", ".join(f"`{os.path.join(out, 'table_' + d['column'] + '.md')}`" for d in columns)
            + ". Commands:", ""]
  lines += [f"- {d['title']}: `{d['command']}`" for d in columns]
  lines += [""] + statements(columns) + ["", END]
  return "\n".join(lines) + "\n"


def write_assembled(results_md: str, text: str) -> None:
  """Replaces the part between the markers of `results_md`, or puts it under the first heading."""
  with open(results_md) as f:
    doc = f.read()
  if BEGIN in doc and END in doc:
    head, rest = doc.split(BEGIN, 1)
    doc = head + text.rstrip("\n") + rest.split(END, 1)[1]
  else:
    first, _, rest = doc.partition("\n")
    doc = first + "\n\n" + text + "\n" + rest.lstrip("\n") if first.startswith("# ") else text + "\n" + doc
  with open(results_md, "w") as f:
    f.write(doc)


def assemble(out: str, results_md: str) -> str:
  names = [name for name, c in COLUMNS.items() if c.in_table]
  paths = [os.path.join(out, f"table_{name}.json") for name in names]
  columns = [read_json(p) for p in paths if os.path.exists(p)]
  if not columns:
    raise UserError(f"{out}: no table_COLUMN.json; run `{PROG} --column=NAME ...` first")
  text = assembled_markdown(columns, out)
  write_assembled(results_md, text)
  missing = [name for name, p in zip(names, paths) if not os.path.exists(p)]
  print(text + (f"\nColumns not yet run: {', '.join(missing)}\n" if missing else ""), flush=True)
  return text


# ------------------------------------------------------------------------------------------------
# The command line


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("name", None, "--run: task name, the table's heading.", flag_values=fv)
  flags.DEFINE_string("run", None, "Workdir with the phases bc, qsft and control.", flag_values=fv)
  flags.DEFINE_multi_string("qsft", [], "--run: LABEL=WORKDIR of another Q-SFT run.",
                            flag_values=fv)
  flags.DEFINE_list("betas", ["1", "4", "16", "64"], "Betas the selection episodes choose from (--column: "
                    f"default {','.join(f'{b:g}' for b in COLUMN_BETAS)}).", flag_values=fv)
  flags.DEFINE_integer("select_episodes", 50, "Episodes per beta on the selection seeds (--column: the "
                       "column's).", flag_values=fv)
  flags.DEFINE_integer("episodes", 100, "Evaluation episodes per policy (--column: the column's).",
                       flag_values=fv)
  flags.DEFINE_string("out", None, "--run: markdown file to write (and the same name .json); --column and "
                      "--assemble: the folder of table_COLUMN.{md,json}.", flag_values=fv)
  flags.DEFINE_enum("column", None, list(COLUMNS), "Train and evaluate every method of this task.",
                    flag_values=fv)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "--column: seeds (data, held-out set, initialisation).",
                    flag_values=fv)
  flags.DEFINE_string("root", None, "--column: folder of the workdirs (ROOT/COLUMN/seedS/...).", flag_values=fv)
  flags.DEFINE_string("config_file", None, "--column: another config file for the column (it must take the "
                      "setting argument \"\" or \"paper\", as configs/maze_cpu.py).", flag_values=fv)
  flags.DEFINE_multi_string("set", [], "--column: FIELD=VALUE, a config override for every workdir of the "
                            "column (--config.FIELD=VALUE of the trainer).", flag_values=fv)
  flags.DEFINE_bool("assemble", False, "Write the one table of every column's table_COLUMN.json in --out "
                    "into --results_md.", flag_values=fv)
  flags.DEFINE_string("results_md", os.path.join(REPO, "docs", "results.md"), "--assemble: the document the "
                      "table opens.", flag_values=fv)
  return fv


def persistent_compilation_cache(root: str) -> None:
  """Compiled steps and samplers kept in ROOT/jax_cache (unless JAX_COMPILATION_CACHE_DIR names another
  folder): the workdirs, seeds and columns of the same shapes compile each program once."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def parse_betas(values: Sequence[str]) -> list[float]:
  try:
    return [float(b) for b in values]
  except ValueError:
    cli.usage_error(PROG, f"--betas={','.join(values)}: not a comma-separated list of numbers")


def main(argv: list[str] | None = None) -> int:
  """Writes a results table; argv as sys.argv holds it (the program name first)."""
  argv = list(sys.argv if argv is None else argv)
  args = define_flags()
  cli.parse(args, argv, prog=PROG, doc=__doc__, required=["out"])
  modes = [m for m, on in (("--run", args.run is not None), ("--column", args.column is not None),
                           ("--assemble", args.assemble)) if on]
  if len(modes) != 1:
    cli.usage_error(PROG, "give exactly one of --run, --column and --assemble" +
                    (f" (got {' and '.join(modes)})" if modes else ""))
  if args.assemble:
    assemble(args.out, args.results_md)
    return 0
  if args.column:
    logging.set_verbosity(logging.WARNING)  # the trainer's default: orbax logs every save at info
    persistent_compilation_cache(args.root)
    column = COLUMNS[args.column]
    if not args.root:
      cli.usage_error(PROG, "--column needs --root, the folder of its workdirs")
    try:
      seeds = [int(s) for s in args.seeds]
    except ValueError:
      cli.usage_error(PROG, f"--seeds={','.join(args.seeds)}: not a comma-separated list of integers")
    sets = []
    for item in args.set:
      if "=" not in item:
        cli.usage_error(PROG, f"--set expects FIELD=VALUE, got {item!r}")
      sets.append(f"--config.{item}")
    config_path = args.config_file or os.path.join(REPO, column.config)
    if not os.path.exists(config_path):
      raise UserError(f"{config_path}: no such config file (column {column.name})")
    present = lambda name: args[name].present
    settings = {"episodes": args.episodes if present("episodes") else column.episodes,
                "select_episodes": (args.select_episodes if present("select_episodes")
                                    else column.select_episodes),
                "betas": parse_betas(args.betas) if present("betas") else list(COLUMN_BETAS)}
    if any(b <= 0 for b in settings["betas"]):
      cli.usage_error(PROG, "--betas: every beta must be > 0 (BC is its own row)")
    run_column(column, config_path, seeds, args.root, args.out, settings, sets,
               shell_command([PROG, *argv[1:]]))
    return 0
  return single_run(args)


def single_run(args) -> int:
  """The table of one finished run (`--run`)."""
  if args.name is None:
    cli.usage_error(PROG, "--run needs --name, the table's heading")
  for item in args.qsft:
    if "=" not in item:
      cli.usage_error(PROG, f"--qsft expects LABEL=WORKDIR, got {item!r}")
  betas = parse_betas(args.betas)
  start = time.time()
  loaded = run_lib.load(args.run)
  if loaded.theta_params is None or loaded.control_params is None:
    raise SystemExit(f"{args.run}: needs finished qsft and control phases "
                     "(--config.phases='(\"bc\",\"qsft\",\"control\")')")
  opts = dict(betas=betas, select_episodes=args.select_episodes, episodes=args.episodes)
  runs = {"control": evaluate_theta(loaded, loaded.control_params, None, "_control",
                                    theta_step=loaded.control_step, **opts),
          "Q-SFT": evaluate_theta(loaded, loaded.theta_params, loaded.target_params, "",
                                  theta_step=loaded.theta_step, target_step=loaded.target_step, **opts)}
  for item in args.qsft:
    label, workdir = item.split("=", 1)
    other = run_lib.load(workdir)
    runs[f"Q-SFT [{label}]"] = evaluate_theta(other, other.theta_params, other.target_params, "",
                                              theta_step=other.theta_step, target_step=other.target_step,
                                              **opts)
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
