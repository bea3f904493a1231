"""Faults around an existing workdir: a changed config on a started run, reading an unfinished run,
SIGTERM during evaluation.

The config-change rules are checked on workdirs laid out by hand (config.json, checkpoint step
directories, DONE markers: what `run.check_workdir_config` reads), each case stating the expected
outcome; the trainer, evaluation and analysis are then run on real workdirs.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qsft_jax import config_lib
from qsft_jax import run as run_lib

import trainer_utils as tu
from test_analysis import make_workdir


def tiny(*overrides: str):
  """configs/tiny.py with `--config.FIELD=VALUE` overrides applied as the command line would."""
  config = config_lib.load_config_file(tu.TINY)
  for override in overrides:
    field, value = override[len("--config."):].split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    set_fields(config, {field: value})
  return config


def set_fields(config, fields: dict):
  for field, value in fields.items():
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def lay_out(path: str, config, progress: dict, data: bool = True) -> str:
  """A workdir holding `config` as config.json and, per phase of `progress` ({phase: (latest step,
  done)}), checkpoint directories up to that step (every 2) and a DONE marker when done."""
  os.makedirs(path, exist_ok=True)
  run_lib.write_json_atomic(os.path.join(path, "config.json"), config.to_dict())
  for phase, (step, done) in progress.items():
    for s in range(2, step + 1, 2):
      os.makedirs(os.path.join(path, phase, "checkpoints", str(s)))
    if done:
      with open(os.path.join(path, phase, "DONE"), "w") as f:
        f.write(f"{step}\n")
  if data:
    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    open(os.path.join(path, "data", "train.jsonl"), "w").close()
  return path


# tiny.py: bc.steps = qsft.steps = 8, d_model 32, phases (bc, qsft).
NOTHING = {}
BC_PART = {"bc": (4, False)}
QSFT_PART = {"bc": (8, True), "qsft": (4, False)}
FINISHED = {"bc": (8, True), "qsft": (8, True)}
ALL_THREE = {"bc": (8, True), "qsft": (8, True), "control": (8, True)}

# (case, old config fields, workdir progress, generated data, new config fields,
#  allowed changes (None: refused), a fragment of the refusal)
CASES = [
    ("another d_model on a finished run", {}, FINISHED, True, {"model.overrides.d_model": 48},
     None, "model.overrides.d_model: 32 -> 48  (the parameters' shapes and vocabulary; phase bc has "
     "started)"),
    ("more bc steps once qsft started", {}, QSFT_PART, True, {"bc.steps": 12},
     None, "bc.steps: 8 -> 12  (phase qsft has started from phase bc's result)"),
    ("more bc steps on a finished run", {}, FINISHED, True, {"bc.steps": 12},
     None, "phase qsft has started from phase bc's result"),
    ("more qsft steps on a finished run", {}, FINISHED, True, {"qsft.steps": 12},
     ["qsft.steps: 8 -> 12"], None),
    ("fewer qsft steps, not yet reached", {}, QSFT_PART, True, {"qsft.steps": 6},
     ["qsft.steps: 8 -> 6"], None),
    ("fewer qsft steps than already reached", {}, QSFT_PART, True, {"qsft.steps": 2},
     None, "qsft.steps: 8 -> 2  (phase qsft is already at step 4)"),
    ("more bc steps while bc runs", {}, BC_PART, True, {"bc.steps": 16}, ["bc.steps: 8 -> 16"], None),
    ("phase 2 settings before phase 2 started", {}, BC_PART, True,
     {"qsft.mc_mix": 0.5, "qsft.learning_rate": 0.01},
     ["qsft.learning_rate: 0.001 -> 0.01", "qsft.mc_mix: 0.0 -> 0.5"], None),
    ("phase 2 targets once phase 2 started", {}, QSFT_PART, True, {"qsft.mc_mix": 0.5},
     None, "qsft.mc_mix: 0.0 -> 0.5  (phase 2's targets"),
    ("the control's qsft.* settings once the control started", {"phases": ("bc", "control")},
     {"bc": (8, True), "control": (2, False)}, True, {"qsft.n_step": 2},
     None, "phase control has started"),
    ("bc's learning rate once bc started", {}, BC_PART, True, {"bc.learning_rate": 0.01},
     None, "bc.learning_rate: 0.001 -> 0.01"),
    ("the seed once bc started", {}, BC_PART, True, {"seed": 1}, None, "seed: 0 -> 1"),
    ("the reward transform once bc started", {}, BC_PART, True, {"data.reward_transform": "none"},
     None, 'data.reward_transform: "terminal_return:-40,-1" -> "none"'),
    ("logging, evaluation, checkpoints, mesh, distribution, non-finite steps, chunks", {}, FINISHED,
     True,
     {"log.every_steps": 1, "eval.episodes": 3, "checkpoint.keep": 5, "mesh.shape.data": 8,
      "distributed.enabled": True, "on_nonfinite": "skip", "loss.chunk_size": 32,
      "qsft.microbatches": 2},
     ["checkpoint.keep: 2 -> 5", "distributed.enabled: false -> true", "eval.episodes: 8 -> 3",
      "log.every_steps: 4 -> 1", "loss.chunk_size: 64 -> 32", "mesh.shape.data: -1 -> 8",
      'on_nonfinite: "stop" -> "skip"', "qsft.microbatches: 1 -> 2"], None),
    ("a phase appended to a finished run", {}, FINISHED, True, {"phases": ("bc", "qsft", "control")},
     ['phases: ["bc", "qsft"] -> ["bc", "qsft", "control"]'], None),
    ("a phase that never started dropped", {"phases": ("bc", "qsft", "control")}, QSFT_PART, True,
     {"phases": ("bc", "qsft")}, ['phases: ["bc", "qsft", "control"] -> ["bc", "qsft"]'], None),
    ("phases reordered after they started", {"phases": ("bc", "qsft", "control")}, ALL_THREE, True,
     {"phases": ("bc", "control", "qsft")}, None, "bc, qsft, control started"),
    ("data workers while a phase is part way", {}, QSFT_PART, True, {"data.num_workers": 2},
     None, "phase qsft is part way"),
    ("data workers between phases", {}, FINISHED, True, {"data.num_workers": 2},
     ["data.num_workers: 0 -> 2"], None),
    ("the dataset once it was generated", {}, NOTHING, True, {"dataset.num_episodes": 10},
     None, "dataset.num_episodes: 64 -> 10  (the generated data and the environment the run is "
     "evaluated on; its data were generated)"),
    ("the model before anything trained", {}, NOTHING, False, {"model.overrides.d_model": 48},
     ["model.overrides.d_model: 32 -> 48"], None),
    ("a field the workdir's config lacks", {}, FINISHED, True, {"model.overrides.rope_theta": 1e4},
     None, "model.overrides.rope_theta: (absent) -> 10000.0"),
]


@pytest.mark.parametrize("case, old, progress, data, new, allowed, refused", CASES,
                         ids=[c[0] for c in CASES])
def test_config_change_rules(tmp_path, case, old, progress, data, new, allowed, refused):
  workdir = lay_out(str(tmp_path), set_fields(tiny(), old), progress, data)
  before = open(os.path.join(workdir, "config.json")).read()
  config = set_fields(set_fields(tiny(), old), new)
  if allowed is not None:
    assert run_lib.check_workdir_config(workdir, config) == allowed
  else:
    with pytest.raises(run_lib.ConfigDriftError) as e:
      run_lib.check_workdir_config(workdir, config)
    assert refused in str(e.value)
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_same_config_and_new_workdir_pass(tmp_path):
  assert run_lib.check_workdir_config(str(tmp_path / "new"), tiny()) == []
  assert not os.path.exists(tmp_path / "new")
  workdir = lay_out(str(tmp_path / "run"), tiny(), FINISHED)
  assert run_lib.check_workdir_config(workdir, tiny()) == []


def test_refusal_lists_every_change_and_what_to_do(tmp_path):
  workdir = lay_out(str(tmp_path), tiny(), FINISHED)
  config = set_fields(tiny(), {"model.overrides.d_model": 48, "seed": 3, "log.every_steps": 1})
  with pytest.raises(run_lib.ConfigDriftError) as e:
    run_lib.check_workdir_config(workdir, config)
  lines = str(e.value).splitlines()
  assert lines[0].startswith(os.path.join(workdir, "config.json")) and "2 change(s)" in lines[0]
  assert [line.split("  (")[0].strip() for line in lines[1:-1]] == [
      "model.overrides.d_model: 32 -> 48", "seed: 0 -> 3"]  # the safe change is not listed
  assert "new --workdir" in lines[-1]


def test_every_base_config_field_has_its_own_rule():
  """New fields must be placed in the table on purpose: none may fall through to the catch-all."""
  catch_all = run_lib.CONFIG_CHANGE_RULES[-1]
  assert catch_all.fields == ("*",)
  fields = run_lib._flatten(run_lib._as_json(config_lib.base_config()))
  assert [f for f in fields if run_lib._rule_for(f) is catch_all] == []


def test_damaged_config_json(tmp_path):
  started = lay_out(str(tmp_path / "started"), tiny(), BC_PART)
  fresh = lay_out(str(tmp_path / "fresh"), tiny(), NOTHING, data=False)
  for workdir in (started, fresh):
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write('{"seed": ')
  with pytest.raises(run_lib.WorkdirError, match="config.json: cannot be read"):
    run_lib.check_workdir_config(started, tiny())
  assert run_lib.check_workdir_config(fresh, tiny()) == []  # nothing was trained under it


def test_allowed_changes_are_recorded(tmp_path):
  workdir = lay_out(str(tmp_path), tiny(), FINISHED)
  config = set_fields(tiny(), {"qsft.steps": 12, "eval.episodes": 3})
  assert run_lib.check_workdir_config(workdir, config) == ["eval.episodes: 8 -> 3", "qsft.steps: 8 -> 12"]
  run_lib.write_config(workdir, config)
  run_lib.write_config(workdir, config)  # the same config again: nothing to record
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    entries = [json.loads(line) for line in f]
  assert len(entries) == 1 and entries[0]["changes"] == ["eval.episodes: 8 -> 3", "qsft.steps: 8 -> 12"]
  assert abs(time.mktime(time.strptime(entries[0]["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(
      time.gmtime())) < 600
  assert run_lib.read_config(workdir).qsft.steps == 12


def test_unfinished_phases_are_named(tmp_path):
  config = tiny("--config.phases=('bc','qsft','control')")
  workdir = lay_out(str(tmp_path), config, QSFT_PART)
  with pytest.raises(run_lib.UnfinishedRunError) as e:
    run_lib.check_finished(workdir, config, allow_unfinished=False, override="--allow_unfinished")
  message = str(e.value)
  assert "bc (" not in message
  assert "qsft (checkpoint step 4 of 8 steps, config.qsft.steps)" in message
  assert "control (no checkpoint of 8 steps, config.qsft.steps)" in message
  assert "--allow_unfinished" in message
  # a DONE marker for fewer steps than configured is no finished phase
  set_fields(config, {"bc.steps": 12})
  names = [p.phase for p in run_lib.check_finished(workdir, config, allow_unfinished=True,
                                                   override="--allow_unfinished")]
  assert names == ["bc", "qsft", "control"]
  finished = lay_out(str(tmp_path / "finished"), tiny(), FINISHED)
  assert run_lib.check_finished(finished, tiny(), allow_unfinished=False, override="-") == []


# ------------------------------------------------------------------------------------------------
# The trainer on a finished workdir


def snapshot(path: str) -> dict[str, str]:
  """{relative path: sha256} of every file under path."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.slow
def test_trainer_refuses_drift_and_records_more_qsft_steps(tmp_path, capsys):
  """Another d_model, or more bc steps once qsft started: refused before anything is written, and
  the workdir still evaluates and loads. More qsft steps on the finished run: trained and recorded."""
  from qsft_jax import analysis, evaluate, main

  workdir = str(tmp_path / "run")
  shutil.copytree(tu.reference_run(), workdir)
  before = snapshot(workdir)
  for change, fragment in (("--config.model.overrides.d_model=48", "model.overrides.d_model: 32 -> 48"),
                           (f"--config.bc.steps={tu.STEPS + 6}",
                            f"bc.steps: {tu.STEPS} -> {tu.STEPS + 6}  (phase qsft has started")):
    with pytest.raises(run_lib.ConfigDriftError) as e:
      main.run(tiny(*tu.SHARED_OVERRIDES, change), workdir)
    assert fragment in str(e.value)
    assert snapshot(workdir) == before, "a refused start wrote to the workdir"

  assert evaluate.main(["evaluate", f"--workdir={workdir}", "--episodes=2", "--betas=0,4", "--no_ratio",
                        "--max_new_tokens=2"]) == 0
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["checkpoint_steps"] == {"phi": tu.STEPS, "theta": tu.STEPS, "theta_bar": tu.STEPS,
                                         "control": None}
  assert results["unfinished_phases"] == []
  assert analysis.load(workdir).theta_params is not None

  more = tu.STEPS + 2
  overrides = [o for o in tu.SHARED_OVERRIDES if not o.startswith("--config.qsft.steps=")]
  text = tu.run_ok(workdir, *overrides, f"--config.qsft.steps={more}")
  assert f"qsft.steps: {tu.STEPS} -> {more}" in text
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    entries = [json.loads(line) for line in f]
  assert [e["changes"] for e in entries] == [[f"qsft.steps: {tu.STEPS} -> {more}"]]
  assert run_lib.read_config(workdir).qsft.steps == more
  assert more in tu.checkpoint_steps(workdir, "qsft")
  with open(os.path.join(workdir, "qsft", "DONE")) as f:
    assert f.read().strip() == str(more)
  after = snapshot(workdir)
  for name in ("model_config.json", "tokenizer.json"):
    assert after[name] == before[name]
  assert {k: v for k, v in after.items() if k.startswith("bc" + os.sep)} == {
      k: v for k, v in before.items() if k.startswith("bc" + os.sep)}, "phase 1 was touched"


# ------------------------------------------------------------------------------------------------
# Evaluating and analysing an unfinished run


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
  """bc and qsft at checkpoint step 1 of 5 configured steps, no DONE."""
  path = str(tmp_path_factory.mktemp("unfinished"))
  make_workdir(path, steps=5, done=False)
  return path


def test_evaluate_refuses_an_unfinished_run_unless_told(unfinished):
  from qsft_jax import evaluate

  argv = ["evaluate", f"--workdir={unfinished}", "--episodes=2", "--betas=0", "--no_ratio",
          "--max_new_tokens=2"]
  with pytest.raises(run_lib.UnfinishedRunError) as e:
    evaluate.main(argv)
  message = str(e.value)
  for phase in ("bc", "qsft"):
    assert f"{phase} (checkpoint step 1 of 5 steps, config.{phase}.steps)" in message
  assert "--allow_unfinished" in message
  results_path = os.path.join(unfinished, "eval", "results.json")
  assert not os.path.exists(results_path)

  assert evaluate.main([*argv, "--allow_unfinished"]) == 0
  with open(results_path) as f:
    results = json.load(f)
  assert results["unfinished_phases"] == [{"phase": "bc", "step": 1, "steps": 5},
                                          {"phase": "qsft", "step": 1, "steps": 5}]
  assert results["checkpoint_steps"] == {"phi": 1, "theta": 1, "theta_bar": 1, "control": None}
  with open(os.path.join(unfinished, "eval", "results.md")) as f:
    assert "Unfinished: phase qsft (checkpoint step 1 of 5 steps)" in f.read()


def test_analysis_refuses_an_unfinished_run_unless_told(unfinished):
  from qsft_jax import analysis

  with pytest.raises(run_lib.UnfinishedRunError, match=r"qsft \(checkpoint step 1 of 5 steps.*"
                     r"allow_unfinished=True"):
    analysis.load(unfinished)
  assert analysis.load(unfinished, allow_unfinished=True).theta_params is not None


# ------------------------------------------------------------------------------------------------
# SIGTERM during evaluation


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("finished"))
  make_workdir(path)
  return path


def test_sigterm_stops_the_evaluate_program(finished):
  """Episodes enough for many minutes; SIGTERM once it plays: exit 143 within seconds, one line, no
  results.json."""
  results = os.path.join(finished, "eval", "results.json")
  out, err = os.path.join(finished, "evaluate.out"), os.path.join(finished, "evaluate.err")
  with open(out, "wb") as o, open(err, "wb") as e:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsft_jax.evaluate", f"--workdir={finished}", "--episodes=100000",
         "--batch_size=4", "--betas=0", "--no_ratio", "--max_new_tokens=2"],
        cwd=tu.REPO, stdout=o, stderr=e, env=tu.subprocess_env(device_count=1))
  try:
    deadline = time.time() + 240
    while "evaluate: " not in open(out).read():
      assert proc.poll() is None, open(err).read()[-3000:]
      assert time.time() < deadline, "evaluation did not start"
      time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  stderr = open(err).read()
  assert rc == 143, stderr[-3000:]
  assert time.time() - sent < 60
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("evaluate: SIGTERM: evaluation interrupted during policy 'bc'"), stderr[-3000:]
  assert f"nothing was written as {results}" in last
  assert "Traceback" not in stderr
  assert not os.path.exists(results)


def test_sigterm_during_evaluation_is_not_left_to_the_trainers_handler(finished, monkeypatch):
  """The trainer's preemption handler only sets a flag its train loop polls; evaluation installs its
  own while it runs (and gives the trainer's back), so SIGTERM stops it at the next batch."""
  from qsft_jax import evaluate

  seen = []
  trainers = lambda signum, frame: seen.append(signum)
  previous = signal.signal(signal.SIGTERM, trainers)
  real_play = evaluate.play_batch

  def play_after_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_play(*args, **kwargs)

  monkeypatch.setattr(evaluate, "play_batch", play_after_sigterm)
  try:
    with pytest.raises(SystemExit) as e:
      evaluate.evaluate_workdir(finished, episodes=4, betas=(0.0,), ratio=False, max_new_tokens=2)
    assert e.value.code == 143 and isinstance(e.value, evaluate.EvaluationInterrupted)
    assert seen == [] and signal.getsignal(signal.SIGTERM) is trainers
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert not os.path.exists(os.path.join(finished, "eval", "results.json"))


def test_a_field_newer_than_the_workdir_at_its_default_is_no_change(tmp_path):
  """A workdir written before a config field existed (its config.json lacks it) resumes when the
  field holds its default, the value the run effectively used; another value is still refused."""
  old = tiny().to_dict()
  del old["data"]["unknown_chars"]
  path = lay_out(str(tmp_path / "w"), tiny(), FINISHED)
  run_lib.write_json_atomic(os.path.join(path, "config.json"), old)
  assert run_lib.check_workdir_config(path, tiny()) == []
  with pytest.raises(run_lib.ConfigDriftError, match="data.unknown_chars"):
    run_lib.check_workdir_config(path, tiny("--config.data.unknown_chars=unk"))
