"""Progress of the long steps: a count with its rate and ETA, or the elapsed time of one long call.

    with progress.Progress(total=100, desc="evaluate bc", unit="episodes") as bar:
      for ...:
        bar.update(1)                      # or bar.update_to(n)

    for episode in progress.track(episodes, total=n, desc="generate maze", unit="episodes"):
      ...

    with progress.timed("aot: qsft compile"):  # a start line, a line every interval, the elapsed time
      compiled = lowered.compile()

How it shows (`mode()`), from the environment variable QSFT_PROGRESS:
- "bar": a tqdm bar redrawn in place on stderr (count / total, elapsed < ETA, rate);
- "lines": the same figures as one line on stderr every QSFT_PROGRESS_SECONDS seconds (default 30),
  and a last line at the end when the step lasted long enough to print one: log files of batch
  jobs get a readable line per interval and nothing for quick steps;
- "off": nothing.
Unset (or "auto"): "bar" when stderr is a terminal, else "lines". Only process 0 of a multi-process
run shows anything (`is_process_zero`); the others get "off".
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

from qsft_jax.errors import UserError

MODES = ("bar", "lines", "off")
ENV_MODE = "QSFT_PROGRESS"
ENV_SECONDS = "QSFT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
T = TypeVar("T")


class SettingError(UserError, ValueError):
  """QSFT_PROGRESS or QSFT_PROGRESS_SECONDS holds a value they do not take; the message names it."""


def is_process_zero() -> bool:
  """False on the processes other than 0 of a jax.distributed run; True otherwise (a program that
  never initialised jax.distributed is one process: jax is not asked, so no backend starts here)."""
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return True
  return jax.process_index() == 0


def mode() -> str:
  """"bar", "lines" or "off" (module docstring); a bad QSFT_PROGRESS raises SettingError."""
  value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
  if value not in MODES + ("auto",):
    raise SettingError(f"{ENV_MODE}={value!r}: expected one of {', '.join(MODES + ('auto',))}")
  if not is_process_zero():
    return "off"
  if value == "auto":
    return "bar" if _stderr_is_terminal() else "lines"
  return value


def interval() -> float:
  """Seconds between two lines in "lines" mode (QSFT_PROGRESS_SECONDS, default 30)."""
  raw = os.environ.get(ENV_SECONDS, "")
  try:
    seconds = float(raw) if raw else DEFAULT_SECONDS
  except ValueError:
    raise SettingError(f"{ENV_SECONDS}={raw!r}: expected a number of seconds") from None
  if not seconds >= 0:
    raise SettingError(f"{ENV_SECONDS}={raw!r}: expected a number of seconds >= 0")
  return seconds


def _stderr_is_terminal() -> bool:
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):  # replaced or closed streams
    return False


def format_duration(seconds: float) -> str:
  """12.3 s, 4m05s, 1h02m03s."""
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes, s = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes}m{s:02d}s"
  hours, m = divmod(minutes, 60)
  return f"{hours}h{m:02d}m{s:02d}s"


class Progress:
  """A count towards `total` (None: unknown, no ETA) shown with its rate and ETA (module docstring).

  desc: what is counted ("evaluate qsft_beta4"); unit: its unit ("episodes"); initial: the count
  already done (a resumed phase), not part of the rate; enabled: False shows nothing (a caller's own
  switch, e.g. config log.progress_bar). Use it as a context manager, or call `close`.
  """

  def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0,
               enabled: bool = True):
    self.total, self.desc, self.unit = total, desc, unit
    self.n = initial
    self.mode = mode() if enabled else "off"
    self._initial = initial
    self._postfix = ""
    self._start = time.time()
    self._last_line = self._start
    self._interval = interval()
    self._printed: tuple | None = None  # the count and postfix of the last line printed ("lines")
    self._closed = False
    self._bar = None
    if self.mode == "bar":
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0)

  def update(self, n: int = 1) -> None:
    """Adds n to the count."""
    self.update_to(self.n + n)

  def update_to(self, n: int) -> None:
    """Sets the count to n (no change when n is not above it)."""
    if n <= self.n:
      return
    if self._bar is not None:
      self._bar.update(n - self.n)
    self.n = n
    self._maybe_print_line()

  def set_postfix(self, **values) -> None:
    """Figures shown after the rate (loss=..., tok_s=...), as given (format them first). In "lines"
    mode a new postfix prints a line too once the interval has passed: a count that stalls (episodes
    that all end together) still shows how far the work inside it is."""
    self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
    if self._bar is not None:
      self._bar.set_postfix_str(self._postfix, refresh=False)
    self._maybe_print_line()

  def _maybe_print_line(self) -> None:
    if self.mode == "lines" and time.time() - self._last_line >= self._interval:
      self._print_line()

  def line(self) -> str:
    """The current state as one line: desc: n/total unit [elapsed<ETA, rate, postfix]."""
    from tqdm import tqdm
    elapsed = time.time() - self._start
    if self.total is None:
      fmt = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
    else:
      fmt = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    rate = (self.n - self._initial) / elapsed if elapsed > 0 else None
    return tqdm.format_meter(self.n, self.total, elapsed, unit=self.unit, prefix=self.desc,
                             bar_format=fmt, postfix=self._postfix, rate=rate, initial=self._initial)

  def _print_line(self) -> None:
    self._last_line = time.time()
    self._printed = (self.n, self._postfix)
    sys.stderr.write(self.line() + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    """Ends the display: the bar's last state, or in "lines" mode a last line when one was printed
    before and the figures moved since (a step that ended within the interval prints nothing)."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self.mode == "lines" and self._printed not in (None, (self.n, self._postfix)):
      self._print_line()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def track(iterable: Iterable[T], total: int | None, desc: str, unit: str = "it", *,
          enabled: bool = True) -> Iterator[T]:
  """Yields the items of `iterable`, counting them in a `Progress` (closed when the loop ends)."""
  with Progress(total, desc, unit, enabled=enabled) as bar:
    for item in iterable:
      yield item
      bar.update(1)


@contextlib.contextmanager
def timed(desc: str, *, enabled: bool = True, heartbeat: bool = True) -> Iterator[dict]:
  """Around one long call with no count of its own (a compile): prints "desc ..." when it starts,
  "desc: 5m00s so far" every `interval()` seconds while it runs (also on a terminal, where a bar
  would have nothing to count), and "desc: done in 12.3 s" at the end ("failed after" when it
  raised). heartbeat=False leaves out the lines in between (an outer step whose inner calls have
  their own). Yields a dict that receives {"seconds": elapsed} at the end. With mode "off" (or not
  enabled) nothing prints."""
  out: dict = {}
  show = enabled and mode() != "off"
  start = time.time()
  stop = threading.Event()

  def say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()

  def beat(every: float) -> None:
    while not stop.wait(every):
      say(f"{desc}: {format_duration(time.time() - start)} so far")

  thread = None
  if show:
    say(f"{desc} ...")
  if show and heartbeat:
    thread = threading.Thread(target=beat, args=(max(interval(), 0.05),), daemon=True,
                              name=f"progress: {desc}")
    thread.start()
  ok = False
  try:
    yield out
    ok = True
  finally:
    stop.set()
    if thread is not None:
      thread.join()
    out["seconds"] = time.time() - start
    if show:
      say(f"{desc}: {'done in' if ok else 'failed after'} {format_duration(out['seconds'])}")
