"""Cost of a Q-SFT step against a BC step, and of the chunked WCE loss against a naive one.

One model and batch (a Llama-style config with a 50k vocabulary, batch 4 x 256 by default):

1. Step time: median wall time of the jitted BC and Q-SFT steps (same model, batch, optimizer).
   Target: Q-SFT / BC <= 1.8.
2. Compiled FLOPs (XLA cost analysis) of each step against the analytic count

       F = 2 * P_mm + 4 * n_layers * L * H * Dh        forward FLOPs per token
           (P_mm: matmul weights per token: every attention/MLP kernel + the unembedding D x V_pad;
            the attention term counts q.k and p.v over the full length L, as XLA computes them)
       BC step    = 3 F * tokens                         (forward + backward of theta)
       Q-SFT step = 3 F * tokens + F * tokens + F * tokens   (theta; theta_bar and phi forward only)

   Target: compiled / analytic within 10%. XLA's cost analysis counts a while-loop body once, so
   the FLOP count is taken with chunk_size = L (one chunk: the loss scan runs once); the math is the
   same for every chunk size.
3. Peak temporary memory (compiled.memory_analysis().temp_size_in_bytes) of the loss with its
   gradient (w.r.t. hidden states and unembedding) chunked, against a naive dense implementation
   (full [B, L, V] logits, log_softmax and soft target), plus the check that both give the same
   value and gradient. Target: chunked / naive <= 0.25.

4. LoRA (`--lora_rank`, 0 skips it; adapters on every attention and MLP projection over one frozen
   bf16 base, qsft_jax.models.lora): the LoRA Q-SFT step against the LoRA BC step (time, compiled
   FLOPs with one loss chunk), both against the full fine-tuning steps, and the bytes of each train
   state (every array of the state; the full state in float32, the LoRA state with a bf16 base and
   with an nf4 base, `model.lora.quantization`). With the base frozen, its weight gradients are never
   formed: the analytic LoRA counts are BC 2F (forward, backward to the activations) and Q-SFT 4F
   (theta 2F, theta_bar and phi F each) per token, plus the adapters' own small terms, so Q-SFT / BC
   is ~2 with LoRA against 5/3 without.

The table also gives the Q-SFT / BC ratio of this process's CPU time, which other processes' load
does not inflate. Prints a table, then as the LAST line one JSON object with qsft_over_bc_time,
bc_flops_ratio, qsft_flops_ratio, chunked_over_naive_memory and, with LoRA, lora_qsft_over_bc_time,
lora_qsft_over_bc_flops, lora_qsft_state_over_full, qlora_qsft_state_over_full. Measured figures:
docs/results/benchmarks.md.

    python benchmarks/step_cost.py [--batch 4] [--length 256] [--iters 7] [--chunk 64] [--lora_rank 16]
"""
from __future__ import annotations

import dataclasses
import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qsft_jax import cli, losses, sharding, train_steps
from qsft_jax.models import quant_base, sharded
from qsft_jax.models.lora import LoraConfig
from qsft_jax.models.config import ModelConfig, flops_per_token, param_count
from qsft_jax.models.transformer import Transformer

CONFIG = ModelConfig(family="llama", vocab_size=50257, d_model=256, num_layers=4, num_heads=4,
                     num_kv_heads=2, head_dim=64, mlp_dim=1024, max_position_embeddings=1024,
                     tie_embeddings=True)


def random_batch(rng: np.random.Generator, rows: int, length: int, vocab: int) -> dict:
  """[B, L] arrays of one episode per row: observation / action turns of 16 tokens alternating,
  done episodes, rewards on each action turn's last token (layout as docs/architecture.md)."""
  turn = 16
  tokens = rng.integers(1, vocab, size=(rows, length)).astype(np.int32)
  index = np.arange(length)
  action = ((index // turn) % 2 == 1)[None].repeat(rows, 0)
  last_of_turn = action & ((index % turn) == turn - 1)[None]
  rewards = np.where(last_of_turn, rng.uniform(0, 0.1, size=(rows, length)), 0.0).astype(np.float32)
  # next action row: i inside a turn; across an observation turn, the row before the next action
  next_row = np.where(last_of_turn, index[None] + turn, index[None])
  next_row = np.where(action & (next_row < length - 1), next_row, -1).astype(np.int32)
  turn_index = np.where(action, index[None] // (2 * turn), -1).astype(np.int32)
  return {"tokens": tokens, "positions": np.broadcast_to(index, (rows, length)).astype(np.int32),
          "segment_ids": np.ones((rows, length), np.int32), "action_mask": action,
          "rewards": rewards, "next_action_row": next_row,
          "discounts": np.where(next_row >= 0, 1.0, 0.0).astype(np.float32),
          "next_turn_row": np.full((rows, length), -1, np.int32),
          "turn_discounts": np.zeros((rows, length), np.float32), "turn_index": turn_index,
          "done": np.ones((rows, length), bool)}


def compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def time_steps(steps, states, batch, iters):
  """Median seconds per call of each step, calls interleaved (A, B, A, B, ...) so that load from
  other processes on the machine affects both alike. Returns (wall times, CPU times of this
  process, all threads: less sensitive to other processes' load, last metrics)."""
  states, metrics = list(states), [None] * len(steps)
  for i, step in enumerate(steps):  # compile + warm up
    states[i], metrics[i] = step(states[i], batch)
    jax.block_until_ready(metrics[i])
  times, cpu_times = [[] for _ in steps], [[] for _ in steps]
  for _ in range(iters):
    for i, step in enumerate(steps):
      start, cpu_start = time.perf_counter(), time.process_time()
      states[i], metrics[i] = step(states[i], batch)
      jax.block_until_ready((states[i], metrics[i]))
      times[i].append(time.perf_counter() - start)
      cpu_times[i].append(time.process_time() - cpu_start)
  median = lambda ts: [float(np.median(t)) for t in ts]
  return median(times), median(cpu_times), metrics


def tree_bytes(tree) -> int:
  """Bytes of every array of a pytree (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def lora_costs(args, config, optimizer, mesh, rules, batch, base, full_flops, full_time):
  """Part 4 (module docstring): (JSON figures, table rows)."""
  lora = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
  model = Transformer(config, lora=lora)
  theta = {**base, **sharded.init_adapters_sharded(config, lora, jax.random.key(2), mesh, rules)}
  phi = {**base, **sharded.init_adapters_sharded(config, lora, jax.random.key(3), mesh, rules)}
  inits = {"bc": lambda: (lambda v: train_steps.init_lora_bc_state(v, optimizer, lora), (theta,)),
           "qsft": lambda: (lambda v, f: train_steps.init_lora_qsft_state(v, f, optimizer, lora),
                            (theta, phi))}

  def fresh_state(kind):
    init, inputs = inits[kind]()
    shardings = train_steps.state_shardings(model, config, optimizer, mesh, rules, kind)
    return jax.jit(init, out_shardings=shardings)(*inputs)

  def steps(chunk):
    options = train_steps.StepOptions(chunk_size=chunk)
    return (train_steps.make_bc_step(model, config, optimizer, mesh, rules, options),
            train_steps.make_qsft_step(model, config, optimizer, mesh, rules, options=options))

  bc_one, qsft_one = steps(args.length)
  flops = [compiled_flops(step.lower(fresh_state(kind), batch).compile())
           for step, kind in ((bc_one, "bc"), (qsft_one, "qsft"))]
  times, cpu, _ = time_steps(list(steps(args.chunk)), [fresh_state("bc"), fresh_state("qsft")], batch,
                             args.iters)

  # State bytes (abstract: nothing allocated): full fine-tuning, LoRA with a bf16 base, QLoRA nf4.
  full = {"bc": (lambda p: train_steps.init_bc_state(p, optimizer), (base,)),
          "qsft": (lambda p, f: train_steps.init_qsft_state(p, f, optimizer), (base, base))}
  nf4 = dataclasses.replace(lora, quantization="nf4")
  state_bytes = {}
  for kind in ("bc", "qsft"):
    init, inputs = inits[kind]()
    def with_nf4(*xs, init=init):
      state = init(*xs)
      return {**state, "base": quant_base.quantize_base(state["base"], config, nf4)}
    state_bytes[kind] = [tree_bytes(jax.eval_shape(f, *x)) for f, x in
                         ((full[kind][0], full[kind][1]), (init, inputs), (with_nf4, inputs))]
  adapters = tree_bytes(theta["lora"]) // 4
  mb = lambda b: f"{b / 2**20:.1f}"
  result = {"lora_qsft_over_bc_time": times[1] / times[0], "lora_qsft_over_bc_flops": flops[1] / flops[0],
            "lora_qsft_state_over_full": state_bytes["qsft"][1] / state_bytes["qsft"][0],
            "qlora_qsft_state_over_full": state_bytes["qsft"][2] / state_bytes["qsft"][0]}
  rows = [
      (f"LoRA rank {lora.rank} ({adapters / 1e6:.2f}M adapter params): BC step time (s)", f"{times[0]:.3f}",
       ""),
      ("LoRA Q-SFT step time (s)", f"{times[1]:.3f}", ""),
      ("LoRA Q-SFT / BC time", f"{result['lora_qsft_over_bc_time']:.3f}", ""),
      ("LoRA Q-SFT / BC CPU time (this process)", f"{cpu[1] / cpu[0]:.3f} ({cpu[0]:.2f} s, {cpu[1]:.2f} s)",
       ""),
      ("LoRA / full step time, BC and Q-SFT",
       f"{times[0] / full_time[0]:.3f}, {times[1] / full_time[1]:.3f}", ""),
      ("LoRA BC / Q-SFT compiled FLOPs", f"{flops[0]:.4g} / {flops[1]:.4g}", ""),
      ("LoRA Q-SFT / BC compiled FLOPs", f"{result['lora_qsft_over_bc_flops']:.3f}", "~2 (4F / 2F)"),
      ("LoRA / full compiled FLOPs, BC and Q-SFT",
       f"{flops[0] / full_flops[0]:.3f}, {flops[1] / full_flops[1]:.3f}", "~2/3, ~4/5"),
      ("BC state MB: full / LoRA / QLoRA nf4", " / ".join(mb(b) for b in state_bytes["bc"]), ""),
      ("Q-SFT state MB: full / LoRA / QLoRA nf4", " / ".join(mb(b) for b in state_bytes["qsft"]), ""),
      ("Q-SFT state LoRA / full, QLoRA / full",
       f"{result['lora_qsft_state_over_full']:.3f}, {result['qlora_qsft_state_over_full']:.3f}", ""),
  ]
  return result, rows


def naive_wce(hidden, unembed, row_labels, row_weights, row_mask, normaliser, vocab):
  """Dense reference: full [B, L, V] logits, log_softmax and soft target."""
  logits = jnp.einsum("bld,dv->blv", hidden, unembed, preferred_element_type=jnp.float32)
  logp = losses.real_log_softmax(logits, vocab)
  target = losses.soft_targets(row_labels, row_weights, logits.shape[-1], vocab)
  per_row = -jnp.sum(jnp.where(target > 0, target * logp, 0.0), axis=-1)
  return jnp.sum(per_row * row_mask) / normaliser


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_integer("batch", 4, "Rows per batch.", flag_values=fv)
  flags.DEFINE_integer("length", 256, "Tokens per row.", flag_values=fv)
  flags.DEFINE_integer("iters", 7, "Timed calls.", flag_values=fv)
  flags.DEFINE_integer("chunk", 64, "Chunk size for timing and memory.", flag_values=fv)
  flags.DEFINE_integer("lora_rank", 16, "LoRA rank of part 4 (0: skip it).", lower_bound=0, flag_values=fv)
  return fv


def main(argv=None):
  """Runs the benchmark; argv as sys.argv holds it (the program name first)."""
  args = define_flags()
  cli.parse(args, argv, prog="python benchmarks/step_cost.py", doc=__doc__)

  config = CONFIG.replace(max_position_embeddings=max(CONFIG.max_position_embeddings, args.length))
  model = Transformer(config)
  rules = sharding.DEFAULT_RULES
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  optimizer = optax.adamw(1e-4)
  tokens = args.batch * args.length
  host = random_batch(np.random.default_rng(0), args.batch, args.length, config.vocab_size)
  batch = sharding.global_batch_from_host_local(host, mesh, rules)
  theta = sharded.init_params_sharded(config, jax.random.key(0), mesh, rules)
  phi = sharded.init_params_sharded(config, jax.random.key(1), mesh, rules)

  def fresh_state(kind):
    shardings = train_steps.state_shardings(model, config, optimizer, mesh, rules, kind)
    if kind == "bc":
      init = lambda p: train_steps.init_bc_state(p, optimizer)
      return jax.jit(init, out_shardings=shardings)(theta)
    init = lambda p, f: train_steps.init_qsft_state(p, f, optimizer)
    return jax.jit(init, out_shardings=shardings)(theta, phi)

  def steps(chunk):
    options = train_steps.StepOptions(chunk_size=chunk)
    bc = train_steps.make_bc_step(model, config, optimizer, mesh, rules, options)
    qsft = train_steps.make_qsft_step(model, config, optimizer, mesh, rules, options=options)
    return bc, qsft

  # 1. FLOPs (one chunk, see the module docstring)
  bc_one, qsft_one = steps(args.length)
  bc_flops = compiled_flops(bc_one.lower(fresh_state("bc"), batch).compile())
  qsft_flops = compiled_flops(qsft_one.lower(fresh_state("qsft"), batch).compile())
  forward = flops_per_token(config, args.length) * tokens
  bc_analytic, qsft_analytic = 3 * forward, 5 * forward

  # 2. step time
  bc_step, qsft_step = steps(args.chunk)
  (bc_time, qsft_time), (bc_cpu, qsft_cpu), (bc_metrics, qsft_metrics) = time_steps(
      [bc_step, qsft_step], [fresh_state("bc"), fresh_state("qsft")], batch, args.iters)

  # 3. loss memory, value and gradient: chunked vs naive
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(args.batch, args.length, config.d_model)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(config.d_model, config.padded_vocab_size)) * 0.05, jnp.float32)
  row_labels = losses.to_rows(batch["tokens"])
  row_mask = losses.to_rows(batch["action_mask"], False).astype(jnp.float32)
  row_weights = jnp.asarray(rng.uniform(size=(args.batch, args.length)), jnp.float32)
  normaliser = losses.action_token_count(batch["action_mask"])
  chunked = jax.jit(jax.value_and_grad(
      lambda h, u: losses.chunked_wce_loss(h, u, row_labels, row_weights, row_mask, normaliser,
                                           vocab_size=config.vocab_size, chunk_size=args.chunk)[0],
      (0, 1)))
  naive = jax.jit(jax.value_and_grad(
      lambda h, u: naive_wce(h, u, row_labels, row_weights, row_mask, normaliser, config.vocab_size),
      (0, 1)))
  chunked_mem = chunked.lower(hidden, unembed).compile().memory_analysis().temp_size_in_bytes
  naive_mem = naive.lower(hidden, unembed).compile().memory_analysis().temp_size_in_bytes
  (loss_c, (dh_c, du_c)), (loss_n, (dh_n, du_n)) = chunked(hidden, unembed), naive(hidden, unembed)
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))

  # 4. LoRA: steps over one frozen base, state bytes
  lora_rows = []
  if args.lora_rank:
    lora_result, lora_rows = lora_costs(args, config, optimizer, mesh, rules, batch, theta,
                                              (bc_flops, qsft_flops), (bc_time, qsft_time))

  result = {
      "qsft_over_bc_time": qsft_time / bc_time,
      "bc_flops_ratio": bc_flops / bc_analytic,
      "qsft_flops_ratio": qsft_flops / qsft_analytic,
      "chunked_over_naive_memory": chunked_mem / naive_mem,
      **(lora_result if args.lora_rank else {}),
  }
  print(f"model: llama, {param_count(config) / 1e6:.1f}M params, vocab {config.vocab_size} "
        f"(padded {config.padded_vocab_size}), batch {args.batch} x {args.length}, "
        f"device {jax.devices()[0].platform}")
  print(f"analytic forward FLOPs/token F = {flops_per_token(config, args.length) / 1e6:.2f} M")
  rows = [
      ("BC step time (s)", f"{bc_time:.3f}", ""),
      ("Q-SFT step time (s)", f"{qsft_time:.3f}", ""),
      ("Q-SFT / BC time", f"{result['qsft_over_bc_time']:.3f}", "<= 1.8"),
      ("Q-SFT / BC CPU time (this process)", f"{qsft_cpu / bc_cpu:.3f} ({bc_cpu:.2f} s, {qsft_cpu:.2f} s)", ""),
      ("BC FLOPs compiled / analytic (3F)", f"{bc_flops:.4g} / {bc_analytic:.4g} = {result['bc_flops_ratio']:.3f}", "0.9-1.1"),
      ("Q-SFT FLOPs compiled / analytic (5F)", f"{qsft_flops:.4g} / {qsft_analytic:.4g} = {result['qsft_flops_ratio']:.3f}", "0.9-1.1"),
      ("Q-SFT / BC compiled FLOPs", f"{qsft_flops / bc_flops:.3f}", "~10/6"),
      (f"loss temp memory chunked(C={args.chunk}) / naive (MB)",
       f"{chunked_mem / 2**20:.1f} / {naive_mem / 2**20:.1f} = {result['chunked_over_naive_memory']:.3f}", "<= 0.25"),
      ("loss chunked vs naive", f"{float(loss_c):.6f} vs {float(loss_n):.6f}", ""),
      ("max rel. diff d hidden / d unembed", f"{rel(dh_c, dh_n):.2e} / {rel(du_c, du_n):.2e}", "float32 rounding"),
      ("BC loss / Q-SFT loss, mean target", f"{float(bc_metrics['loss']):.3f} / {float(qsft_metrics['loss']):.3f}, "
       f"{float(qsft_metrics['mean_target']):.3f}", ""),
  ] + lora_rows
  width = max(len(r[0]) for r in rows)
  for name, value, target in rows:
    print(f"{name:<{width}}  {value:<40} {target}")
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
