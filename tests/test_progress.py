"""qsft_jax.progress: what each mode prints, the rate and ETA it reports, process 0 only."""
import re
import sys
import time

import pytest

from qsft_jax import progress
from qsft_jax.errors import UserError


@pytest.fixture
def lines(monkeypatch):
  monkeypatch.setenv(progress.ENV_MODE, "lines")
  monkeypatch.setenv(progress.ENV_SECONDS, "0")  # a line at every update


def test_lines_give_count_rate_and_eta(lines, monkeypatch, capsys):
  start = time.time()
  monkeypatch.setattr(progress.time, "time", lambda: start)
  with progress.Progress(40, "evaluate bc", "episodes") as bar:
    monkeypatch.setattr(progress.time, "time", lambda: start + 10.0)
    bar.update(10)  # 10 episodes in 10 s: 1 episode/s, 30 left: 30 s
    bar.set_postfix(loss="0.5")
    monkeypatch.setattr(progress.time, "time", lambda: start + 20.0)
    bar.update_to(30)  # 30 in 20 s: 1.5/s, 10 left: ~7 s
  out = capsys.readouterr()
  assert out.out == ""
  got = out.err.splitlines()
  assert got == ["evaluate bc: 10/40 episodes [00:10<00:30,  1.00episodes/s]",
                 "evaluate bc: 10/40 episodes [00:10<00:30,  1.00episodes/s, loss=0.5]",
                 "evaluate bc: 30/40 episodes [00:20<00:06,  1.50episodes/s, loss=0.5]"]


def test_lines_every_interval_and_nothing_for_a_quick_step(monkeypatch, capsys):
  monkeypatch.setenv(progress.ENV_MODE, "lines")
  monkeypatch.setenv(progress.ENV_SECONDS, "30")
  with progress.Progress(5, "quick", "items") as bar:
    bar.update(5)
  assert capsys.readouterr().err == ""
  start = time.time()
  monkeypatch.setattr(progress.time, "time", lambda: start)
  bar = progress.Progress(None, "slow", "items", initial=4)  # resumed at 4: the rate counts from there
  for t in (10, 31, 40, 62):
    monkeypatch.setattr(progress.time, "time", lambda t=t: start + t)
    bar.update(2)
  bar.close()
  got = capsys.readouterr().err.splitlines()
  # lines at 31 s and 62 s (30 s apart at least), no ETA without a total; 4 items in 31 s, 8 in 62 s
  assert got == ["slow: 8 items [00:31,  7.75s/items]", "slow: 12 items [01:02,  7.75s/items]"]


def test_a_stalled_count_still_prints_its_postfix_every_interval(monkeypatch, capsys):
  monkeypatch.setenv(progress.ENV_MODE, "lines")
  monkeypatch.setenv(progress.ENV_SECONDS, "30")
  start = time.time()
  monkeypatch.setattr(progress.time, "time", lambda: start)
  with progress.Progress(64, "evaluate bc", "episodes") as bar:
    for t, turn in ((20, 2), (40, 3), (50, 4)):  # no episode ends: only the turn moves
      monkeypatch.setattr(progress.time, "time", lambda t=t: start + t)
      bar.set_postfix(turn=turn)
    monkeypatch.setattr(progress.time, "time", lambda: start + 60)
    bar.update_to(64)
  assert capsys.readouterr().err.splitlines() == [
      "evaluate bc: 0/64 episodes [00:40<?, ?episodes/s, turn=3]",
      "evaluate bc: 64/64 episodes [01:00<00:00,  1.07episodes/s, turn=4]"]


def test_off_not_enabled_and_other_processes_print_nothing(lines, monkeypatch, capsys):
  monkeypatch.setenv(progress.ENV_MODE, "off")
  list(progress.track(range(3), 3, "off"))
  monkeypatch.setenv(progress.ENV_MODE, "lines")
  list(progress.track(range(3), 3, "not enabled", enabled=False))
  with progress.timed("not enabled", enabled=False):
    pass

  class Distributed:  # process 1 of a jax.distributed run
    class distributed:
      is_initialized = staticmethod(lambda: True)
    process_index = staticmethod(lambda: 1)
  monkeypatch.setitem(sys.modules, "jax", Distributed)
  assert progress.mode() == "off"
  list(progress.track(range(3), 3, "process 1"))
  assert capsys.readouterr().err == ""


def test_auto_is_bar_on_a_terminal_and_lines_otherwise(monkeypatch):
  monkeypatch.delenv(progress.ENV_MODE, raising=False)
  monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: True)
  assert progress.mode() == "bar"
  monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: False)
  assert progress.mode() == "lines"
  monkeypatch.setenv(progress.ENV_MODE, "loud")
  with pytest.raises(progress.SettingError,
                     match="^QSFT_PROGRESS='loud': expected one of bar, lines, off, auto$"):
    progress.mode()
  monkeypatch.setenv(progress.ENV_SECONDS, "soon")
  with pytest.raises(progress.SettingError, match="^QSFT_PROGRESS_SECONDS='soon': expected a number"):
    progress.interval()
  assert issubclass(progress.SettingError, UserError)


def test_timed_says_start_heartbeat_and_elapsed(monkeypatch, capsys):
  monkeypatch.setenv(progress.ENV_MODE, "lines")
  monkeypatch.setenv(progress.ENV_SECONDS, "0.05")
  with progress.timed("aot: qsft: compile") as t:
    time.sleep(0.3)
  err = capsys.readouterr().err.splitlines()
  assert err[0] == "aot: qsft: compile ..."
  assert all(re.fullmatch(r"aot: qsft: compile: 0\.\d s so far", l) for l in err[1:-1]) and len(err) >= 4
  assert re.fullmatch(r"aot: qsft: compile: done in 0\.\d s", err[-1]) and 0.3 <= t["seconds"] < 1.0
  with pytest.raises(KeyError):
    with progress.timed("step", heartbeat=False):
      raise KeyError("x")
  assert re.fullmatch(r"step \.\.\.\nstep: failed after 0\.0 s\n", capsys.readouterr().err)


def test_format_duration():
  assert [progress.format_duration(s) for s in (4.26, 59.9, 245, 3723)] == [
      "4.3 s", "59.9 s", "4m05s", "1h02m03s"]
