"""Does Q-SFT from a pretrained model beat BC and the control, and the character model given the same time?

SmolLM2-135M-Instruct with LoRA, in chat format, on Twenty Questions with the trap behaviour
(configs/twenty_questions_smollm2.py explains the task, the model and the budget), beside the
~0.4M-parameter character model trained from scratch on the same data for the same wall time:

    python experiments/pretrained_twenty_questions.py [--root /tmp/qsft_pretrained] [--episodes 64]
        [--select_episodes 32] [--betas 4,16,64] [--set FIELD=VALUE ...] [--char_set FIELD=VALUE ...]

Steps, each skipped when its output exists, so running the same command again continues where an
interruption stopped it (the trainer resumes an unfinished phase from its newest checkpoint):
1. ROOT/pretrained: the phases bc, qsft and control of the config, one trainer call each
   (`python -m qsft_jax.main ... --config.eval.enabled=False`);
2. ROOT/results/pretrained.{md,json}: scripts/results.py on it (beta chosen on --select_episodes
   separate episodes, then --episodes evaluation episodes per policy, held-out value diagnostics);
3. ROOT/char_calibration: the character model (`--config=...:char`) for --calibration_steps steps of BC
   and of Q-SFT, to measure its step times on this machine;
4. ROOT/char: the character model on the same data (ROOT/pretrained/data copied), its BC steps = the
   pretrained BC's wall time / its BC step time, its Q-SFT and control steps likewise from the mean of
   the pretrained Q-SFT and control wall times (chosen once, kept in the timings file);
5. ROOT/results/char.{md,json}: scripts/results.py on it, with the same episodes and seeds;
6. ROOT/summary.{md,json}: both models side by side, with each method's margin over BC and over the
   control in standard errors, and the wall time of every phase.

ROOT/wall_times.json records the wall time of every step as it goes: seconds summed over its calls,
a training call stopped by SIGTERM or Ctrl-C included (the trainer checkpoints before it exits, so
its work is kept and the time was spent; "stopped" counts those calls). Other stopped calls, whose
work is redone, and calls killed outright (SIGKILL, power) are not counted.
--set FIELD=VALUE (repeatable) overrides a field of the pretrained run's config (a smoke run:
--set bc.steps=2 --set qsft.steps=2 --episodes 4 --select_episodes 2); --char_set the character
model's.
SIGTERM or Ctrl-C stops the running step (a training phase saves a checkpoint) and the driver.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from qsft_jax import cli  # noqa: E402

PROG = "python experiments/pretrained_twenty_questions.py"
CONFIG = os.path.join(REPO, "configs", "twenty_questions_smollm2.py")
PHASES = ("bc", "qsft", "control")


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("root", "/tmp/qsft_pretrained", "Directory of every output.", flag_values=fv)
  flags.DEFINE_integer("episodes", 64, "Evaluation episodes per policy.", flag_values=fv)
  flags.DEFINE_integer("select_episodes", 32, "Episodes per beta on the selection seeds.", flag_values=fv)
  flags.DEFINE_list("betas", ["4", "16", "64"], "Betas the selection episodes choose from.", flag_values=fv)
  flags.DEFINE_integer("calibration_steps", 40, "Steps per phase of the character model's timing run.",
                       flag_values=fv)
  flags.DEFINE_multi_string("set", [], "FIELD=VALUE: a config override of the pretrained run.",
                            flag_values=fv)
  flags.DEFINE_multi_string("char_set", [], "FIELD=VALUE: a config override of the character model.",
                            flag_values=fv)
  return fv


class Driver:
  """The steps above, their skip tests and the timings file."""

  def __init__(self, args: flags.FlagValues):
    self.args = args
    self.root = os.path.abspath(args.root)
    self.timings_path = os.path.join(self.root, "wall_times.json")
    self.timings = {}
    if os.path.exists(self.timings_path):
      with open(self.timings_path) as f:
        self.timings = json.load(f)
    self.child: subprocess.Popen | None = None
    self.stopped_by: int | None = None  # the signal that stops the driver

  # -------------------------------------------------------------------- bookkeeping
  def save_timings(self) -> None:
    tmp = self.timings_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.timings, f, indent=1, sort_keys=True)
    os.replace(tmp, self.timings_path)

  def record(self, group: str, step: str, seconds: float, stopped: bool = False) -> None:
    entry = self.timings.setdefault(group, {}).setdefault(step, {"wall_s": 0.0, "calls": 0})
    entry["wall_s"] += seconds
    entry["calls"] += 1
    if stopped:
      entry["stopped"] = entry.get("stopped", 0) + 1
    self.save_timings()

  def call(self, argv: list[str], group: str, step: str, resumable: bool = False) -> None:
    """Runs argv (a python program of this repository) to completion and records its wall time; a
    resumable call (a trainer phase) stopped part way records its time too."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"[{time.strftime('%H:%M:%S')}] {group}/{step}: {' '.join(argv)}", flush=True)
    start = time.time()
    # Its own session: a terminal's Ctrl-C reaches the driver only, which stops the child with SIGTERM.
    self.child = subprocess.Popen([sys.executable] + argv, cwd=REPO, env=env, start_new_session=True)
    rc = self.child.wait()
    self.child = None
    if self.stopped_by is not None:
      if resumable:
        self.record(group, step, time.time() - start, stopped=True)
      print(f"{PROG}: stopped; rerun the same command to continue", file=sys.stderr)
      raise SystemExit(128 + self.stopped_by)
    if rc != 0:
      raise SystemExit(f"{PROG}: {group}/{step} failed (exit status {rc}); rerun to continue")
    self.record(group, step, time.time() - start)

  def stop(self, signum, frame) -> None:
    """SIGTERM / SIGINT: the running step gets SIGTERM (a trainer saves a checkpoint) and call()
    exits when it has; between steps, exit at once. (No wait() here: the handler runs inside call()'s
    wait(), which holds the lock a second wait() would take.)"""
    self.stopped_by = signum
    if self.child is not None:
      self.child.send_signal(signal.SIGTERM)
      return
    print(f"{PROG}: stopped; rerun the same command to continue", file=sys.stderr)
    raise SystemExit(128 + signum)

  # -------------------------------------------------------------------- steps
  def train(self, group: str, config: str, overrides: list[str]) -> None:
    """The phases bc, qsft, control of one run, one trainer call each, in ROOT/group."""
    workdir = os.path.join(self.root, group)
    for i, phase in enumerate(PHASES):
      if os.path.exists(os.path.join(workdir, phase, "DONE")):
        continue
      phases = "(" + ",".join(f"'{p}'" for p in PHASES[:i + 1]) + ",)"
      self.call(["-m", "qsft_jax.main", f"--config={config}", f"--workdir={workdir}",
                 "--config.eval.enabled=False", f"--config.phases={phases}"] + overrides, group, phase,
                resumable=True)

  def results(self, group: str, name: str) -> dict:
    out = os.path.join(self.root, "results", f"{group}.md")
    if not os.path.exists(out.replace(".md", ".json")):
      os.makedirs(os.path.dirname(out), exist_ok=True)
      a = self.args
      self.call(["scripts/results.py", f"--name={name}", f"--run={os.path.join(self.root, group)}",
                 f"--episodes={a.episodes}", f"--select_episodes={a.select_episodes}",
                 f"--betas={','.join(a.betas)}", f"--out={out}"], group, "results")
    with open(out.replace(".md", ".json")) as f:
      return json.load(f)

  def char_steps(self, char_overrides: list[str]) -> dict:
    """The character model's step counts for the pretrained phases' wall times (chosen once)."""
    if "char_steps" in self.timings:
      return self.timings["char_steps"]
    workdir = os.path.join(self.root, "char_calibration")
    n = self.args.calibration_steps
    if not all(os.path.exists(os.path.join(workdir, p, "DONE")) for p in ("bc", "qsft")):
      shutil.rmtree(workdir, ignore_errors=True)  # a fresh timing run: no resumed phase
      copy_data(os.path.join(self.root, "pretrained"), workdir)
      self.call(["-m", "qsft_jax.main", f"--config={CONFIG}:char", f"--workdir={workdir}",
                 "--config.eval.enabled=False", "--config.phases=('bc','qsft')", f"--config.bc.steps={n}",
                 f"--config.qsft.steps={n}", f"--config.checkpoint.every_steps={n}",
                 "--config.log.every_steps=10"] + char_overrides, "char_calibration", "bc+qsft")
    step_s = {p: seconds_per_step(os.path.join(workdir, p, "metrics.json")) for p in ("bc", "qsft")}
    wall = {p: self.timings["pretrained"][p]["wall_s"] for p in PHASES}
    steps = {"bc": max(1, round(wall["bc"] / step_s["bc"])),
             "qsft": max(1, round((wall["qsft"] + wall["control"]) / 2 / step_s["qsft"])),
             "bc_step_s": step_s["bc"], "qsft_step_s": step_s["qsft"]}
    # A checkpoint every ~5 minutes of the character model's steps.
    steps["checkpoint_every"] = max(1, round(300 / max(step_s.values())))
    self.timings["char_steps"] = steps
    self.save_timings()
    return steps

  def run(self) -> int:
    a = self.args
    os.makedirs(self.root, exist_ok=True)
    self.train("pretrained", CONFIG, [f"--config.{s}" for s in a.set])
    pretrained = self.results("pretrained", "Twenty Questions, SmolLM2-135M-Instruct (LoRA, chat)")
    char_overrides = [f"--config.{s}" for s in a.char_set]
    steps = self.char_steps(char_overrides)
    char_dir = os.path.join(self.root, "char")
    copy_data(os.path.join(self.root, "pretrained"), char_dir)
    self.train("char", f"{CONFIG}:char", [
        f"--config.bc.steps={steps['bc']}", f"--config.qsft.steps={steps['qsft']}",
        f"--config.checkpoint.every_steps={steps['checkpoint_every']}"] + char_overrides)
    char = self.results("char", "Twenty Questions, character model, same data and wall time")
    write_summary(self.root, {"SmolLM2-135M-Instruct, LoRA, chat": pretrained,
                              "character model, same wall time": char}, self.timings)
    return 0


def copy_data(src_workdir: str, dst_workdir: str) -> None:
  """src's generated data into dst (the trainer generates nothing when the files exist), unless dst
  has its own; both must then be the same bytes."""
  src, dst = os.path.join(src_workdir, "data"), os.path.join(dst_workdir, "data")
  os.makedirs(dst, exist_ok=True)
  for name in sorted(os.listdir(src)):
    if not name.endswith(".jsonl"):
      continue
    if not os.path.exists(os.path.join(dst, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name) + ".tmp")
      os.replace(os.path.join(dst, name) + ".tmp", os.path.join(dst, name))
    if digest(os.path.join(src, name)) != digest(os.path.join(dst, name)):
      raise SystemExit(f"{PROG}: {dst}/{name} differs from {src}/{name}: the two models must train on "
                       "the same data")


def digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def seconds_per_step(metrics_path: str) -> float:
  """Mean seconds per step of a phase's logged intervals, the first (compilation) left out."""
  with open(metrics_path) as f:
    history = [h for h in json.load(f) if "steps_per_s" in h]
  if len(history) < 2:
    raise SystemExit(f"{PROG}: {metrics_path}: fewer than two logged intervals; raise "
                     "--calibration_steps")
  seconds = steps = 0.0
  for prev, h in zip(history, history[1:]):
    seconds += (h["step"] - prev["step"]) / h["steps_per_s"]
    steps += h["step"] - prev["step"]
  return seconds / steps


def margin(a: dict, b: dict) -> float:
  """(mean a - mean b) in standard errors of the difference."""
  se = math.hypot(a["stderr"] or 0.0, b["stderr"] or 0.0)
  diff = a["mean_return"] - b["mean_return"]
  return diff / se if se > 0 else (math.inf if diff > 0 else -math.inf if diff < 0 else 0.0)


def mean_se(r: dict) -> str:
  return f"{r['mean_return']:.2f} +- {r['stderr'] or 0.0:.2f}"


def write_summary(root: str, runs: dict, timings: dict) -> None:
  """ROOT/summary.{md,json}: dataset, BC, control, Q-SFT per model, margins, correlations, times."""
  rows, record = [], {}
  for label, r in runs.items():
    bc, control, qsft = r["bc"], r["control"]["extract"], r["Q-SFT"]["extract"]
    cd, qd = r["control"]["diagnostics"], r["Q-SFT"]["diagnostics"]
    record[label] = {
        "dataset": r["dataset_mean_return"], "bc": bc, "control": control, "qsft": qsft,
        "control_beta": r["control"]["best_beta"], "qsft_beta": r["Q-SFT"]["best_beta"],
        "qsft_minus_bc_se": margin(qsft, bc), "qsft_minus_control_se": margin(qsft, control),
        "turn0_correlation": {"qsft": qd["first_turn_correlation"], "control": cd["first_turn_correlation"]},
        "correlation": {"qsft": qd["correlation"], "control": cd["correlation"]}}
    m = record[label]
    rows.append(
        f"| {label} | {m['dataset']:.2f} | {mean_se(bc)} | {mean_se(control)} (beta {m['control_beta']:g}) | "
        f"**{mean_se(qsft)}** (beta {m['qsft_beta']:g}) | "
        f"{m['qsft_minus_bc_se']:.1f} / {m['qsft_minus_control_se']:.1f} | "
        f"{qd['first_turn_correlation']:.2f} / {cd['first_turn_correlation']:.2f} | "
        f"{qd['correlation']:.2f} / {cd['correlation']:.2f} |")
  lines = ["| model | dataset | BC | control | Q-SFT | Q-SFT - BC / - control (stderr) | "
           "turn-0 value corr. (Q-SFT / control) | all turns |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"] + rows + ["", "Wall time (minutes):", ""]
  for group in ("pretrained", "char_calibration", "char"):
    for step, t in timings.get(group, {}).items():
      stopped = f", {t['stopped']} stopped and resumed" if t.get("stopped") else ""
      lines.append(f"- {group}/{step}: {t['wall_s'] / 60:.1f} ({t['calls']} call(s){stopped})")
  if "char_steps" in timings:
    s = timings["char_steps"]
    lines.append(f"- character model steps: BC {s['bc']}, Q-SFT and control {s['qsft']} each "
                 f"({s['bc_step_s']:.3f} s and {s['qsft_step_s']:.3f} s per step)")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write(text)
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump({"runs": record, "wall_times": timings}, f, indent=1, default=float)
  print(text)


def main(argv: list[str] | None = None) -> int:
  args = define_flags()
  cli.parse(args, argv, prog=PROG, doc=__doc__)
  for item in args.set + args.char_set:
    if "=" not in item:
      cli.usage_error(PROG, f"--set / --char_set expect FIELD=VALUE, got {item!r}")
  try:
    [float(b) for b in args.betas]
  except ValueError:
    cli.usage_error(PROG, f"--betas={','.join(args.betas)}: not a comma-separated list of numbers")
  driver = Driver(args)
  signal.signal(signal.SIGTERM, driver.stop)
  signal.signal(signal.SIGINT, driver.stop)
  return driver.run()


if __name__ == "__main__":
  cli.run(main)
