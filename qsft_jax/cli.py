"""The command-line convention of every qsft_jax program.

Each program declares absl flags on a `FlagValues` of its own (`new_flags()`), never on absl's global
`flags.FLAGS`, so importing a module defines no flag and two programs can live in one process (the
trainer imports evaluation; tests call a program's `main(argv)` directly). `parse` reads argv into
it and turns every usage error into one line on stderr with exit status 2, no traceback:

    def define_flags() -> flags.FlagValues:
      fv = cli.new_flags()
      flags.DEFINE_string("workdir", None, "Run directory.", flag_values=fv)
      return fv

    def main(argv=None) -> int:
      fv = define_flags()
      cli.parse(fv, argv, prog="python -m qsft_jax.evaluate", doc=__doc__, required=["workdir"])
      ...

    if __name__ == "__main__":
      cli.run(main)

`main(argv)` takes argv as `sys.argv` holds it, the program name first: `main(["evaluate",
"--workdir=DIR"])`. Flag names are snake_case; `--max-length` is read as `--max_length`, and a boolean
flag B is cleared by `--noB`, `--no_B` or `--no-B`, so either spelling works in every program. A
program with positional arguments (`python -m qsft_jax.data validate PATH...`) names them with
`parse(..., positional="PATH...")` and gets them back; its own checks of them, or of a flag's value,
end with `usage_error(prog, message)`, the same one line and exit status 2.

Programs that take a config file declare it with `config_flag(fv)`: `--config=configs/NAME.py[:ARG]`
plus `--config.FIELD=VALUE` overrides, exactly as the trainer (`python -m qsft_jax.main`).

`run(main)` is every program's entry point. A failure the user can fix (`qsft_jax.errors.UserError`,
and a path that cannot be written or a full disk: `errors.storage_error`) is reported as one line,
`FATAL: PROG: message` on stderr (a message of several lines keeps them, and nothing else), with exit
status 1 and no traceback; QSFT_DEBUG=1 prints the traceback first. Any other exception is a bug and
keeps its traceback. A program's `main` may return an exit status (an int) or anything else (0).
"""
from __future__ import annotations

import logging as pylogging
import os
import re
import sys
import textwrap
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import flags
from absl import logging

from qsft_jax import errors

# The `prog` of the last `parse` call: the name `run` reports a failure under.
_prog: str | None = None


def new_flags() -> flags.FlagValues:
  """An empty FlagValues with --help."""
  fv = flags.FlagValues()
  flags.DEFINE_bool("help", False, "Show this help and exit.", flag_values=fv, short_name="h")
  return fv


def config_flag(fv: flags.FlagValues, argv: Sequence[str]) -> flags.FlagHolder:
  """--config=PATH[:ARG] (an ml-collections config file, locked) with --config.FIELD=VALUE overrides."""
  from ml_collections import config_flags
  return config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                         flag_values=fv, lock_config=True, sys_argv=list(argv))


def _flag_help(fv: flags.FlagValues) -> str:
  """One entry per flag, the program's own sorted by name, then --help."""
  by_id = {id(fv[name]): fv[name] for name in fv}
  ordered = sorted(by_id.values(), key=lambda f: (f.name == "help", f.name))
  entries = []
  for flag in ordered:
    head = (f"-{flag.short_name}, " if flag.short_name else "") + \
        ("--[no]" if flag.boolean else "--") + flag.name
    details = [flag.help or ""]
    if flag.default_as_str:
      details.append(f"(default: {flag.default_as_str})")
    if flag.parser.syntactic_help:
      details.append(f"({flag.parser.syntactic_help})")
    text = " ".join(" ".join(details).split())
    entries.append(textwrap.fill(f"{head}: {text}", width=100,
                                 initial_indent="  ", subsequent_indent="      "))
  return "\n".join(entries)


def _usage(fv: flags.FlagValues, prog: str, doc: str | None, positional: str | None) -> str:
  head = (doc or "").strip()
  synopsis = f"{prog} [flags]" + (f" {positional}" if positional else "")
  spelling = textwrap.fill(
      "Flag names take '_' or '-' alike (--max_length, --max-length); a boolean flag B is set by --B "
      "and cleared by --noB, --no_B or --no-B; --name value and --name=value are the same.", width=100)
  return f"{head}\n\nUsage: {synopsis}\n{spelling}\n\nFlags of {prog}:\n{_flag_help(fv)}\n"


def usage_error(prog: str, message: str) -> NoReturn:
  """A usage error: one line on stderr ("FATAL: PROG: MESSAGE"), exit status 2."""
  line = " ".join(str(message).split())  # one line, whatever the message held
  sys.stderr.write(f"FATAL: {prog}: {line}\n")
  sys.stderr.flush()
  sys.exit(2)


def _flag_for(fv: flags.FlagValues, name: str) -> tuple[str, bool] | None:
  """(the spelling of `name` that `fv` knows, whether it clears a boolean flag), or None.

  A flag `max_length` answers to --max_length and --max-length; a boolean `ratio` to --noratio,
  --no_ratio and --no-ratio. A name `fv` defines as written is always itself.
  """
  if name in fv:
    return name, False
  if "." in name:  # --config.FIELD overrides: ml_collections reads them
    return None
  snake = name.replace("-", "_")
  if snake in fv:
    return snake, False
  for prefix in ("no_", "no"):
    if snake.startswith(prefix) and snake[len(prefix):] in fv and fv[snake[len(prefix):]].boolean:
      return "no" + snake[len(prefix):], True
  return None


def _normalize(fv: flags.FlagValues, args: Sequence[str]) -> list[str]:
  """Rewrites each flag's name in `args` (argv without argv[0]) to the spelling absl knows; values,
  positional arguments and everything after "--" pass unchanged."""
  out: list[str] = []
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if arg == "--":
      out += args[i - 1:]
      break
    if not arg.startswith("-") or arg == "-":
      out.append(arg)
      continue
    dashes = "--" if arg.startswith("--") else "-"
    name, eq, value = arg[len(dashes):].partition("=")
    found = _flag_for(fv, name)
    if found is None:
      out.append(arg)
      continue
    spelled, clears = found
    if clears and eq:
      raise flags.Error(f"{arg}: clearing a boolean flag takes no value")
    out.append(f"{dashes}{spelled}{eq}{value}")
    if not clears and not eq and not fv[spelled].boolean and i < len(args):
      out.append(args[i])  # the flag's value, verbatim even when it starts with "-"
      i += 1
  return out


def _check_config_file(fv: flags.FlagValues, prog: str) -> None:
  """A --config file that does not load (missing, unreadable) is a usage error; ml_collections
  would raise only when the config is first read, with a traceback."""
  if "config" not in fv or not fv["config"].present:
    return
  from ml_collections.config_flags import config_flags as config_flags_lib
  if not isinstance(fv["config"].parser, config_flags_lib.ConfigFileFlagParser):
    return
  try:
    getattr(fv.config, "keys")  # a config that failed to load raises on any attribute
  except OSError as e:
    usage_error(prog, f"--config: cannot load the config file: {e.__cause__ or e}")


def parse(fv: flags.FlagValues, argv: Sequence[str] | None = None, *, prog: str, doc: str | None = None,
          required: Sequence[str] = (), positional: str | None = None) -> list[str]:
  """Parses argv (default sys.argv; argv[0] is the program name and is skipped) into `fv`; returns the
  positional arguments.

  `prog` names the program in messages ("python -m qsft_jax.main"). `positional` describes the
  positional arguments the program takes, for --help ("PATH..."); without it a positional argument
  is a usage error (the program checks how many it got, with `usage_error`). --help (-h) prints `doc`
  and the flags and exits 0; an unknown flag, a bad value, a missing `required` flag, an unexpected
  positional argument, or a --config override naming no field exits 2 with one line on stderr.
  """
  global _prog
  _prog = prog
  argv = list(sys.argv if argv is None else argv)
  if argv and argv[0].startswith("--"):
    raise ValueError(f"argv[0] is the program name, as in sys.argv; got the flag {argv[0]!r} "
                     "(call main(['prog', '--flag', ...]))")
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    sys.stdout.write(_usage(fv, prog, doc, positional))
    sys.stdout.flush()
    sys.exit(0)
  try:
    rest = fv([*argv[:1], *_normalize(fv, argv[1:])])
  except flags.IllegalFlagValueError as e:
    usage_error(prog, str(e))
  except flags.Error as e:  # unknown flag, missing value, a value given to --noB
    usage_error(prog, f"{e} (--help lists the flags)")
  except (AttributeError, KeyError) as e:  # a --config.FIELD override naming no field
    overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
    text = str(e)
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    detail = f"{hint[2]!r}; did you mean {hint[1]!r}?" if hint else text
    from qsft_jax.config_lib import RETIRED_FIELDS
    retired = [f for f in RETIRED_FIELDS if re.search(rf"--config\.{re.escape(f)}\b(?!\.)", overrides)]
    if retired:
      detail = f"{retired[0]!r}; it was replaced by {' and '.join(RETIRED_FIELDS[retired[0]])}"
    usage_error(prog, f"bad --config override ({overrides}): the config has no field {detail}")
  _check_config_file(fv, prog)
  if positional is None and len(rest) > 1:
    usage_error(prog, f"unexpected arguments: {' '.join(rest[1:])} (--help lists the flags)")
  for name in required:
    if fv[name].value is None:
      usage_error(prog, f"--{name} is required (--help lists the flags)")
  # absl's own logging reads the global flags: mark them parsed so it does not warn that it logs
  # "before flag parsing"; its verbosity is set by each program.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  return rest[1:]


# ------------------------------------------------------------------------------------------------
# The entry point


def _default_prog() -> str:
  """How the shell started this program: "python -m MODULE" or "python SCRIPT"."""
  main_module = sys.modules.get("__main__")
  spec = getattr(main_module, "__spec__", None)
  if spec is not None and spec.name:
    name = spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name
    return f"python -m {name}"
  return f"python {sys.argv[0]}" if sys.argv and sys.argv[0] else "python"


def _debug() -> bool:
  return os.environ.get(errors.DEBUG_ENV, "") not in ("", "0")


class _HeldBack(pylogging.Filter):
  """What libraries print about a failure to write, held back while a program runs.

  Orbax and tensorstore log each failed background write with its traceback (and asyncio reports
  the tasks and callbacks it leaves behind), then raise the failure to the program, which reports it
  in one line. Their log records of a storage failure and the "Event loop is closed" reports of
  unraisable exceptions are held here; a program that ends without reporting a failure prints them
  after all (one line each), so nothing is lost. Not installed with QSFT_DEBUG=1.
  """

  def __init__(self):
    super().__init__()
    self.held: list[str] = []
    self._records: list[pylogging.LogRecord] = []
    self._default_hook = sys.unraisablehook

  def filter(self, record: pylogging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if errors.storage_error(exc if exc is not None else Exception(record.getMessage())) is None:
      return True
    if not any(record is r for r in self._records):  # each root handler asks once per record
      self._records.append(record)
      self.held.append(f"{record.levelname}: {record.getMessage().strip().splitlines()[0]}")
    return False

  def unraisable(self, report) -> None:
    if isinstance(report.exc_value, RuntimeError) and "Event loop is closed" in str(report.exc_value):
      self.held.append(f"unraisable exception in {report.object!r}: {report.exc_value}")
      return
    self._default_hook(report)

  def install(self) -> None:
    logging.use_absl_handler()  # what `parse` installs, here already, to be filtered from the start
    for handler in pylogging.getLogger().handlers:
      handler.addFilter(self)
    sys.unraisablehook = self.unraisable

  def uninstall(self) -> None:
    for handler in pylogging.getLogger().handlers:
      handler.removeFilter(self)
    sys.unraisablehook = self._default_hook


def fatal(prog: str, error: BaseException) -> NoReturn:
  """Reports a failure the user can fix: `FATAL: PROG: message` on stderr, exit status 1.

  The message's first line follows the prefix; its other lines (a list of bad data lines, say)
  follow it as they are. QSFT_DEBUG=1 prints the traceback first.
  """
  if _debug():
    traceback.print_exception(error)
  lines = [line.rstrip() for line in str(error).strip().splitlines() if line.strip()] or \
      [type(error).__name__]
  sys.stdout.flush()
  sys.stderr.write(f"FATAL: {prog}: " + "\n".join(lines) + "\n")
  sys.stderr.flush()
  sys.exit(1)


def run(main: Callable[..., Any], argv: Sequence[str] | None = None) -> NoReturn:
  """Every program's entry point: `if __name__ == "__main__": cli.run(main)`.

  Calls `main()` (or `main(argv)`, argv as sys.argv holds it), exits with its return value when it
  is an int, else 0. A `UserError`, or an exception that is a failure to write (read-only or not
  permitted path, full disk: `errors.storage_error`), exits 1 with one `FATAL: PROG: message` line
  (PROG as the program gave it to `parse`), the last line the program prints: what libraries log
  about the failure is held back (`_HeldBack`), and so is their noise while the process ends
  (argv None: the program the shell started). Usage errors exit 2 from `parse` itself.
  """
  held = None if _debug() else _HeldBack()
  error = None
  try:
    if held is not None:
      held.install()
    code = main() if argv is None else main(list(argv))
  except errors.UserError as e:
    error = e
  except Exception as e:  # pylint: disable=broad-except
    error = errors.storage_error(e)
    if error is None:
      raise
    error.__cause__ = e
  finally:
    if held is not None:
      held.uninstall()
  if error is None:
    if held is not None and held.held:
      sys.stderr.write("".join(f"WARNING: held back during the run: {line}\n" for line in held.held))
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)
  if argv is None and not _debug():  # the process ends: asyncio's and tensorstore's leftovers stay quiet
    pylogging.disable(pylogging.CRITICAL)
    sys.unraisablehook = lambda report: None
  fatal(_prog or _default_prog(), error)
