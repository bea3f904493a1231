"""Every program of the repository follows one command-line convention (qsft_jax/cli.py).

The programs are found, not listed: each module of qsft_jax/ runnable with `python -m` (a `__main__.py`
or an `if __name__ == "__main__":` block) and each script in benchmarks/, experiments/ and scripts/.
Each answers --help with exit status 0 and an unknown flag with exit status 2 and one line on
stderr, no traceback; no argparse import remains. Each enters through `cli.run(main)`, which reports a
failure the user can fix (`qsft_jax.errors.UserError`, an unwritable or full disk) as one line with
exit status 1. Programs with a `main(argv)` are called in-process
(argv[0] is the program name, as in sys.argv); the flag spellings users already type are checked
against each program's own flag definitions, without running the program.
"""
from __future__ import annotations

import errno
import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from types import ModuleType

import pytest
from absl import flags

from qsft_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_DIRS = ("benchmarks", "experiments", "scripts")


def package_programs() -> dict[str, str]:
  """{module name for `python -m`: its file} for every runnable module of qsft_jax/."""
  found = {}
  for path in sorted(glob.glob(os.path.join(REPO, "qsft_jax", "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, REPO)
    parts = rel[:-len(".py")].split(os.sep)
    with open(path, encoding="utf-8") as f:
      runnable = parts[-1] == "__main__" or re.search(r"^if __name__ == .__main__.:", f.read(), re.M)
    if runnable:
      name = ".".join(parts[:-1] if parts[-1] == "__main__" else parts)
      found[name] = rel
  return found


# Programs that run before qsft_jax's dependencies are installed, so with the standard library only
# (argparse instead of absl): scripts/check_install.py resolves the README's install blocks.
STDLIB_ONLY = {"scripts/check_install.py"}


def script_programs() -> list[str]:
  return sorted(rel for d in SCRIPT_DIRS for p in glob.glob(os.path.join(REPO, d, "*.py"))
                if (rel := os.path.relpath(p, REPO)) not in STDLIB_ONLY)


PROGRAMS = [("module", name, rel) for name, rel in package_programs().items()] + \
    [("script", rel, rel) for rel in script_programs()]


def test_the_programs_are_found():
  modules = {name for kind, name, _ in PROGRAMS if kind == "module"}
  assert {"qsft_jax.main", "qsft_jax.evaluate", "qsft_jax.data", "qsft_jax.envs.generate"} <= modules
  scripts = {name for kind, name, _ in PROGRAMS if kind == "script"}
  assert {"benchmarks/sampler.py", "experiments/propagation_speed.py", "scripts/results.py"} <= scripts


def load(kind: str, name: str, rel: str) -> ModuleType:
  if kind == "module":
    return importlib.import_module(name if not rel.endswith("__main__.py") else f"{name}.__main__")
  module_name = "cli_test_" + re.sub(r"\W", "_", rel)
  if module_name in sys.modules:
    return sys.modules[module_name]
  spec = importlib.util.spec_from_file_location(module_name, os.path.join(REPO, rel))
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  return module


def run(kind: str, name: str, rel: str, args: list[str], capsys) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of the program with `args`: in-process through its main(argv)
  when it has one, else in a subprocess."""
  module = load(kind, name, rel)
  capsys.readouterr()  # whatever importing printed
  if callable(getattr(module, "main", None)):
    with pytest.raises(SystemExit) as exit_:
      module.main([name, *args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err
  command = ["-m", name] if kind == "module" else [rel]
  result = subprocess.run([sys.executable, *command, *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
  return result.returncode, result.stdout, result.stderr


def subprocess_env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize("kind,name,rel", PROGRAMS, ids=[p[1] for p in PROGRAMS])
def test_help_exits_0_and_an_unknown_flag_exits_2_in_one_line(kind, name, rel, capsys):
  code, out, err = run(kind, name, rel, ["--help"], capsys)
  assert code == 0, err
  assert f"Flags of python {'-m ' if kind == 'module' else ''}{name}:" in out, out
  assert "-h, --[no]help" in out, out
  code, out, err = run(kind, name, rel, ["--no_such_flag=1"], capsys)
  assert code == 2
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith("FATAL: ") and "no_such_flag" in err, err


def test_as_the_shell_runs_them(tmp_path):
  """The `if __name__ == "__main__"` entry points: a module with -m and a script by its path; usage
  errors exit 2, a UserError (here: a workdir that is not one) exits 1, each in one line."""
  cases = {("-m", "qsft_jax.envs.generate", "--task=go"):
               (2, "FATAL: python -m qsft_jax.envs.generate: flag --task=go: value should be one of <"),
           ("scripts/results.py", "--name"):
               (2, "FATAL: python scripts/results.py: Missing value for flag --name (--help lists the flags)"),
           ("-m", "qsft_jax.evaluate", f"--workdir={tmp_path}"):
               (1, f"FATAL: python -m qsft_jax.evaluate: {tmp_path}/config.json: no config.json; is "
                   f"'{tmp_path}' a qsft_jax workdir?")}
  for command, (code, line) in cases.items():
    result = subprocess.run([sys.executable, *command], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == code and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(line), result.stderr


def test_every_program_enters_through_cli_run():
  """The body of each program's `if __name__ == "__main__":` block is `cli.run(main)`."""
  entry = re.compile(r"^if __name__ == .__main__.:\n(.*)\Z", re.M | re.S)
  for kind, name, rel in PROGRAMS:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
      block = entry.search(f.read())
    assert block and block[1].strip() == "cli.run(main)", (rel, block and block[1])


def test_no_argparse_remains():
  pattern = re.compile(r"^\s*(import\s+argparse|from\s+argparse\s+import)\b", re.M)
  offenders = []
  for rel in [rel for _, _, rel in PROGRAMS] + [
      os.path.relpath(p, REPO) for d in ("qsft_jax", *SCRIPT_DIRS)
      for p in glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True)
      if os.path.relpath(p, REPO) not in STDLIB_ONLY]:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
      if pattern.search(f.read()):
        offenders.append(rel)
  assert not sorted(set(offenders))


# ------------------------------------------------------------------------------------------------
# The spellings users type, read by each program's own flags (nothing runs)


def parsed(define, args: list[str], **parse_kwargs) -> tuple[flags.FlagValues, list[str]]:
  fv = define()
  rest = cli.parse(fv, ["prog", *args], prog="prog", **parse_kwargs)
  return fv, rest


def script(rel: str) -> ModuleType:
  return load("script", rel, rel)


def test_evaluate_flags():
  from qsft_jax import evaluate
  fv, _ = parsed(evaluate.define_flags, ["--workdir=/w", "--episodes", "3", "--betas", "0,1,4,16", "--no_ratio",
                                         "--temperature", "0.5", "--dataset_mean_return", "-5.5"])
  assert (fv.workdir, fv.episodes, fv.betas, fv.ratio, fv.temperature, fv.dataset_mean_return) == (
      "/w", 3, ["0", "1", "4", "16"], False, 0.5, -5.5)
  fv, _ = parsed(evaluate.define_flags, ["--workdir", "/w"])
  assert (fv.ratio, fv.betas, fv.episodes, fv.temperature) == (True, None, None, 0.0)


def test_data_flags_and_positional_paths(tmp_path, capsys):
  from qsft_jax.data import __main__ as data_cli
  fv, rest = parsed(data_cli.validate_flags, ["a.jsonl", "--max-length", "32", "b/*.jsonl", "--overlong",
                                              "drop", "--reward-transform", "terminal_return:0,2",
                                              "--gamma-token=0.5"], positional="PATH...")
  assert rest == ["a.jsonl", "b/*.jsonl"]
  assert (fv.max_length, fv.overlong, fv.reward_transform, fv.gamma_token) == (
      32, "drop", "terminal_return:0,2", 0.5)
  fv, rest = parsed(data_cli.build_flags, ["data/maze", "--data-dir", "/d", "--manual_dir=/m", "--overwrite",
                                           "--gen", "num_train=100", "--gen", "x=1"],
                    positional="BUILDER_DIR")
  assert rest == ["data/maze"] and (fv.data_dir, fv.manual_dir, fv.overwrite, fv.gen) == (
      "/d", "/m", True, ["num_train=100", "x=1"])
  # usage errors of the commands: one line, exit 2
  for argv, message in (
      ([], "no command"), (["check", "x"], "unknown command 'check'"),
      (["validate"], "takes PATH... as positional arguments, got 0"),
      (["validate", "x.jsonl", "--overlong", "keep"], "--overlong"),
      (["build", "data/maze"], "--data_dir is required"),
      (["build", "data/maze", "data/wordle", "--data_dir=/d"], "got 2"),
      (["build", "data/maze", "--data_dir=/d", "--gen", "nokey"], "--gen expects KEY=VALUE")):
    with pytest.raises(SystemExit) as exit_:
      data_cli.main(["data", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)
  for argv, heading in ((["--help"], "Flags of python -m qsft_jax.data:"),
                        (["validate", "--help"], "Flags of python -m qsft_jax.data validate:"),
                        (["build", "-h"], "Flags of python -m qsft_jax.data build:")):
    with pytest.raises(SystemExit) as exit_:
      data_cli.main(["data", *argv])
    assert exit_.value.code == 0 and heading in capsys.readouterr().out


def test_generate_flags():
  from qsft_jax.envs import generate
  fv, _ = parsed(generate.define_flags, ["--task", "maze", "--episodes", "5", "--out", "x.jsonl",
                                         "--policy", "trap", "--opt", "max_steps=25", "--opt", "actions=words"])
  assert (fv.task, fv.episodes, fv.seed, fv.out, fv.policy, fv.opt) == (
      "maze", 5, 0, "x.jsonl", "trap", ["max_steps=25", "actions=words"])


def test_benchmark_experiment_and_tool_flags():
  fv, _ = parsed(script("benchmarks/model_throughput.py").define_flags,
                 ["--scan-layers", "--skip-torch", "--weight-decay", "0.1", "--seq=64"])
  assert (fv.scan_layers, fv.skip_torch, fv.weight_decay, fv.seq, fv.platform) == (
      True, True, 0.1, 64, "cpu")
  fv, _ = parsed(script("benchmarks/input_pipeline.py").define_flags,
                 ["--max-length", "64", "--num-workers", "2", "--pack-window=8", "--task", "wordle_like"])
  assert (fv.max_length, fv.num_workers, fv.pack_window, fv.task) == (64, 2, 8, "wordle_like")
  fv, _ = parsed(script("benchmarks/sampler.py").define_flags,
                 ["--preset", "8m", "--override", "num_layers=16", "--override", "decode_attention=dot"])
  assert (fv.preset, fv.override, fv.batch) == ("8m", ["num_layers=16", "decode_attention=dot"], None)
  fv, _ = parsed(script("benchmarks/step_cost.py").define_flags, ["--batch", "2", "--chunk", "16"])
  assert (fv.batch, fv.length, fv.chunk) == (2, 256, 16)
  fv, _ = parsed(script("experiments/propagation_speed.py").define_flags,
                 ["--quick", "--only", "token", "--eval_every=10"])
  assert (fv.quick, fv.only, fv.eval_every, fv.steps) == (True, "token", 10, 2000)
  fv, _ = parsed(script("scripts/results.py").define_flags,
                 ["--name", "m", "--run", "/r", "--out", "o.md", "--qsft", "a=/x", "--betas", "1,4"])
  assert (fv.name, fv.run, fv.out, fv.qsft, fv.betas, fv.episodes) == (
      "m", "/r", "o.md", ["a=/x"], ["1", "4"], 100)


# ------------------------------------------------------------------------------------------------
# qsft_jax/cli.py itself


def small_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_integer("max_length", 0, "", flag_values=fv)
  flags.DEFINE_bool("ratio", True, "", flag_values=fv)
  flags.DEFINE_string("template", "", "", flag_values=fv)
  flags.DEFINE_string("no-dash", "", "a name defined with a dash is itself", flag_values=fv)
  flags.DEFINE_string("out", None, "", flag_values=fv)
  return fv


@pytest.mark.parametrize("args,expected", [
    (["--max-length", "5"], (5, True, "")),
    (["--max_length=5", "--noratio"], (5, False, "")),
    (["--no_ratio"], (0, False, "")),
    (["--no-ratio", "--ratio"], (0, True, "")),
    (["-max-length", "7"], (7, True, "")),
    (["--template", "--max-length"], (0, True, "--max-length")),  # a value passes verbatim
    (["--template=-x", "--max-length=-2"], (-2, True, "-x")),
])
def test_names_take_dash_or_underscore_and_booleans_every_negation(args, expected):
  fv, rest = parsed(small_flags, args)
  assert (fv.max_length, fv.ratio, fv.template) == expected and rest == []


def test_after_double_dash_nothing_is_rewritten():
  fv, rest = parsed(small_flags, ["--no-dash=a", "p", "--", "--max-length"], positional="ARGS...")
  assert fv["no-dash"].value == "a" and rest == ["p", "--max-length"]


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "Unknown command line flag 'bogus'"),
    (["--max_lenght=3"], "Did you mean: max_length"),
    (["--max-length=x"], "--max_length=x"),
    (["--max-length"], "Missing value"),
    (["--noratio=1"], "--noratio=1: clearing a boolean flag takes no value"),
    (["--no-ratio=false"], "--no-ratio=false: clearing a boolean flag takes no value"),
    (["stray"], "unexpected arguments: stray"),
])
def test_usage_errors_are_one_line_with_status_2(args, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    parsed(small_flags, args)
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1, err
  assert err.startswith("FATAL: prog: ") and message in err, err


def test_required_flag_and_help(capsys):
  with pytest.raises(SystemExit) as exit_:
    parsed(small_flags, ["--template="], required=["out"])
  assert exit_.value.code == 2 and capsys.readouterr().err == (
      "FATAL: prog: --out is required (--help lists the flags)\n")
  with pytest.raises(SystemExit) as exit_:
    parsed(small_flags, ["x", "--help"], doc="What prog does.", positional="PATH...")
  out = capsys.readouterr().out
  assert exit_.value.code == 0 and out.startswith("What prog does.\n\nUsage: prog [flags] PATH...\n")
  assert "--max_length" in out and "--[no]ratio" in out


def test_a_config_file_that_does_not_load_is_a_usage_error(tmp_path, capsys):
  from qsft_jax import main
  missing = str(tmp_path / "nope.py")
  with pytest.raises(SystemExit) as exit_:
    cli.parse(main.define_flags(["main", f"--config={missing}"]), ["main", f"--config={missing}"], prog="prog")
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1, err
  assert err.startswith("FATAL: prog: --config: cannot load the config file:") and missing in err, err


def test_usage_error_flattens_the_message(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.usage_error("prog", "two\nlines")
  assert exit_.value.code == 2 and capsys.readouterr().err == "FATAL: prog: two lines\n"


def test_argv_without_the_program_name_is_a_programming_error():
  with pytest.raises(ValueError, match="argv\\[0\\] is the program name"):
    cli.parse(small_flags(), ["--max-length", "3"], prog="prog")


# ------------------------------------------------------------------------------------------------
# cli.run: the entry point


def entry(capsys, body, argv=("prog",)) -> tuple[int, str]:
  """(exit status, stderr) of cli.run on a program whose main parses `argv` (prog "python -m fake")
  and then runs body()."""
  def main(argv):
    cli.parse(cli.new_flags(), argv, prog="python -m fake")
    return body()
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    cli.run(main, list(argv))
  return exit_.value.code, capsys.readouterr().err


def test_run_reports_a_user_error_in_one_line_with_exit_status_1(capsys, monkeypatch):
  from qsft_jax import errors
  monkeypatch.delenv("QSFT_DEBUG", raising=False)

  def fails(error):
    def body():
      raise error
    return body

  code, err = entry(capsys, fails(errors.ConfigError("config.bc.steps: must be >= 1; got 0")))
  assert (code, err) == (1, "FATAL: python -m fake: config.bc.steps: must be >= 1; got 0\n")
  # a message of several lines keeps them (a list of bad data lines), and nothing else
  lines = "2 bad lines:\n  a.jsonl:3: turns: missing\n  a.jsonl:9: x\n"
  code, err = entry(capsys, fails(errors.UserError(lines)))
  assert (code, err) == (1, f"FATAL: python -m fake: {lines}")
  # a full disk, wherever it is raised
  code, err = entry(capsys, fails(OSError(errno.ENOSPC, "No space left on device", "/w/x.json")))
  assert (code, err) == (1, "FATAL: python -m fake: /w/x.json: no space left on the device; free some space "
                            "(or write elsewhere), then rerun the same command\n")
  # anything else is a bug: its traceback stays
  with pytest.raises(ZeroDivisionError):
    entry(capsys, lambda: 1 / 0)
  # QSFT_DEBUG=1: the traceback, then the same line
  monkeypatch.setenv("QSFT_DEBUG", "1")
  code, err = entry(capsys, fails(errors.ConfigError("config.task: 'go' is not a bundled task")))
  assert code == 1 and err.startswith("Traceback (most recent call last)") and "in body" in err, err
  assert err.endswith("\nFATAL: python -m fake: config.task: 'go' is not a bundled task\n"), err


def test_run_exits_with_mains_status_and_usage_errors_keep_status_2(capsys):
  assert entry(capsys, lambda: 3) == (3, "")
  assert entry(capsys, lambda: {"tokens_per_s": 1.0}) == (0, "")  # benchmarks return their record
  assert entry(capsys, lambda: None) == (0, "")
  code, err = entry(capsys, lambda: 0, argv=("prog", "--nope"))
  assert code == 2 and err.startswith("FATAL: python -m fake: Unknown command line flag 'nope'"), err


def test_run_holds_back_library_logs_of_a_storage_failure(capsys, monkeypatch):
  """Orbax logs a failed background write with its traceback, then raises it: the log record is held
  back behind the one FATAL line, and printed after all (one line) when the program does not fail."""
  import logging as pylogging
  monkeypatch.delenv("QSFT_DEBUG", raising=False)
  failure = OSError(errno.ENOSPC, "No space left on device", "/w/bc/checkpoints/4.tmp")
  shown = []
  handler = pylogging.Handler()
  handler.emit = lambda record: shown.append(record.getMessage())
  root = pylogging.getLogger()
  root.addHandler(handler)
  monkeypatch.setattr(root, "level", pylogging.WARNING)
  monkeypatch.setattr(pylogging.getLogger("orbax_like"), "propagate", True)

  def logs_then(fails: bool):
    def body():
      try:
        raise failure
      except OSError:
        pylogging.getLogger("orbax_like").error("background save failed", exc_info=True)
      pylogging.getLogger("orbax_like").error("another problem")
      if fails:
        raise RuntimeError("finalize failed") from failure
      return 0
    return body

  try:
    code, err = entry(capsys, logs_then(True))
    assert code == 1 and shown == ["another problem"], shown
    assert err == ("FATAL: python -m fake: /w/bc/checkpoints/4.tmp: no space left on the device; free some "
                   "space (or write elsewhere), then rerun the same command\n"), err
    shown.clear()
    code, err = entry(capsys, logs_then(False))
    assert code == 0 and shown == ["another problem"], shown
    assert err == "WARNING: held back during the run: ERROR: background save failed\n", err
    pylogging.getLogger("orbax_like").error("background save failed after the program: shown")
    assert shown == ["another problem", "background save failed after the program: shown"]
  finally:
    root.removeHandler(handler)
