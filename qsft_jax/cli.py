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
      sys.exit(main())

Programs that take a config file declare it with `config_flag(fv)`: `--config=configs/NAME.py[:ARG]`
plus `--config.FIELD=VALUE` overrides, exactly as the trainer (`python -m qsft_jax.main`).
"""
from __future__ import annotations

import re
import sys
from typing import Sequence

from absl import flags
from absl import logging


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


def _usage(fv: flags.FlagValues, prog: str, doc: str | None) -> str:
  head = (doc or "").strip()
  return f"{head}\n\nFlags of {prog}:\n{fv.get_help(include_special_flags=False)}\n"


def _fail(prog: str, message: str) -> None:
  sys.stderr.write(f"FATAL: {prog}: {message}\n")
  sys.exit(2)


def parse(fv: flags.FlagValues, argv: Sequence[str] | None = None, *, prog: str, doc: str | None = None,
          required: Sequence[str] = ()) -> list[str]:
  """Parses argv (default sys.argv; argv[0] is skipped) into `fv`; returns the positional arguments.

  `prog` names the program in messages ("python -m qsft_jax.main"). --help prints `doc` and the flags
  and exits 0; an unknown flag, a bad value, a missing `required` flag, a positional argument, or a
  --config override naming no field exits 2 with one line on stderr.
  """
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    sys.stdout.write(_usage(fv, prog, doc))
    sys.exit(0)
  try:
    rest = fv(argv)
  except flags.IllegalFlagValueError as e:
    _fail(prog, str(e))
  except flags.Error as e:  # unknown flag, missing required flag, bad value
    _fail(prog, f"{e} (--help lists the flags)")
  except (AttributeError, KeyError) as e:  # a --config.FIELD override naming no field
    overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
    text = str(e)
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    detail = f"{hint[2]!r}; did you mean {hint[1]!r}?" if hint else text
    _fail(prog, f"bad --config override ({overrides}): the config has no field {detail}")
  if len(rest) > 1:
    _fail(prog, f"unexpected arguments: {' '.join(rest[1:])} (--help lists the flags)")
  for name in required:
    if fv[name].value is None:
      _fail(prog, f"--{name} is required (--help lists the flags)")
  # absl's own logging reads the global flags: mark them parsed so it does not warn that it logs
  # "before flag parsing"; its verbosity is set by each program.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  return rest[1:]
