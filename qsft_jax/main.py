"""The trainer: one config file -> phase 1 (BC for phi) -> phase 2 (Q-SFT for theta) -> evaluation.

    python -m qsft_jax.main --config=configs/maze_cpu.py --workdir=/tmp/maze [--config.FIELD=VALUE ...]

Read top to bottom: set-up (distributed, config checks, tokenizer, data, mesh, model), then each
phase in `run_phase`, then evaluation. Running the same command again on the same workdir resumes
from whatever it holds: a finished phase is not re-run, an unfinished one restarts from its newest
checkpoint that restores (a damaged newer one is reported and moved aside) with the data iterator
at the same position and the metrics history up to that step, so the result equals an
uninterrupted run's. SIGTERM (preemption) saves a checkpoint at the current step and exits.
Nothing non-finite is saved: every step's loss, gradient norm, learning rate and updated
parameters are checked before a checkpoint is written (on_nonfinite, nonfinite.*).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any, Callable

from absl import flags, logging
import jax
import ml_collections
import numpy as np

from qsft_jax import checkpoints
from qsft_jax import cli
from qsft_jax import config_lib
from qsft_jax import errors
from qsft_jax.errors import UserError
from qsft_jax import losses
from qsft_jax import phases
from qsft_jax import progress
from qsft_jax import run as run_lib
from qsft_jax import sharding as qsharding
from qsft_jax import storage
from qsft_jax.data import check as data_check
from qsft_jax.models import config as model_config_lib
from qsft_jax.models import lora as lora_lib
from qsft_jax.models import quant_base
from qsft_jax.models import sharded


class NonFiniteError(UserError, FloatingPointError):
  """A train step produced a non-finite loss, gradient norm, learning rate or parameters (nothing from
  that state was checkpointed), or a phase skipped too many such steps."""


# ------------------------------------------------------------------------------------------------
# Set-up


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize, only when the config or QSFT_DISTRIBUTED=1 asks for it.

  On Cloud TPU and SLURM the arguments are discovered automatically; otherwise set
  distributed.coordinator_address / num_processes / process_id (or the JAX_* environment).
  """
  d = config.distributed
  if not (d.enabled or os.environ.get("QSFT_DISTRIBUTED") == "1"):
    return
  if os.environ.get("QSFT_CPU_COLLECTIVES"):  # two local CPU processes (tests, laptops)
    jax.config.update("jax_cpu_collectives_implementation", os.environ["QSFT_CPU_COLLECTIVES"])
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  jax.distributed.initialize(**kwargs)


def prepare_data(config, workdir):
  """The DataConfig of the run. A bundled task with an empty data.path generates its JSONL first
  (deterministic, so every process may write it; each write is atomic)."""
  from qsft_jax.data import DataConfig, write_jsonl
  data = config.data.to_dict()
  if not data["path"]:
    from qsft_jax.envs import generate_episodes
    files = run_lib.data_files(workdir)
    storage.path(os.path.dirname(files["train"])).mkdir(parents=True, exist_ok=True)
    d = config.dataset
    options = {**config.env.to_dict(), **d.options.to_dict()}
    for split, count, seed in (("train", d.num_episodes, d.seed), ("heldout", d.heldout_episodes, d.seed + 1)):
      if count and not storage.path(files[split]).exists():
        generated = generate_episodes(config.task, count, seed, policy=d.policy, **options)
        episodes = list(progress.track(generated, count, f"generate {config.task} {split}", "episodes"))
        write_jsonl(files[split], episodes)
    data["path"] = files["train"]
  data["num_epochs"] = None  # phases stop by step count; every host sees the same number of batches
  return DataConfig.from_config(data, shuffle_seed=config.seed)


def load_tokenizer(config, workdir):
  """The run's tokenizer (the workdir's saved alphabet on a resume); writes nothing. A spec that does
  not load is a ConfigError naming config.tokenizer."""
  from qsft_jax.tokenizers import load_tokenizer as load
  spec = run_lib.tokenizer_spec(workdir, config)
  try:
    return load(spec)
  except (ValueError, OSError) as e:
    raise config_lib.ConfigError(f"config.tokenizer: {spec!r} does not load: {e}") from e


def build_model(config, tokenizer, mesh, rules):
  """(ModelConfig, initial params or None). Pretrained weights are loaded straight into shards."""
  if config.model.init == "random":
    model_config = run_lib.model_config_from(config, tokenizer)
    return model_config, None
  from qsft_jax.models.weights import load_params
  try:
    model_config, params = load_params(config.model.init, mesh, rules, **config.model.overrides.to_dict())
  except FileNotFoundError as e:
    raise config_lib.ConfigError(f"config.model.init: {config.model.init!r}: {e}") from e
  if model_config.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f"config.tokenizer: {config.tokenizer!r} has {tokenizer.vocab_size} tokens but the weights of "
        f"{config.model.init!r} have {model_config.vocab_size}")
  return model_config, {"params": params} if "params" not in params else params


def device_peak_flops() -> float | None:
  """Peak dense bf16 FLOP/s of one device, or None where unknown (the CPU reports throughput only)."""
  try:
    from qsft_jax.chips import peak_flops_for_device
  except ImportError:
    return None
  return peak_flops_for_device(jax.devices()[0])


# ------------------------------------------------------------------------------------------------
# One phase


class Preemption:
  """Turns SIGTERM into a flag the loop polls: save at the current step, then exit.

  With several processes the notice may reach them at different steps (or only some of them), but
  the save is collective, so they agree first: at every log or checkpoint step (where all processes
  sync with their devices anyway) each one's flag is all-gathered, and all stop together if any saw
  SIGTERM. One process polls its flag at every step.
  """

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. a notebook): no handler
      pass

  def _handler(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint at the current step, then exiting")
    self.requested = True

  def should_stop(self, sync_point: bool) -> bool:
    """Called at every step by every process; `sync_point` must be the same on all of them."""
    if jax.process_count() == 1:
      return self.requested
    if not sync_point:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def check_skipped_fraction(phase: str, skipped_steps: int, total_steps: int, limit: float) -> None:
  """Raises NonFiniteError when a phase skipped more than `limit` (nonfinite.max_skipped_fraction)
  of its steps: called at its end, instead of marking it DONE."""
  if skipped_steps > limit * total_steps:
    section = "qsft" if phase == "control" else phase
    raise NonFiniteError(
        f"{phase}: {skipped_steps} of its {total_steps} steps were skipped as non-finite, more than "
        f"nonfinite.max_skipped_fraction={limit}; the phase is not marked DONE and its checkpoints "
        f"stay. Lower {section}.learning_rate or check the data and train the phase again (move "
        f"{phase}/checkpoints away), or raise nonfinite.max_skipped_fraction to accept it")


class MetricsLog:
  """Host-side metrics: checks for non-finite values, keeps the phase's history (saved with every
  checkpoint, so that a resumed phase continues it), writes TensorBoard, drives the progress bar.

  `restored`: the `snapshot()` saved with the checkpoint the phase resumes from (None: a fresh
  phase); its history is trimmed to `start_step`, and the skip counters continue from it.
  """

  RATE_KEYS = ("tokens_per_s", "steps_per_s", "model_flops_per_s_per_device", "mfu")

  def __init__(self, config, workdir, phase, total_steps, start_step, step_flops, schedule,
               restored: dict | None = None):
    self.phase, self.schedule, self.step_flops = phase, schedule, step_flops
    self.section = "qsft" if phase == "control" else phase  # the config section of its optimizer
    self.total_steps = total_steps
    self.max_consecutive_skips = config.nonfinite.max_consecutive_skips
    self.max_skipped_fraction = config.nonfinite.max_skipped_fraction
    self.pending: list[tuple[int, dict]] = []
    self.last_time, self.last_step, self.tokens = time.time(), start_step, 0.0
    self.peak = device_peak_flops()
    self.writer = None
    if config.log.tensorboard and jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(checkpoints.phase_dir(workdir, phase), "tensorboard"))
    self.bar = None
    if config.log.progress_bar and jax.process_index() == 0:
      self.bar = progress.Progress(total_steps, phase, "steps", initial=start_step)
    restored = restored or {}
    # One entry per log or periodic checkpoint step (and value-diagnostics step), up to the last step
    # flushed: what an uninterrupted run logs, whatever kills and resumes happened in between.
    self.history: list[dict] = [dict(h) for h in restored.get("history", ())
                                if h.get("step", 0) <= start_step]
    self.skipped_steps = int(restored.get("skipped_steps", 0))  # on_nonfinite="skip": steps skipped
    self.consecutive_skips = int(restored.get("consecutive_skips", 0))  # ... in a row, up to now

  def snapshot(self) -> dict:
    """What a checkpoint saves of the log (a copy: an async save serialises it later)."""
    return {"history": [dict(h) for h in self.history], "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips}

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))  # device arrays: fetching them later keeps dispatch async

  def _check(self, step: int, metrics: dict, learning_rate: float) -> None:
    """Raises NonFiniteError when step `step` must not reach a checkpoint; counts skipped steps."""
    if not np.isfinite(learning_rate):
      raise NonFiniteError(f"{self.phase} step {step}: the learning rate is {learning_rate}; no "
                           f"checkpoint was written from this state (set {self.section}.learning_rate "
                           "to a finite float32 value)")
    if float(metrics.get("skipped", 0.0)) > 0:  # on_nonfinite="skip": the update was not applied
      self.skipped_steps += 1
      self.consecutive_skips += 1
      logging.warning("%s step %d: non-finite loss, gradient or updated parameters; the update was "
                      "skipped (%d in a row, %d in this phase)", self.phase, step,
                      self.consecutive_skips, self.skipped_steps)
      if self.consecutive_skips >= self.max_consecutive_skips:
        first = step - self.consecutive_skips + 1
        raise NonFiniteError(
            f"{self.phase} step {step}: steps {first} to {step} were all skipped as non-finite "
            f"(nonfinite.max_consecutive_skips={self.max_consecutive_skips}); the checkpoints hold "
            f"the state before step {first}. Lower {self.section}.learning_rate or check the data, "
            "then rerun")
      return
    self.consecutive_skips = 0
    for name, value in metrics.items():
      if not np.isfinite(value):
        raise NonFiniteError(f"{self.phase} step {step}: metric {name} = {float(value)} is not finite; "
                             "no checkpoint was written from this state (set on_nonfinite='skip' to "
                             "skip such steps instead)")
    if float(metrics.get("params_finite", 1.0)) == 0.0:
      raise NonFiniteError(
          f"{self.phase} step {step}: the updated parameters are not finite (with a finite loss and "
          f"gradient norm: the update overflowed); no checkpoint was written from this state (lower "
          f"{self.section}.learning_rate, or set on_nonfinite='skip' to skip such steps)")

  def check_skipped_fraction(self) -> None:
    """`check_skipped_fraction` of this phase's count (at its end, before marking it DONE)."""
    check_skipped_fraction(self.phase, self.skipped_steps, self.total_steps, self.max_skipped_fraction)

  def flush(self, record: bool = True) -> dict | None:
    """Fetches pending metrics and checks them (`_check`: raises NonFiniteError naming the first bad
    step). `record`: append the last step's entry to the history (log and periodic checkpoint steps;
    not an extra save for SIGTERM, so that the history does not depend on when a run was stopped)."""
    if not self.pending:
      return None
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    rates = np.asarray(self.schedule(np.asarray(steps) - 1), np.float64).reshape(-1)
    for step, metrics, learning_rate in zip(steps, fetched, rates):
      self._check(step, metrics, float(learning_rate))
    now = time.time()
    seconds = max(now - self.last_time, 1e-9)
    tokens = sum(float(m["tokens"]) for m in fetched)
    rate = {"tokens_per_s": tokens / seconds, "steps_per_s": (steps[-1] - self.last_step) / seconds}
    if self.step_flops:
      achieved = self.step_flops * (steps[-1] - self.last_step) / seconds / jax.device_count()
      rate["model_flops_per_s_per_device"] = achieved
      if self.peak:
        rate["mfu"] = achieved / self.peak
    self.last_time, self.last_step = now, steps[-1]
    last = {k: float(v) for k, v in fetched[-1].items()}
    last.update(rate, learning_rate=float(rates[-1]), step=steps[-1],
                skipped_steps=self.skipped_steps)
    if record:
      self.history.append(last)
    if self.writer is not None:
      for step, metrics, learning_rate in zip(steps, fetched, rates):
        for name, value in metrics.items():
          self.writer.add_scalar(f"{self.phase}/{name}", float(value), step)
        self.writer.add_scalar(f"{self.phase}/learning_rate", float(learning_rate), step)
      for name, value in rate.items():
        self.writer.add_scalar(f"{self.phase}/{name}", value, steps[-1])
      self.writer.flush()
    if self.bar is not None:
      self.bar.update_to(steps[-1])
      self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{rate['tokens_per_s']:.0f}")
    return last

  def add_values(self, step: int, values: dict) -> None:
    """Host-side figures computed outside the step (value diagnostics): into the history entry of
    `step` (a new one if the last entry is another step) and TensorBoard."""
    values = {k: float(v) for k, v in values.items()}
    if self.history and self.history[-1].get("step") == step:
      self.history[-1].update(values)
    else:
      self.history.append({"step": step, **values})
    if self.writer is not None:
      for name, value in values.items():
        self.writer.add_scalar(f"{self.phase}/{name}", value, step)
      self.writer.flush()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


class StepProfiler:
  """jax.profiler traces of the steps `steps` (config_lib.profile_steps) of one phase: each run of
  consecutive steps is one trace written to LOG_DIR/steps_FIRST-LAST/plugins/profile/RUN/
  (HOST.xplane.pb: TensorBoard's profile plugin, XProf; FIRST is the step the trace started at, a
  resumed phase's first step inside a run; LAST at most `last_step`, the phase's last), each traced
  step inside a StepTraceAnnotation with its number.

      with profiler.step(step):
        state, metrics = step_fn(state, batch)
      profiler.after(step, (state, metrics))  # the trace ends once the last step of its run is done
  """

  def __init__(self, steps, log_dir: str, name: str, last_step: int):
    self.steps = frozenset(s for s in steps if s <= last_step)
    self.log_dir, self.name = log_dir, name
    self._trace = contextlib.ExitStack()  # the running trace's local folder (storage.staged_dir)
    self.active = False

  def _last_of_run(self, step: int) -> int:
    while step + 1 in self.steps:
      step += 1
    return step

  def step(self, step: int):
    """The context of one step: starts a trace at a traced step (when none runs) and annotates it."""
    if step not in self.steps:
      return contextlib.nullcontext()
    if not self.active:
      # The profiler writes local files only: a bucket workdir's trace is uploaded when it stops.
      trace_dir = os.path.join(self.log_dir, f"steps_{step}-{self._last_of_run(step)}")
      jax.profiler.start_trace(self._trace.enter_context(storage.staged_dir(trace_dir)))
      self.active = True
    return jax.profiler.StepTraceAnnotation(self.name, step_num=step)

  def after(self, step: int, outputs: Any) -> None:
    """Ends the trace after the last step of its run, once `outputs` (the step's) are computed."""
    if self.active and step + 1 not in self.steps:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    """Ends a running trace (a phase that stopped inside a traced run)."""
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
      self._trace.close()


def value_diagnostics_hook(config, workdir, phase, model_config, tokenizer, data_config):
  """state -> {"value_corr", "value_corr_turn0", "target_turn0", "clipped_turn0"} on the held-out
  episodes (docs/algorithm.md section 7), every log.value_diagnostics_every Q-SFT steps; None when off, in
  phase 1, without WORKDIR/data/heldout.jsonl, or with several processes (the diagnostics read the
  parameters from one host; evaluation still computes them at the end)."""
  every = config.log.get("value_diagnostics_every", 0)
  if phases.state_kind(phase) != "qsft" or every <= 0:
    return None
  if jax.process_count() > 1:
    logging.warning("log.value_diagnostics_every: not logged during training with %d processes",
                    jax.process_count())
    return None
  from qsft_jax import diagnostics
  batch = diagnostics.load_heldout_batch(workdir, data_config, tokenizer)
  if batch is None:
    return None
  # The run's qsft.* settings in both phase-2 phases: the control reports the Bellman targets its
  # theta_bar would give under them.
  targets = losses.TargetConfig.from_config(config, "qsft")

  lora = lora_lib.LoraConfig.from_config(config.model.lora)
  lora = lora if lora.enabled else None

  def diagnose(state):
    full = lambda key: {**state.get("base", {}), **state[key]}  # LoRA: the adapters over the base
    d = diagnostics.value_diagnostics(model_config, full("behaviour_params"), full("params"), batch,
                                      target_params=full("target_params"), targets=targets, lora=lora)
    turn0 = d["by_turn"][0] if d["by_turn"] else {}
    return {"value_corr": d["correlation"], "value_corr_turn0": d["first_turn_correlation"],
            "target_turn0": turn0.get("mean_target", float("nan")),
            "clipped_turn0": turn0.get("clipped_fraction", float("nan"))}
  return diagnose


def run_phase(phase: str, config, workdir: str, mesh, rules, model_config, tokenizer, data_config,
              initial_params: Callable[[], Any], preemption: Preemption, base: dict | None = None,
              base_record: dict | None = None, source: Any = None) -> dict:
  """Trains one phase to config[phase].steps (resuming if possible) and returns its final state.

  `initial_params()` -> the params a fresh phase starts from: BC: theta_0; Q-SFT and the control:
  (theta_0, phi); the value-head phases (mc, ilql): phi. The control is the Q-SFT phase with
  qsft.targets_mode = "ones".
  LoRA (model.lora.rank > 0): `base` is the frozen base {"params": tree} as the state stores it (the
  state takes these very arrays), `base_record` its `lora.base_record`; each parameter set of
  `initial_params()` is the variables {"params": base, "lora": adapters}. Checkpoints hold the state
  without the base, plus the record, and a restore over another base is refused.
  `source`: the records the phase trains on (default data_config's; filtered BC: its selection).
  """
  from qsft_jax.data.sharded import ShardedBatchIterator

  p = phases.optim_config(config, phase)
  program = phases.build(config, phase, model_config, mesh, rules)
  step_fn, schedule = program.step, program.schedule

  iterator = ShardedBatchIterator(
      data_config, tokenizer, global_batch_size=p.batch_size,
      num_shards=config.data_shards or jax.process_count(), process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.seed + phases.DATA_SEED_OFFSET[phase], source=source)
  manager = checkpoints.make_manager(workdir, phase, config)
  restored = None
  with_base = (lambda s: {**s, "base": base}) if program.lora is not None else (lambda s: s)
  if manager.all_steps():  # the newest checkpoint that restores (damaged newer ones moved aside)
    abstract = checkpoints.without_base(program.abstract_state(sharded.param_shapes(program.model, model_config)))
    try:
      restored = checkpoints.restore_latest(manager, abstract, iterator, label=phase)
      if restored is not None and program.lora is not None:
        checkpoints.check_base_record(manager, restored.step, base_record, label=phase)
    except BaseException:
      manager.close()
      raise
  if restored is not None:
    state, latest = with_base(restored.state), restored.step
    saved_log = restored.history if restored.history is not None else _saved_metrics(workdir, phase)
    if jax.process_index() == 0:
      print(f"{phase}: resumed from the checkpoint of step {latest}", flush=True)
  else:
    with jax.set_mesh(mesh):
      # With LoRA the base is left out (dead code under jit) and the run's own base arrays attached.
      init = lambda params: checkpoints.without_base(program.init_state(params))
      state = with_base(jax.jit(init, out_shardings=checkpoints.without_base(program.state_shardings))(
          initial_params()))
    latest, saved_log = 0, None

  if latest >= p.steps:
    manager.close()
    if not checkpoints.is_done(workdir, phase):  # killed between its last save and the marker
      check_skipped_fraction(phase, int((saved_log or {}).get("skipped_steps", 0)), p.steps,
                             config.nonfinite.max_skipped_fraction)
      checkpoints.mark_done(workdir, phase, p.steps)
    return state

  tokens_per_step = p.batch_size * data_config.max_length
  forward = model_config_lib.flops_per_token(model_config, data_config.max_length) * tokens_per_step
  step_flops = forward * phases.forward_passes(config, phase)
  log = MetricsLog(config, workdir, phase, p.steps, latest, step_flops, schedule, restored=saved_log)
  diagnose = value_diagnostics_hook(config, workdir, phase, model_config, tokenizer, data_config)
  metrics_path = os.path.join(checkpoints.phase_dir(workdir, phase), "metrics.json")
  profiler = StepProfiler(config_lib.profile_steps(config),
                          os.path.join(checkpoints.phase_dir(workdir, phase), "profile"), phase, p.steps)
  try:
    for step in range(latest + 1, p.steps + 1):
      batch = qsharding.global_batch_from_host_local(next(iterator), mesh, rules)
      with profiler.step(step):
        state, metrics = step_fn(state, batch)
      profiler.after(step, (state, metrics))
      log.add(step, metrics)
      periodic = step % config.checkpoint.every_steps == 0 or step == p.steps
      logged = step % config.log.every_steps == 0
      stop = preemption.should_stop(periodic or logged)
      save_now = periodic or stop
      if save_now or logged:
        # before any save: a non-finite state is never checkpointed
        last = log.flush(record=periodic or logged)
        if last is not None and jax.process_index() == 0 and logged:
          print(f"{phase} step {step}: " + ", ".join(
              f"{k}={v:.4g}" for k, v in last.items() if k != "step"), flush=True)
      if diagnose is not None and (step % config.log.value_diagnostics_every == 0 or step == p.steps):
        values = diagnose(state)
        log.add_values(step, values)
        if jax.process_index() == 0:
          print(f"{phase} step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in values.items()), flush=True)
      if save_now:
        snapshot = log.snapshot()
        if jax.process_index() == 0:  # readable while the run goes on; the checkpoint holds the same
          run_lib.write_json_atomic(metrics_path, snapshot["history"])
        checkpoints.save(manager, step, checkpoints.without_base(state), iterator, history=snapshot,
                         base_record=base_record)
      if stop:
        manager.wait_until_finished()
        logging.warning("%s: saved step %d after SIGTERM; exiting", phase, step)
        sys.exit(143)
    manager.wait_until_finished()
  finally:
    profiler.stop()
    log.close()
    manager.close()
  if jax.process_index() == 0:
    run_lib.write_json_atomic(metrics_path, log.history)
  log.check_skipped_fraction()
  checkpoints.mark_done(workdir, phase, p.steps)
  return state


def _saved_metrics(workdir: str, phase: str) -> dict | None:
  """The phase's metrics.json as a `MetricsLog.snapshot()`, for a checkpoint saved without its
  history; None when there is none."""
  path = os.path.join(checkpoints.phase_dir(workdir, phase), "metrics.json")
  if not storage.path(path).exists():
    return None
  try:
    with storage.path(path).open() as f:
      history = json.load(f)
  except (OSError, ValueError) as e:
    logging.warning("%s: %s cannot be read (%s); the metrics history starts again", phase, path, e)
    return None
  skipped = max((int(h.get("skipped_steps", 0)) for h in history), default=0)
  return {"history": history, "skipped_steps": skipped}


# ------------------------------------------------------------------------------------------------
# The run


def initial_params(phase: str, theta_init: str, pretrained: Any, fresh_params: Callable[[int], Any],
                   phi: Callable[[], Any]) -> Any:
  """What a fresh phase starts from. BC: theta_0 = the pretrained weights, else fresh_params(0) (the
  random initialisation from `seed`). Q-SFT and the control: (theta, phi) with theta by
  qsft.theta_init: "phi" the BC result phi(); "phi_init" theta_0 again (the paper's Algorithm 1:
  theta and phi start from the same model); "pretrained" the pretrained weights; "fresh"
  fresh_params(1), another random initialisation. mc and ilql: phi() (their heads start in
  `phases.build`'s init_state)."""
  theta_0 = lambda: pretrained if pretrained is not None else fresh_params(0)
  if phases.state_kind(phase) == "bc":  # bc and filtered_bc: theta_0
    return theta_0()
  if phases.state_kind(phase) == "heads":
    return phi()
  behaviour = phi()
  if theta_init == "phi":
    return behaviour, behaviour
  if theta_init == "phi_init":
    return theta_0(), behaviour
  if theta_init == "pretrained" and pretrained is not None:
    return pretrained, behaviour
  if theta_init == "fresh":
    return fresh_params(1), behaviour
  raise ValueError(f"qsft.theta_init={theta_init!r} cannot start theta here (config_lib.check_config)")


def check_lora_targets(model_config, lora: lora_lib.LoraConfig) -> None:
  """ConfigError naming model.lora.targets when a pattern matches no adaptable projection."""
  if not lora.enabled:
    return
  unmatched = lora_lib.unmatched_targets(model_config, lora)
  if unmatched:
    known = sorted({p.split("/", 1)[1] for p in lora_lib.adapter_paths(
        model_config, dataclasses.replace(lora, targets=(".",)))})
    raise config_lib.ConfigError(
        f"config.model.lora.targets: {', '.join(repr(t) for t in unmatched)} match(es) no projection of the "
        f"model; the adaptable module paths are layers_N/ (scanned: layers/) followed by {', '.join(known)}")


def lora_base(config, lora: lora_lib.LoraConfig, pretrained: Any, fresh_params: Callable[[int], Any]) -> dict:
  """The frozen base of a LoRA run, as its states store it: model.init's weights (the random
  initialisation of `seed` for a random init) cast to lora.base_dtype."""
  base = pretrained if pretrained is not None else fresh_params(0)
  return jax.jit(lambda b: lora_lib.store_base(b, lora))({"params": base["params"]})


def lora_adapters(config, model_config, lora: lora_lib.LoraConfig, offset: int, mesh, rules) -> dict:
  """New adapters {"lora": ...} (A random, B = 0) drawn from seed + offset: 0 phi's start, 1 theta's with
  qsft.theta_init = "fresh"."""
  key = jax.random.fold_in(jax.random.key(config.seed + offset), 1)
  return sharded.init_adapters_sharded(model_config, lora, key, mesh, rules)


def initial_lora_params(phase: str, theta_init: str, base: dict, adapters: Callable[[int], Any],
                        phi: Callable[[], Any]) -> Any:
  """`initial_params` with LoRA: variables {"params": base, "lora": adapters}. BC: phi's new adapter
  adapters(0). Q-SFT and the control: (theta, phi) with theta's adapter by qsft.theta_init: "phi" phi's
  trained adapter; "phi_init" and "pretrained" the adapter phi started from (B = 0: the base model);
  "fresh" adapters(1)."""
  if phases.state_kind(phase) == "bc":  # bc and filtered_bc: a new adapter drawn as phi's was
    return {**base, **adapters(0)}
  behaviour = {**base, **phi()}
  if theta_init == "phi":
    return behaviour, behaviour
  if theta_init in ("phi_init", "pretrained"):
    return {**base, **adapters(0)}, behaviour
  if theta_init == "fresh":
    return {**base, **adapters(1)}, behaviour
  raise ValueError(f"qsft.theta_init={theta_init!r} cannot start theta here (config_lib.check_config)")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) every configured phase, then evaluation. Returns the final states by phase.

  Every check (the config, the data files it names, the tokenizer, the model: pretrained weights
  load here) comes before the first write to the workdir, so a run that cannot start leaves the
  workdir as it was; a check added to this prologue goes above "# Writes". The one write among the
  checks is a bundled task's data, generated into WORKDIR/data/ (atomically, file by file) because it
  must exist to be checked. Then config.json, the tokenizer and model_config.json are written.
  """
  maybe_initialize_distributed(config)
  # Checks
  mesh_shape = config_lib.check_config(config, jax.device_count(), jax.process_count())
  config_lib.check_data_files(config)
  workdir = storage.normalize(workdir)
  tokenizer = load_tokenizer(config, workdir)
  mesh = qsharding.make_mesh(mesh_shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  model_config, pretrained = build_model(config, tokenizer, mesh, rules)
  lora = lora_lib.LoraConfig.from_config(config.model.lora)
  check_lora_targets(model_config, lora)
  run_lib.check_workdir_config(workdir, config)  # refuses changes that would corrupt the workdir
  data_config = prepare_data(config, workdir)
  data_summary = data_check.preflight(data_config, tokenizer, echo=jax.process_index() == 0)
  sources = {}
  if "filtered_bc" in config.phases:  # the top-return episodes (every process selects the same ones)
    from qsft_jax.data.pipeline import top_return_source
    sources["filtered_bc"], selection = top_return_source(data_config, tokenizer,
                                                          config.filtered_bc.top_fraction)
    if jax.process_index() == 0:
      print(selection.format(), flush=True)
    shards = config.data_shards or jax.process_count()
    if selection.kept < shards:
      raise config_lib.ConfigError(
          f"config.filtered_bc.top_fraction: {config.filtered_bc.top_fraction} keeps {selection.kept} "
          f"episodes, fewer than the {shards} data shards that each need one; raise it")
  # Writes
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  run_lib.write_config(workdir, config)
  run_lib.save_tokenizer(workdir, config, tokenizer)
  run_lib.save_model_config(workdir, model_config)
  if config.log.tensorboard and jax.process_index() == 0:
    data_check.write_scalars(data_summary, os.path.join(workdir, "data", "tensorboard"))
  preemption = Preemption()

  def fresh_params(offset: int):
    return sharded.init_params_sharded(model_config, jax.random.key(config.seed + offset), mesh, rules)

  states = {}
  if lora.enabled:
    base = lora_base(config, lora, pretrained, fresh_params)
    if lora.quantization != "none":  # QLoRA: the targeted kernels stored int8 / nf4
      base = quant_base.quantized_base(base, model_config, lora, mesh, rules)
    pretrained = None  # only the base (in base_dtype) is kept
    base_record = lora_lib.base_record(base, config.model.init, lora)
    for phase in config.phases:
      initial = functools.partial(initial_lora_params, phase, config.qsft.theta_init, base,
                                  lambda offset: lora_adapters(config, model_config, lora, offset, mesh, rules),
                                  lambda: states["bc"]["params"])
      states[phase] = run_phase(phase, config, workdir, mesh, rules, model_config, tokenizer,
                                data_config, initial, preemption, base=base, base_record=base_record,
                                source=sources.get(phase))
      base = states[phase]["base"]  # each step donates the base and returns it: the next phase takes these
  else:
    for phase in config.phases:
      initial = functools.partial(initial_params, phase, config.qsft.theta_init, pretrained,
                                  fresh_params, lambda: states["bc"]["params"])
      states[phase] = run_phase(phase, config, workdir, mesh, rules, model_config, tokenizer,
                                data_config, initial, preemption, source=sources.get(phase))

  if config.task and config.eval.enabled:
    from qsft_jax import evaluate
    results = evaluate.run(run_lib.load(workdir, mesh=mesh, rules=rules))  # with value diagnostics
    if jax.process_index() == 0:
      print(evaluate.results_markdown(results), flush=True)
  return states


def define_flags(argv) -> flags.FlagValues:
  fv = cli.new_flags()
  cli.config_flag(fv, argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.", flag_values=fv)
  flags.DEFINE_integer("verbosity", -1, "absl logging verbosity (-1 warnings, 0 info: orbax and grain "
                       "log every save at info).", flag_values=fv)
  return fv


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  fv = define_flags(argv)
  cli.parse(fv, argv, prog="python -m qsft_jax.main", doc=__doc__, required=["config", "workdir"])
  logging.set_verbosity(fv.verbosity)
  try:
    run(fv.config, fv.workdir)
  except UserError:
    raise
  except Exception as e:  # a read-only or full workdir, wherever it surfaced (orbax's async saves too)
    failure = errors.storage_error(e, storage.normalize(fv.workdir), resumes=True)
    if failure is None:
      raise
    raise failure from e
  return 0


if __name__ == "__main__":
  cli.run(main)
