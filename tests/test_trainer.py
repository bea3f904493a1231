"""The trainer (qsft_jax.main) end to end: artifacts, kill/resume bit for bit, checkpoints across
meshes, non-finite losses.

The subprocess tests share one uninterrupted reference run (tests/trainer_utils.py: the tiny config,
24 BC + 24 Q-SFT steps, a checkpoint every 2 steps, 8 simulated devices) and a compilation cache.
"""
import json
import re
import os
import shutil
import signal

import jax
import numpy as np
import pytest

import trainer_utils as tu
from trainer_utils import STEPS, SHARED_OVERRIDES


# ------------------------------------------------------------------------------------------------
# 1. End to end


@pytest.mark.slow
def test_tiny_config_end_to_end_artifacts():
  from qsft_jax import run as run_lib
  from qsft_jax.models import sharded
  from qsft_jax.models.transformer import Transformer

  workdir = tu.reference_run()
  for phase in ("bc", "qsft"):
    assert STEPS in tu.checkpoint_steps(workdir, phase)
    for item in ("state", "data"):
      assert os.path.isdir(os.path.join(workdir, phase, "checkpoints", str(STEPS), item))
    with open(os.path.join(workdir, phase, "DONE")) as f:
      assert f.read().strip() == str(STEPS)
    with open(os.path.join(workdir, phase, "metrics.json")) as f:
      history = json.load(f)
    assert history and history[-1]["step"] == STEPS
    assert all(np.isfinite(h["loss"]) for h in history)
    events = os.listdir(os.path.join(workdir, phase, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events), events
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["bc"]["steps"] == STEPS and config["data_shards"] == 2
  assert os.path.exists(os.path.join(workdir, "tokenizer.json"))
  assert os.path.exists(os.path.join(workdir, "model_config.json"))

  loaded = run_lib.load(workdir)
  shapes = sharded.param_shapes(Transformer(loaded.model_config), loaded.model_config)
  for key in ("behaviour_params", "theta_params"):
    got = jax.tree.map(lambda x: (x.shape, x.dtype), getattr(loaded, key))
    want = jax.tree.map(lambda x: (x.shape, x.dtype), shapes)
    assert got == want, key
  assert (loaded.behaviour_step, loaded.theta_step) == (STEPS, STEPS)
  assert loaded.model_config.vocab_size == loaded.tokenizer.vocab_size
  # phi is the BC result, theta the Q-SFT one (started from phi and trained further)
  ref = tu.read_state(workdir, "qsft", STEPS)
  np.testing.assert_array_equal(np.asarray(loaded.theta_params["params"]["embed"]["embedding"]),
                                ref["['params']['params']['embed']['embedding']"])
  bc = tu.read_state(workdir, "bc", STEPS)
  np.testing.assert_array_equal(
      np.asarray(loaded.behaviour_params["params"]["embed"]["embedding"]),
      bc["['params']['params']['embed']['embedding']"])
  assert not np.array_equal(ref["['params']['params']['embed']['embedding']"],
                            bc["['params']['params']['embed']['embedding']"])

  # The value diagnostics logged during phase 2 (log.value_diagnostics_every=12) are those of the
  # state at that step: the last one equals the diagnostics recomputed from the final checkpoint.
  from qsft_jax import diagnostics
  with open(os.path.join(workdir, "qsft", "metrics.json")) as f:
    logged = {h["step"]: h for h in json.load(f) if "value_corr" in h}
  assert sorted(logged) == [12, STEPS]
  batch = diagnostics.load_heldout_batch(workdir, loaded.data_config, loaded.tokenizer)
  want = diagnostics.value_diagnostics(loaded.model_config, loaded.behaviour_params,
                                       loaded.theta_params, batch, target_params=loaded.target_params,
                                       targets=loaded.targets)
  np.testing.assert_allclose(logged[STEPS]["value_corr"], want["correlation"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logged[STEPS]["value_corr_turn0"], want["first_turn_correlation"],
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logged[STEPS]["target_turn0"], want["by_turn"][0]["mean_target"], rtol=1e-4)
  assert logged[12]["value_corr"] != logged[STEPS]["value_corr"]  # computed at each step, not copied


@pytest.mark.slow
def test_control_phase_is_qsft_with_unit_targets_and_is_evaluated(tmp_path):
  """phases=(bc, control) trains exactly what phases=(bc, qsft) with qsft.targets_mode=ones trains
  (same initialisation, same batches), into WORKDIR/control; evaluation plays its policies and
  reports its value correlation beside BC."""
  from qsft_jax import evaluate
  from qsft_jax import run as run_lib

  reference = tu.reference_run()
  dirs = {}
  for name in ("control", "ones"):
    workdir = str(tmp_path / name)
    os.makedirs(workdir)
    for item in ("bc", "data", "tokenizer.json", "config.json"):  # phase 1 shared with the reference
      src = os.path.join(reference, item)
      (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(workdir, item))
    dirs[name] = workdir
  steps = ("--config.qsft.steps=6",)
  tu.run_ok(dirs["control"], *tu.SHARED_OVERRIDES, *steps, "--config.phases=('bc','control')")
  tu.run_ok(dirs["ones"], *tu.SHARED_OVERRIDES, *steps, "--config.qsft.targets_mode=ones")
  assert not os.path.exists(os.path.join(dirs["control"], "qsft"))
  control = tu.read_state(dirs["control"], "control", 6)
  tu.assert_states_equal(control, tu.read_state(dirs["ones"], "qsft", 6), what="control vs ones")
  bc = tu.read_state(reference, "bc", STEPS)
  assert not np.array_equal(control["['params']['params']['embed']['embedding']"],
                            bc["['params']['params']['embed']['embedding']"])

  loaded = run_lib.load(dirs["control"])
  assert loaded.theta_params is None and loaded.control_params is not None
  assert loaded.control_step == 6 and loaded.targets.mode == "token"  # the run's qsft.* settings
  results = evaluate.run(loaded, episodes=2, betas=(0.0, 4.0))
  assert list(results["policies"]) == ["bc", "control_beta4", "control_ratio"]
  assert set(results["value_correlation"]) == {"control"}
  assert os.path.exists(os.path.join(dirs["control"], "eval", "value_diagnostics_control.json"))
  table = evaluate.results_markdown(results)
  assert "| control_beta4 | 4 |" in table and "value corr. (turn 0)" in table


@pytest.mark.slow
def test_profile_steps_write_one_trace_per_run_of_steps(tmp_path):
  """log.profile_steps="2,4:9" with 4 steps: step 2, and step 4 (the phase's last), each traced into
  WORKDIR/bc/profile/steps_N-N/plugins/profile/RUN/HOST.xplane.pb, annotated with their step."""
  import glob
  workdir = str(tmp_path / "run")
  tu.run_ok(workdir, "--config.phases=('bc',)", "--config.bc.steps=4", "--config.eval.enabled=False",
            "--config.dataset.num_episodes=16", "--config.dataset.heldout_episodes=0",
            "--config.log.profile_steps=2,4:9")
  traces = sorted(glob.glob(os.path.join(workdir, "bc", "profile", "*", "plugins", "profile", "*",
                                         "*.xplane.pb")))
  runs = [os.path.relpath(t, os.path.join(workdir, "bc", "profile")).split(os.sep)[0] for t in traces]
  assert runs == ["steps_2-2", "steps_4-4"], traces
  for trace in traces:
    with open(trace, "rb") as f:
      data = f.read()
    assert len(data) > 1000 and b"step_num" in data, (trace, len(data))


# ------------------------------------------------------------------------------------------------
# 2. Kill and resume


def _resumed_from(text: str, phase: str) -> int | None:
  marker = f"{phase}: resumed from the checkpoint of step "
  for line in text.splitlines():
    if marker in line:
      return int(line.split(marker)[1].split()[0])
  return None


def _fake_partial_checkpoint(checkpoint_dir: str, complete_step: int, step: int) -> str:
  """What a write killed half-way leaves: the step's files under `N.orbax-checkpoint-tmp` (the name
  orbax 0.12 writes to before its rename), with no finalisation marker and a truncated array file."""
  src = os.path.join(checkpoint_dir, str(complete_step))
  dst = os.path.join(checkpoint_dir, f"{step}.orbax-checkpoint-tmp")
  shutil.copytree(src, dst)
  for marker in ("commit_success.txt", "_CHECKPOINT_METADATA"):
    if os.path.exists(os.path.join(dst, marker)):
      os.remove(os.path.join(dst, marker))
  biggest = max((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(dst, "state")) for f in fs),
                key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  return dst


@pytest.mark.slow
def test_kill_sigterm_and_resume_are_bit_identical(tmp_path):
  """One workdir goes through SIGKILL in BC, SIGKILL in Q-SFT, SIGTERM in Q-SFT and a kill during a
  checkpoint write; every restart resumes, and the final states equal the uninterrupted run's."""
  reference = tu.reference_run()
  workdir = str(tmp_path / "run")
  bc_ckpts = os.path.join(workdir, "bc", "checkpoints")

  # A: SIGKILL during BC, once the step-4 checkpoint is complete.
  proc = tu.start(workdir, *SHARED_OVERRIDES)
  tu.kill_when(proc, lambda: 4 in tu.checkpoint_steps(workdir, "bc"))
  assert tu.wait(proc) == -signal.SIGKILL
  bc_latest = max(tu.checkpoint_steps(workdir, "bc"))
  assert 4 <= bc_latest < STEPS and not os.path.exists(os.path.join(workdir, "bc", "DONE"))
  with open(os.path.join(workdir, "bc", "metrics.json")) as f:  # written with every save
    assert json.load(f)[-1]["step"] >= bc_latest

  # B: resumes BC at that step, finishes it; SIGKILL during Q-SFT.
  proc = tu.start(workdir, *SHARED_OVERRIDES)
  tu.kill_when(proc, lambda: 4 in tu.checkpoint_steps(workdir, "qsft"))
  assert tu.wait(proc) == -signal.SIGKILL
  text = tu.output(proc)
  assert _resumed_from(text, "bc") == bc_latest, text[-3000:]
  assert os.path.exists(os.path.join(workdir, "bc", "DONE"))
  qsft_latest = max(tu.checkpoint_steps(workdir, "qsft"))
  assert 4 <= qsft_latest < STEPS and not os.path.exists(os.path.join(workdir, "qsft", "DONE"))
  # the BC result already equals the uninterrupted run's
  tu.assert_states_equal(tu.read_state(workdir, "bc", STEPS), tu.read_state(reference, "bc", STEPS),
                         what="bc after kill")

  # C: SIGTERM during Q-SFT: saves at the current step and exits 143.
  proc = tu.start(workdir, *SHARED_OVERRIDES)
  tu.kill_when(proc, lambda: max(tu.checkpoint_steps(workdir, "qsft")) >= qsft_latest + 2,
               sig=signal.SIGTERM)
  assert tu.wait(proc) == 143, tu.output(proc)[-3000:]
  text = tu.output(proc)
  assert _resumed_from(text, "bc") == STEPS and _resumed_from(text, "qsft") == qsft_latest
  term_step = max(tu.checkpoint_steps(workdir, "qsft"))
  assert qsft_latest < term_step < STEPS
  assert f"saved step {term_step} after SIGTERM" in text, text[-3000:]
  assert not os.path.exists(os.path.join(workdir, "qsft", "DONE"))

  # D: resumes from exactly the SIGTERM step; SIGKILL while a checkpoint is being written.
  proc = tu.start(workdir, *SHARED_OVERRIDES)
  qsft_ckpts = os.path.join(workdir, "qsft", "checkpoints")
  tu.kill_when(proc, lambda: bool(tu.tmp_checkpoints(workdir, "qsft"))
               or max(tu.checkpoint_steps(workdir, "qsft")) >= STEPS - 6, poll=0.002)
  assert tu.wait(proc) == -signal.SIGKILL
  assert _resumed_from(tu.output(proc), "qsft") == term_step
  complete = max(tu.checkpoint_steps(workdir, "qsft"))
  assert complete < STEPS
  leftovers = tu.tmp_checkpoints(workdir, "qsft")
  real_kill_in_write = bool(leftovers)
  print(f"kill during a checkpoint write left: {leftovers or 'nothing (the write had finished)'}")
  # Always also leave one as a kill during a later write would (so that both cases are exercised
  # whether or not the real kill landed inside a write).
  leftovers.append(_fake_partial_checkpoint(qsft_ckpts, complete, complete + 4))
  leftover_steps = [int(os.path.basename(p).split(".")[0]) for p in leftovers]
  assert min(leftover_steps) > complete, (leftovers, complete)

  # E: resumes from the last complete checkpoint, never the partial one, and finishes.
  text = tu.run_ok(workdir, *SHARED_OVERRIDES)
  assert _resumed_from(text, "qsft") == complete, (text[-3000:], real_kill_in_write)
  assert os.path.exists(os.path.join(workdir, "qsft", "DONE"))
  for phase in ("bc", "qsft"):
    tu.assert_states_equal(tu.read_state(workdir, phase, STEPS), tu.read_state(reference, phase, STEPS),
                           what=f"{phase} final (real kill during a write: {real_kill_in_write})")
    # the metrics history survived every kill: the same entries (steps, losses, value diagnostics,
    # learning rates; not the wall-clock rates) as the uninterrupted run's
    got, want = (_comparable_history(d, phase) for d in (workdir, reference))
    assert [h["step"] for h in got] == [h["step"] for h in want]
    assert got == want, phase


def _comparable_history(workdir: str, phase: str) -> list[dict]:
  """metrics.json without the wall-clock rates, NaN (an undefined correlation) as a string."""
  from qsft_jax import main
  with open(os.path.join(workdir, phase, "metrics.json")) as f:
    return [{k: "nan" if v != v else v for k, v in h.items() if k not in main.MetricsLog.RATE_KEYS}
            for h in json.load(f)]


# ------------------------------------------------------------------------------------------------
# 3. Checkpoints across meshes


def test_checkpoint_restores_onto_other_meshes_and_device_counts(tmp_path):
  import ml_collections
  import optax
  from qsft_jax import checkpoints, train_steps
  from qsft_jax import sharding as qsharding
  from qsft_jax.models import sharded
  from qsft_jax.models.config import get_preset
  from qsft_jax.models.transformer import Transformer

  model_config = get_preset("tiny-llama", vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2,
                            head_dim=8, mlp_dim=64, num_layers=2)
  model = Transformer(model_config)
  optimizer = optax.adamw(1e-3)
  rules = qsharding.DEFAULT_RULES
  config = ml_collections.ConfigDict(dict(checkpoint=dict(keep=1, keep_every=0, async_save=False)))

  def state_on(mesh):
    shardings = train_steps.state_shardings(model, model_config, optimizer, mesh, rules, "qsft")
    return shardings

  mesh8 = qsharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  theta = sharded.init_params_sharded(model_config, jax.random.key(0), mesh8, rules)
  phi = sharded.init_params_sharded(model_config, jax.random.key(1), mesh8, rules)
  shardings8 = state_on(mesh8)
  with jax.set_mesh(mesh8):
    state = jax.jit(lambda t, p: train_steps.init_qsft_state(t, p, optimizer),
                    out_shardings=shardings8)(theta, phi)
    # non-trivial optimizer moments and a target that differs from theta
    state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x,
                                      state["opt_state"])
    state["target_params"] = jax.tree.map(lambda x: x * 0.25, state["target_params"])
  saved = jax.tree.map(np.asarray, state)
  manager = checkpoints.make_manager(str(tmp_path), "qsft", config)
  checkpoints.save(manager, 3, state)
  manager.wait_until_finished()
  manager.close()

  targets = [qsharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
             qsharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4]),
             qsharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:4])]
  for mesh in targets:
    shardings = state_on(mesh)
    abstract = qsharding.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    manager = checkpoints.make_manager(str(tmp_path), "qsft", config)
    assert manager.latest_step() == 3
    restored = checkpoints.restore(manager, 3, abstract)
    manager.close()
    jax.tree.map(lambda r, s: np.testing.assert_array_equal(np.asarray(r), s), restored, saved)
    for r, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
      assert r.sharding.is_equivalent_to(sh, r.ndim), (r.sharding, sh)
    used = {d for leaf in jax.tree.leaves(restored) for d in leaf.sharding.device_set}
    assert used == set(mesh.devices.flat)
  # the tensor axis really splits something on the 2x2x2 mesh (heads), fsdp splits embed
  spec = state_on(targets[0])["params"]["params"]["layers_0"]["attn"]["q"]["kernel"].spec
  assert "tensor" in str(spec) and "fsdp" in str(spec), spec


# ------------------------------------------------------------------------------------------------
# 6. Non-finite losses


def _nonfinite_config(on_nonfinite):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", tu.TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.phases = ("bc",)
  config.bc.steps = 6
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  config.log.every_steps = 2
  config.log.tensorboard = False
  config.eval.enabled = False
  config.on_nonfinite = on_nonfinite
  return config


@pytest.fixture
def poison_step_5(monkeypatch):
  """Step 5's batch gets an out-of-vocabulary token id in its first row: the embedding lookup
  returns NaN for it (jnp.take's fill mode), so that step's loss and gradients are NaN."""
  from qsft_jax.data.sharded import ShardedBatchIterator
  original = ShardedBatchIterator.__next__
  calls = {"n": 0}

  def poisoned(self):
    batch = original(self)
    calls["n"] += 1
    if calls["n"] == 5:
      batch = dict(batch)
      tokens = batch["tokens"].copy()
      tokens[0, batch["segment_ids"][0] > 0] = 10**6
      batch["tokens"] = tokens
    return batch

  monkeypatch.setattr(ShardedBatchIterator, "__next__", poisoned)
  handler = signal.getsignal(signal.SIGTERM)
  yield calls
  signal.signal(signal.SIGTERM, handler)  # main.run installs its SIGTERM handler


@pytest.mark.slow
def test_nonfinite_loss_stops_without_checkpoint(tmp_path, poison_step_5):
  from qsft_jax import main
  with pytest.raises(main.NonFiniteError) as error:
    main.run(_nonfinite_config("stop"), str(tmp_path))
  message = str(error.value)
  # the first non-finite metric of step 5 (NaN gradients; the loss may be NaN as well)
  assert re.search(r"^bc step 5: metric (loss|grad_norm) = nan is not finite", message), message
  assert "no checkpoint was written" in message
  # step 4 was the last save; neither step 5 nor anything after it was checkpointed
  assert tu.checkpoint_steps(str(tmp_path), "bc") == [2, 4]
  assert not tu.tmp_checkpoints(str(tmp_path), "bc")
  assert not os.path.exists(os.path.join(tmp_path, "bc", "DONE"))
  with open(os.path.join(tmp_path, "bc", "metrics.json")) as f:  # the history of the saved steps
    assert [h["step"] for h in json.load(f)] == [2, 4]
  state = tu.read_state(str(tmp_path), "bc", 4)
  assert all(np.all(np.isfinite(v)) for v in state.values())


@pytest.mark.slow
def test_nonfinite_loss_skipped_and_counted(tmp_path, poison_step_5):
  from qsft_jax import main
  config = _nonfinite_config("skip")
  config.nonfinite.max_skipped_fraction = 0.2  # 1 of 6 steps
  states = main.run(config, str(tmp_path))
  assert poison_step_5["n"] == 6
  assert tu.checkpoint_steps(str(tmp_path), "bc")[-1] == 6
  assert os.path.exists(os.path.join(tmp_path, "bc", "DONE"))
  with open(os.path.join(tmp_path, "bc", "metrics.json")) as f:
    history = json.load(f)
  assert history[-1]["step"] == 6 and history[-1]["skipped_steps"] == 1
  assert int(states["bc"]["step"]) == 6
  saved = tu.read_state(str(tmp_path), "bc", 6)
  assert all(np.all(np.isfinite(v)) for v in saved.values())


@pytest.mark.slow
def test_phase_that_skipped_too_many_steps_is_not_done(tmp_path, poison_step_5):
  """1 of 6 steps skipped is more than the default nonfinite.max_skipped_fraction (0.1): the phase
  saves its (finite) checkpoints but is not marked DONE, and a rerun says so again."""
  from qsft_jax import main
  from qsft_jax.errors import UserError
  config = _nonfinite_config("skip")
  assert config.nonfinite.max_skipped_fraction == 0.1
  for attempt in range(2):  # the second run restores step 6 and finds the count in its history
    with pytest.raises(main.NonFiniteError) as error:
      main.run(config, str(tmp_path))
    assert isinstance(error.value, UserError)
    assert str(error.value).startswith(
        "bc: 1 of its 6 steps were skipped as non-finite, more than nonfinite.max_skipped_fraction=0.1; "
        "the phase is not marked DONE and its checkpoints stay"), (attempt, str(error.value))
    assert tu.checkpoint_steps(str(tmp_path), "bc") == [4, 6]  # checkpoint.keep = 2
    assert not os.path.exists(os.path.join(tmp_path, "bc", "DONE"))
  assert poison_step_5["n"] == 6  # the rerun trained nothing
  saved = tu.read_state(str(tmp_path), "bc", 6)
  assert all(np.all(np.isfinite(v)) for v in saved.values())
