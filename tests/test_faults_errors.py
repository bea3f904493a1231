"""Faults and bad input, as the user sees them: one line `FATAL: PROG: message`, exit status 1, no
traceback (QSFT_DEBUG=1 shows it), and nothing written before the failure.

- Config errors: `python -m qsft_jax.main --config=configs/tiny.py` with one bad override fails before
  anything compiles and leaves no workdir. Each case runs in-process through the programs' entry point
  (`cli.run(main.main, argv)`, what `python -m` runs); two run through the shell as well.
- Read-only and full workdirs: through mocks of the file-system calls (every machine), and through a
  real tmpfs, remounted read-only or filled by the trainer's own checkpoints, where this process may
  mount one (root in a container; skipped elsewhere).
"""
from __future__ import annotations

import builtins
import errno
import os
import subprocess
import sys

import pytest

from qsft_jax import cli
from qsft_jax import errors
from qsft_jax import main as main_lib

import trainer_utils as tu

PROG = "python -m qsft_jax.main"


def run_main(workdir: str, *overrides: str, config: str = tu.TINY) -> tuple[int, str]:
  """(exit status, stderr) of the trainer's entry point, in-process."""
  argv = [PROG, f"--config={config}", f"--workdir={workdir}", *overrides]
  with pytest.raises(SystemExit) as exit_:
    cli.run(main_lib.main, argv)
  return exit_.value.code


def one_fatal_line(err: str) -> str:
  """The message of stderr's single `FATAL: PROG: ` line (asserting there is nothing else)."""
  lines = err.splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith(f"FATAL: {PROG}: "), err
  return lines[0][len(f"FATAL: {PROG}: "):]


# ------------------------------------------------------------------------------------------------
# Config errors: one line naming the field, before anything is written


def _config_with_bad_override_field(tmp_path) -> str:
  path = tmp_path / "typo_config.py"
  path.write_text(
      "from qsft_jax import config_lib\n\n\n"
      "def get_config():\n"
      f"  c = config_lib.load_config_file({tu.TINY!r})\n"
      "  c.model.overrides = {**c.model.overrides, 'd_modle': 48}\n"
      "  return c\n")
  return str(path)


CONFIG_CASES = {
    # case: (overrides, the start of the message)
    "mesh does not match the devices": (["--config.mesh.shape.data=3"],
                                        "config.mesh.shape: {'data': 3, 'fsdp': 1, 'tensor': 1} has 3 devices "
                                        "but 8 are available"),
    "indivisible batch": (["--config.bc.batch_size=12"],
                          "config.bc.batch_size: 12 rows (12 per microbatch) do not divide across the mesh"),
    "bad phases": (["--config.phases=('qsft', 'bc')"],
                   "config.phases: the qsft phase needs phi from the bc phase: put 'bc' first"),
    "unknown task": (["--config.task=go"], "config.task: 'go' is not a bundled task"),
    "missing data": (["--config.data.path={tmp}/nope.jsonl"],
                     "config.data.path: {tmp}/nope.jsonl: no such file, directory or matching glob; set "
                     "data.path"),
    "empty data": (["--config.data.path={tmp}/empty.jsonl"],
                   "config.data.path: {tmp}/empty.jsonl: no episode (the file is empty)"),
    "bad reward transform": (["--config.data.reward_transform=affine:1"],
                             "config.data.reward_transform: kind 'affine' needs declared low and high bounds "
                             "(got 'affine:1')"),
    "bad preset": (["--config.model.preset=tiny-lama"],
                   "config.model.preset: 'tiny-lama' is not a preset; known: tiny-llama, "),
    "max_length 0": (["--config.data.max_length=0"], "config.data.max_length: must be >= 2, got 0"),
    "bad model override": ([], "config.model.overrides.d_modle: ModelConfig has no such field; its fields: "),
    "unknown tokenizer": (["--config.tokenizer=bpe"], "config.tokenizer: 'bpe' does not load: unknown "
                          "tokenizer spec 'bpe'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_error_is_one_line_naming_the_field_and_writes_nothing(case, tmp_path, capsys):
  overrides, expected = CONFIG_CASES[case]
  (tmp_path / "empty.jsonl").write_text("\n\n")
  overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
  config = _config_with_bad_override_field(tmp_path) if case == "bad model override" else tu.TINY
  workdir = str(tmp_path / "w")
  capsys.readouterr()
  assert run_main(workdir, *overrides, config=config) == 1
  message = one_fatal_line(capsys.readouterr().err)
  assert message.startswith(expected.replace("{tmp}", str(tmp_path))), message
  assert not os.path.exists(workdir), os.listdir(workdir)


def test_the_shell_sees_one_line_and_qsft_debug_adds_the_traceback(tmp_path):
  workdir = str(tmp_path / "w")
  command = tu.main_command(workdir, "--config.data.max_length=0")
  result = subprocess.run(command, cwd=tu.REPO, env=tu.subprocess_env(), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 1, result.stderr
  assert one_fatal_line(result.stderr) == "config.data.max_length: must be >= 2, got 0"
  result = subprocess.run(command, cwd=tu.REPO, env=tu.subprocess_env(QSFT_DEBUG=1), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1
  assert "Traceback (most recent call last)" in result.stderr and "check_config" in result.stderr
  assert result.stderr.splitlines()[-1] == (f"FATAL: {PROG}: config.data.max_length: must be >= 2, got 0")
  assert not os.path.exists(workdir)


# ------------------------------------------------------------------------------------------------
# Read-only and full workdirs: mocks


@pytest.fixture
def fs_mock(monkeypatch):
  """fail(root, errno_): every file-system write under `root` (opening for writing, making
  directories, renaming, removing) raises OSError(errno_) naming its path, as a read-only or full
  file system mounted at `root` would."""

  def fail(root: str, code: int) -> None:
    root = os.path.abspath(root)
    inside = lambda p: os.path.abspath(os.fspath(p)).startswith(root)
    real_open, real_makedirs, real_replace = builtins.open, os.makedirs, os.replace

    def error(path):
      return OSError(code, os.strerror(code), os.fspath(path))

    def open_(file, mode="r", *args, **kwargs):
      if isinstance(file, (str, os.PathLike)) and inside(file) and set(mode) & set("wax+"):
        raise error(file)
      return real_open(file, mode, *args, **kwargs)

    def makedirs(name, mode=0o777, exist_ok=False):
      if inside(name) and not os.path.isdir(name):
        raise error(name)
      return real_makedirs(name, mode, exist_ok)

    def replace(src, dst, **kwargs):
      if inside(dst):
        raise error(dst)
      return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "makedirs", makedirs)
    monkeypatch.setattr(os, "replace", replace)

  return fail


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_read_only_workdir_is_one_line_naming_it(code, reason, tmp_path, fs_mock, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  fs_mock(str(workdir), code)
  capsys.readouterr()
  assert run_main(str(workdir), "--config.eval.enabled=False") == 1
  message = one_fatal_line(capsys.readouterr().err)
  assert message == (f"{workdir}/data: not writable ({reason}); make the workdir {workdir} writable or "
                     "choose another --workdir")
  assert os.listdir(workdir) == []


def test_full_disk_is_one_line_saying_that_rerunning_resumes(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "w")

  def full(workdir_, model_config):  # the last write before training: config.json is written
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(workdir_, "model_config.json"))

  monkeypatch.setattr(main_lib.run_lib, "save_model_config", full)
  capsys.readouterr()
  assert run_main(workdir, "--config.eval.enabled=False") == 1
  message = one_fatal_line(capsys.readouterr().err)
  assert message == (f"{workdir}/model_config.json: no space left on the device; free some space (or choose "
                     "another --workdir), then rerun the same command: it resumes from the last complete "
                     "checkpoint")


@pytest.mark.parametrize("exc,workdir,expected", [
    # tensorstore under orbax (an async save, re-raised at wait_until_finished or the next save)
    (ValueError('Error writing local file "/w/bc/checkpoints/4.orbax-checkpoint-tmp-7/state/d/0": '
                "[OS error 28] No space left on device"), "/w",
     "/w/bc/checkpoints/4.orbax-checkpoint-tmp-7/state/d/0: no space left on the device; free some space "
     "(or choose another --workdir), then rerun the same command"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "params/6.0.0" in OCDBT database at local file '
                '"/w/qsft/checkpoints/2.orbax-checkpoint-tmp/state/": Failed to write 95052 bytes to file 5: '
                "[os_error_code='28']"), "/w",
     "/w/qsft/checkpoints/2.orbax-checkpoint-tmp/state/: no space left on the device; free some space (or "
     "choose another --workdir), then rerun the same command"),
    (RuntimeError("finalize failed at step 128"), "/w", None),
    (OSError(errno.EROFS, "Read-only file system", "/w/config.json"), "/w",
     "/w/config.json: not writable (read-only file system); make the workdir /w writable or choose another "
     "--workdir"),
    (OSError(errno.EACCES, "Permission denied", "/data/x.jsonl"), "/w",
     "/data/x.jsonl: permission denied; make it writable (and readable) or choose another path"),
    (OSError(errno.ENOENT, "No such file or directory", "/w/x"), "/w", None),
    (OSError(errno.ENOSPC, "No space left on device"), None,
     "a write: no space left on the device; free some space (or write elsewhere), then rerun the same "
     "command"),
])
def test_storage_error_reads_os_errors_and_library_messages(exc, workdir, expected):
  try:  # chained, as orbax's finalize thread re-raises it
    try:
      raise exc
    except Exception as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    error = errors.storage_error(outer, workdir)
  assert (error and str(error)) == expected


# ------------------------------------------------------------------------------------------------
# Read-only and full workdirs: a real tmpfs


@pytest.fixture
def tmpfs(tmp_path):
  """mount(size) -> a tmpfs of `size` mounted in tmp_path (unmounted afterwards); skips the test
  where this process may not mount one."""
  mounted = []

  def mount(size: str) -> str:
    point = tmp_path / f"mnt{len(mounted)}"
    point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                            capture_output=True, text=True)
    if result.returncode:
      pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    mounted.append(point)
    return str(point)

  yield mount
  for point in mounted:
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount(point: str, *options: str) -> None:
  subprocess.run(["mount", "-o", ",".join(("remount", *options)), point], check=True)


def test_read_only_tmpfs_workdir(tmpfs):
  point = tmpfs("1m")
  remount(point, "ro")
  workdir = os.path.join(point, "w")
  result = subprocess.run(tu.main_command(workdir, "--config.eval.enabled=False"), cwd=tu.REPO,
                          env=tu.subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert one_fatal_line(result.stderr) == (f"{workdir}: not writable (read-only file system); make the "
                                           f"workdir {workdir} writable or choose another --workdir")


# Enough for the generated data and the first few checkpoints of phase 1, not for all of them.
FULL_TMPFS_SIZE = "2m"


@pytest.mark.slow
def test_full_tmpfs_mid_run_is_one_line_and_rerunning_resumes(tmpfs):
  point = tmpfs(FULL_TMPFS_SIZE)
  workdir = os.path.join(point, "w")
  overrides = ("--config.eval.enabled=False", "--config.log.tensorboard=False",
               "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=100")
  result = subprocess.run(tu.main_command(workdir, *overrides), cwd=tu.REPO, env=tu.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  message = one_fatal_line(result.stderr)
  assert message.startswith(f"{workdir}") and message.endswith(
      ": no space left on the device; free some space (or choose another --workdir), then rerun the "
      "same command: it resumes from the last complete checkpoint"), message
  saved = tu.checkpoint_steps(workdir, "bc")
  assert saved and not os.path.exists(os.path.join(workdir, "bc", "DONE")), saved
  remount(point, "size=64m")
  result = subprocess.run(tu.main_command(workdir, *overrides), cwd=tu.REPO, env=tu.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"bc: resumed from the checkpoint of step {saved[-1]}" in result.stdout, result.stdout[-3000:]
  assert all(os.path.exists(os.path.join(workdir, p, "DONE")) for p in ("bc", "qsft"))
