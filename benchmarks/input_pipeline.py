"""Input-pipeline throughput: episodes/s and tokens/s through the whole grain pipeline on this CPU.

    python benchmarks/input_pipeline.py [--task maze|wordle_like] [--episodes 4000] [--max-length 256]
        [--batch 16] [--epochs 2] [--num-workers 0] [--train-tokens-per-s 20000]

Writes a generated JSONL (maze episodes from qsft_jax.envs, or the synthetic Wordle-like ones), then
times reading + validation + reward transform + char tokenisation + first-fit packing + batching for
``--epochs`` epochs (generation and the JSONL write are not timed). tokens/s counts real (non-padding)
tokens. ``headroom`` = pipeline tokens/s over the tokens/s training consumes, given by
``--train-tokens-per-s`` (default 20000: a small model's training step on a few CPU cores or a
modest accelerator consumes thousands to tens of thousands of tokens/s; pass the trainer's logged
tokens/s for a real run). Target: headroom above 1, so that data loading never stalls training.

Prints a readable table, then as the last line one JSON object with episodes_per_s, tokens_per_s and
headroom. Measured figures: docs/results/benchmarks.md.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags

from qsft_jax import cli
from qsft_jax.data import DataConfig, write_jsonl
from qsft_jax.data.pipeline import PipelineStats, make_train_iterator
from qsft_jax.data.synthetic import wordle_like_episodes
from qsft_jax.tokenizers import CharTokenizer

ASSUMED_TRAIN_TOKENS_PER_S = 20000.0


def episodes_for(task: str, n: int, seed: int):
    if task == "maze":
        from qsft_jax.envs import generate_episodes

        return generate_episodes("maze", n, seed)
    return wordle_like_episodes(n, seed)


def define_flags() -> flags.FlagValues:
    fv = cli.new_flags()
    flags.DEFINE_enum("task", "maze", ["maze", "wordle_like"], "Episodes to read.", flag_values=fv)
    flags.DEFINE_integer("episodes", 4000, "Episodes in the file.", flag_values=fv)
    flags.DEFINE_integer("max_length", 256, "Row length.", flag_values=fv)
    flags.DEFINE_integer("batch", 16, "Rows per batch.", flag_values=fv)
    flags.DEFINE_integer("epochs", 2, "Passes over the file.", flag_values=fv)
    flags.DEFINE_integer("num_workers", 0, "grain worker processes.", flag_values=fv)
    flags.DEFINE_integer("pack_window", 64, "Episodes the first-fit packer looks ahead.", flag_values=fv)
    flags.DEFINE_float("train_tokens_per_s", ASSUMED_TRAIN_TOKENS_PER_S, "Tokens/s training consumes "
                       "(headroom = pipeline tokens/s over this).", flag_values=fv)
    return fv


def main(argv=None) -> dict:
    """Runs the benchmark; argv as sys.argv holds it (the program name first). Returns the JSON record."""
    args = define_flags()
    cli.parse(args, argv, prog="python benchmarks/input_pipeline.py", doc=__doc__)

    folder = tempfile.mkdtemp(prefix="qsft_input_bench_")
    path = os.path.join(folder, f"{args.task}.jsonl")
    write_jsonl(path, episodes_for(args.task, args.episodes, seed=0))
    # Maze rewards are negative per move: the normalised terminal return over the environment's declared
    # return bounds maps them into [0, 1], as a real run would configure.
    transform = "none"
    if args.task == "maze":
        from qsft_jax.envs import make_env

        low, high = make_env("maze").return_bounds
        transform = f"terminal_return:{low},{high}"
    config = DataConfig(
        path=path, max_length=args.max_length, pack=True, pack_window=args.pack_window, num_epochs=args.epochs,
        reward_transform=transform, num_workers=args.num_workers,
    )
    tok = CharTokenizer()
    stats = PipelineStats()
    start = time.perf_counter()
    it = make_train_iterator(config, tok, batch_size_per_process=args.batch, stats=stats)
    first_batch_s = None
    tokens = rows = segments = action_tokens = 0
    for batch in it:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
        real = batch["segment_ids"] > 0
        tokens += int(real.sum())
        action_tokens += int(batch["action_mask"].sum())
        rows += real.shape[0]
        segments += int(batch["segment_ids"].max(axis=1).sum())
    seconds = time.perf_counter() - start
    episodes = stats.kept if args.num_workers == 0 else segments  # workers keep their own stats
    result = {
        "episodes_per_s": episodes / seconds,
        "tokens_per_s": tokens / seconds,
        "headroom": tokens / seconds / args.train_tokens_per_s,
    }
    table = [
        ("task / episodes in file", f"{args.task} / {args.episodes}"),
        ("epochs, max_length, batch, pack_window, workers", f"{args.epochs}, {args.max_length}, {args.batch}, {args.pack_window}, {args.num_workers}"),
        ("episodes through the pipeline", f"{episodes} (truncated {stats.truncated}, dropped {stats.dropped})"),
        ("rows / fill (real tokens per row slot)", f"{rows} / {tokens / max(rows * args.max_length, 1):.3f}"),
        ("episodes per row", f"{segments / max(rows, 1):.2f}"),
        ("real tokens / action tokens", f"{tokens} / {action_tokens}"),
        ("time to first batch (s)", f"{first_batch_s:.3f}"),
        ("total time (s)", f"{seconds:.3f}"),
        ("episodes/s", f"{result['episodes_per_s']:.0f}"),
        ("tokens/s", f"{result['tokens_per_s']:.0f}"),
        ("train tokens/s assumed", f"{args.train_tokens_per_s:.0f}"),
        ("headroom (pipeline / training)", f"{result['headroom']:.1f}x"),
    ]
    width = max(len(k) for k, _ in table)
    for k, v in table:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli.run(main)
