"""Command line: ``python -m qsft_jax.data validate PATH... [options]`` and
``python -m qsft_jax.data build BUILDER_DIR --data_dir=DIR [--config NAME] [--manual_dir JSONL_DIR]
[--gen KEY=VALUE ...]`` (prepares a TFDS dataset as array_record without TensorFlow; prints its directory).

validate prints every problem as ``FILE:LINE: field: message``, then a summary; exit status 1 when any
episode is invalid or when no episode is kept (truncated or dropped over-long episodes are reported
and counted, not errors).
Without --max-length only the format and rewards are checked; with it, episodes are tokenised
(``--tokenizer``, default char) and their lengths checked too.
"""
from __future__ import annotations

import argparse
import sys


def _validate(args) -> int:
    from qsft_jax.data.loading import DataConfig, validate_paths
    from qsft_jax.tokenizers import load_tokenizer

    try:
        config = DataConfig(
            max_length=args.max_length or 2,  # placeholder when no length check is asked for
            overlong=args.overlong,
            reward_transform=args.reward_transform,
            gamma=args.gamma,
            gamma_token=args.gamma_token,
            observation_template=args.observation_template,
            action_template=args.action_template,
        )
        tokenizer = load_tokenizer(args.tokenizer) if args.max_length else None
        problems, summary = validate_paths(args.paths, config, tokenizer)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in problems:
        print(p)
    print(summary.format())
    if summary.kept == 0:
        print("error: no episode is left to train on", file=sys.stderr)
        return 1
    return 0 if summary.ok else 1


def _build(args) -> int:
    from qsft_jax.data.tfds_builders import build_dataset

    gen_kwargs = {}
    for item in args.gen or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --gen expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 1
        gen_kwargs[key] = value
    try:
        path = build_dataset(args.builder, data_dir=args.data_dir, config=args.config, manual_dir=args.manual_dir, overwrite=args.overwrite, **gen_kwargs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsft_jax.data")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check JSONL episode files")
    v.add_argument("paths", nargs="+", help="files, globs or directories of *.jsonl")
    v.add_argument("--max-length", type=int, default=0, help="row length; enables tokenising and length checks")
    v.add_argument("--tokenizer", default="char", help="char | char:PATH.json | hf:PATH | gguf:PATH | smollm2")
    v.add_argument("--overlong", default="truncate", choices=["truncate", "drop"])
    v.add_argument("--reward-transform", default="none", help="none | affine:LOW,HIGH[,MAX_TURNS] | terminal_return:RMIN,RMAX")
    v.add_argument("--gamma", type=float, default=1.0)
    v.add_argument("--gamma-token", type=float, default=1.0)
    v.add_argument("--observation-template", default="{text}", help="format string around observation texts")
    v.add_argument("--action-template", default="{text}", help="format string around action texts")
    v.set_defaults(func=_validate)
    b = sub.add_parser("build", help="prepare a TFDS dataset as array_record, without TensorFlow")
    b.add_argument("builder", help="builder directory (data/maze, data/jsonl_episodes, ...)")
    b.add_argument("--data_dir", "--data-dir", required=True)
    b.add_argument("--config", default=None, help="builder config name")
    b.add_argument("--manual_dir", "--manual-dir", default=None, help="the JSONL directory, for data/jsonl_episodes")
    b.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset is already prepared")
    b.add_argument("--gen", action="append", help="KEY=VALUE overriding a config field (num_train=100, options='{...}')")
    b.set_defaults(func=_build)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
