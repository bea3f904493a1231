"""Command line of the data layer: one command, its positional arguments, then its flags.

    python -m qsft_jax.data validate PATH... [--max-length L] [--tokenizer char] [options]
    python -m qsft_jax.data build BUILDER_DIR --data_dir=DIR [--config NAME] [--manual_dir JSONL_DIR]
        [--gen KEY=VALUE ...]

validate checks JSONL episode files (files, globs or directories of *.jsonl): it prints every problem
as ``FILE:LINE: field: message`` and every dropped episode as ``FILE:LINE: dropped: reason``, then a
summary; exit status 1 when any episode is invalid or when no episode is kept (truncated or dropped
over-long episodes are reported and counted, not errors). Episodes are tokenised (``--tokenizer``,
default char): characters outside a char tokenizer's alphabet are an error unless
``--unknown-chars unk``; with --max-length their lengths are checked too.

build prepares a TFDS dataset as array_record without TensorFlow and prints its directory.

``python -m qsft_jax.data COMMAND --help`` lists a command's flags.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags

from qsft_jax import cli

PROG = "python -m qsft_jax.data"

VALIDATE_DOC = """Checks JSONL episode files (files, globs or directories of *.jsonl).

Prints every problem as FILE:LINE: field: message and every dropped episode as FILE:LINE: dropped:
reason, then a summary; exit status 1 when any episode is invalid or when no episode is kept.
Episodes are tokenised (--tokenizer): characters outside a char tokenizer's alphabet are an error
unless --unknown-chars unk. With --max-length their lengths are checked too."""

NO_LENGTH_LIMIT = 2**31 - 1  # the row length when --max-length is not given: nothing is cut

BUILD_DOC = """Prepares a TFDS dataset as array_record, without TensorFlow, and prints its directory.

BUILDER_DIR is a builder directory: data/maze, data/wordle, data/chess, data/jsonl_episodes."""


def validate_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_integer("max_length", 0, "Row length (BOS included); enables the length checks.",
                       flag_values=fv)
  flags.DEFINE_string("tokenizer", "char", "char | char:PATH.json | hf:PATH | gguf:PATH | smollm2.",
                      flag_values=fv)
  flags.DEFINE_enum("overlong", "truncate", ["truncate", "drop"], "What happens to an episode longer "
                    "than --max-length.", flag_values=fv)
  flags.DEFINE_enum("unknown_chars", "error", ["error", "unk"], "Characters outside a char "
                    "tokenizer's alphabet: an error, or encoded as the unk token.", flag_values=fv)
  flags.DEFINE_string("reward_transform", "none", "none | affine:LOW,HIGH[,MAX_TURNS] | "
                      "terminal_return:RMIN,RMAX.", flag_values=fv)
  flags.DEFINE_float("gamma", 1.0, "Discount per agent turn.", flag_values=fv)
  flags.DEFINE_float("gamma_token", 1.0, "Discount per action token.", flag_values=fv)
  flags.DEFINE_string("observation_template", "{text}", "Format string around observation texts.",
                      flag_values=fv)
  flags.DEFINE_string("action_template", "{text}", "Format string around action texts.", flag_values=fv)
  flags.DEFINE_enum("format", "plain", ["plain", "chat"], "plain: each turn encoded on its own behind BOS; "
                    "chat: the episode as a conversation through a chat template.", flag_values=fv)
  flags.DEFINE_string("system_prompt", "", "Chat format: a system message first when non-empty.", flag_values=fv)
  flags.DEFINE_string("chat_template", "", "Chat format: '' = the tokenizer's own, a Jinja template, or "
                      "file:PATH.", flag_values=fv)
  return fv


def build_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.", flag_values=fv)
  flags.DEFINE_string("config", None, "Builder config name.", flag_values=fv)
  flags.DEFINE_string("manual_dir", None, "The JSONL directory, for data/jsonl_episodes.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset is already prepared.",
                    flag_values=fv)
  flags.DEFINE_multi_string("gen", [], "KEY=VALUE overriding a config field (num_train=100, "
                            "options='{...}').", flag_values=fv)
  return fv


def validate(fv: flags.FlagValues, paths: list[str]) -> int:
  from qsft_jax.data.loading import DataConfig, validate_paths
  from qsft_jax.errors import UserError
  from qsft_jax.tokenizers import load_tokenizer

  try:
    config = DataConfig(
        max_length=fv.max_length or NO_LENGTH_LIMIT,
        overlong=fv.overlong,
        unknown_chars=fv.unknown_chars,
        reward_transform=fv.reward_transform,
        gamma=fv.gamma,
        gamma_token=fv.gamma_token,
        observation_template=fv.observation_template,
        action_template=fv.action_template,
        format=fv.format,
        system_prompt=fv.system_prompt,
        chat_template=fv.chat_template,
    )
    tokenizer = load_tokenizer(fv.tokenizer)
    problems, summary = validate_paths(paths, config, tokenizer)
  except (UserError, ValueError, FileNotFoundError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for p in problems:
    print(p)
  for d in summary.dropped_at:
    print(d)
  print(summary.format())
  if summary.kept == 0:
    print("error: no episode is left to train on", file=sys.stderr)
    return 1
  return 0 if summary.ok else 1


def build(fv: flags.FlagValues, builder: str) -> int:
  from qsft_jax.data.tfds_builders import build_dataset

  gen_kwargs = {}
  for item in fv.gen:
    key, sep, value = item.partition("=")
    if not sep:
      cli.usage_error(f"{PROG} build", f"--gen expects KEY=VALUE, got {item!r}")
    gen_kwargs[key] = value
  try:
    path = build_dataset(builder, data_dir=fv.data_dir, config=fv.config, manual_dir=fv.manual_dir,
                         overwrite=fv.overwrite, **gen_kwargs)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


# command -> (its flags, its doc, its positional arguments, (fewest, most) of them, what it runs)
COMMANDS: dict[str, tuple[Callable[[], flags.FlagValues], str, str, tuple[int, float], Callable]] = {
    "validate": (validate_flags, VALIDATE_DOC, "PATH...", (1, float("inf")), validate),
    "build": (build_flags, BUILD_DOC, "BUILDER_DIR", (1, 1), lambda fv, args: build(fv, args[0])),
}
REQUIRED = {"validate": [], "build": ["data_dir"]}


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m qsft_jax.data COMMAND ...`; argv as sys.argv holds it (the program name first)."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    # --help, or an unknown flag, before any command; otherwise a missing or unknown command
    args = cli.parse(cli.new_flags(), argv, prog=PROG, doc=__doc__, positional="{validate,build} ...")
    what = f"unknown command {args[0]!r}" if args else "no command"
    cli.usage_error(PROG, f"{what}: the first argument is validate or build (--help explains them)")
  command = argv[1]
  define, doc, positional, (fewest, most), run = COMMANDS[command]
  prog = f"{PROG} {command}"
  fv = define()
  args = cli.parse(fv, [argv[0], *argv[2:]], prog=prog, doc=doc, required=REQUIRED[command],
                   positional=positional)
  if not fewest <= len(args) <= most:
    cli.usage_error(prog, f"takes {positional} as positional arguments, got {len(args)}: "
                    f"{' '.join(args) or 'none'} (--help lists the flags)")
  return run(fv, args)


if __name__ == "__main__":
  cli.run(main)
