"""Faults around checkpoints and non-finite values: damaged checkpoints fall back to the previous
complete one, the metrics log survives resumes, and nothing non-finite is saved.

The checkpoint tests save small states with orbax in this process and damage them as a user or a
failing disk would; one subprocess test damages the shared reference run's last two Q-SFT
checkpoints (tests/trainer_utils.py) and checks that the trainer finishes exactly as the reference.
The kill/resume history test and the trainer-level skip tests live in tests/test_trainer.py.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from qsft_jax import checkpoints, config_lib, main, sharding, train_steps
from qsft_jax.errors import UserError
import mdp_utils  # tests/mdp_utils.py
import trainer_utils as tu


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints


class CountingIterator:
  """The smallest iterator grain's checkpoint handler saves: its position is its state."""

  def __init__(self):
    self.position = 0

  def __next__(self):
    self.position += 1
    return self.position

  def get_state(self) -> bytes:
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state: bytes) -> None:
    self.position = json.loads(state)["position"]

  def start_prefetch(self) -> None:
    pass


def _state(step: int) -> dict:
  """A train-state-like dict whose arrays are large enough that an array file is the largest file."""
  rng = np.random.default_rng(step)
  return {"step": np.int32(step), "params": {"w": rng.standard_normal((256, 256), np.float32),
                                            "b": rng.standard_normal((256,), np.float32)}}


def _config(keep=5):
  return ml_collections.ConfigDict(dict(checkpoint=dict(keep=keep, keep_every=0, async_save=False)))


def _save_steps(workdir, steps=(2, 4, 6)):
  manager = checkpoints.make_manager(workdir, "bc", _config())
  iterator = CountingIterator()
  for step in steps:
    iterator.position = 10 * step
    history = {"history": [{"step": s, "loss": float(s)} for s in range(1, step + 1)],
               "skipped_steps": step // 2, "consecutive_skips": 0}
    checkpoints.save(manager, step, jax.tree.map(jnp.asarray, _state(step)), iterator, history=history)
  manager.wait_until_finished()
  manager.close()
  return os.path.join(workdir, "bc", "checkpoints")


def _abstract():
  device = jax.devices()[0]
  sharding_ = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                     sharding=sharding_), _state(0))


def _files(path):
  return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]


def damage(step_path: str, how: str) -> None:
  """The damages of the issue, applied to one complete step directory.

  A truncated array file: the largest data file of the state's array store (state/d/). The files
  under state/ocdbt.process_N/ are what each process wrote before orbax merged them into that store;
  a restore does not read them, so truncating one of them (the largest file of a multi-device
  checkpoint is often one) changes nothing and the state restores intact.
  """
  if how == "truncated_array_file":
    biggest = max(_files(os.path.join(step_path, "state", "d")), key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  elif how == "deleted_data_iterator_file":
    (name,) = [n for n in os.listdir(os.path.join(step_path, "data")) if n.startswith("process_")]
    os.remove(os.path.join(step_path, "data", name))
  elif how == "emptied_metadata":
    open(os.path.join(step_path, "state", "_METADATA"), "w").close()
  elif how == "empty_step_directory":
    shutil.rmtree(step_path)
    os.makedirs(step_path)
  else:
    raise ValueError(how)


DAMAGES = ("truncated_array_file", "deleted_data_iterator_file", "emptied_metadata",
           "empty_step_directory")


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, how, caplog):
  ckpts = _save_steps(str(tmp_path))
  damage(os.path.join(ckpts, "6"), how)
  step6 = os.path.join(ckpts, "6")
  damaged_files = sorted(os.path.relpath(p, step6) for p in _files(step6))

  manager = checkpoints.make_manager(str(tmp_path), "bc", _config())
  assert manager.all_steps() == [2, 4, 6]  # orbax takes the damaged step for a complete one
  iterator = CountingIterator()
  with caplog.at_level(logging.WARNING):
    restored = checkpoints.restore_latest(manager, _abstract(), iterator, label="bc")
  assert restored.step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.state), _state(4))
  assert iterator.position == 40
  assert restored.history["skipped_steps"] == 2
  assert restored.history["history"][-1] == {"step": 4, "loss": 4.0}
  assert [s for s, _ in restored.broken] == [6] and restored.broken[0][1]
  lines = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("bc: the checkpoint of step 6 cannot be restored (")
  assert "\n" not in lines[0]

  # the damaged step is kept, moved aside, and the run can save step 6 again
  assert not os.path.exists(os.path.join(ckpts, "6"))
  moved = os.path.join(ckpts, "6.broken")
  assert sorted(os.path.relpath(p, moved) for p in _files(moved)) == damaged_files
  assert manager.all_steps() == [2, 4]
  checkpoints.save(manager, 6, jax.tree.map(jnp.asarray, _state(60)), iterator)
  manager.wait_until_finished()
  manager.close()
  manager = checkpoints.make_manager(str(tmp_path), "bc", _config())
  again = checkpoints.restore_latest(manager, _abstract(), CountingIterator(), label="bc")
  manager.close()
  assert again.step == 6 and not again.broken and again.history is None
  np.testing.assert_array_equal(np.asarray(again.state["params"]["w"]), _state(60)["params"]["w"])


def test_no_restorable_checkpoint_is_a_user_error_that_changes_nothing(tmp_path):
  ckpts = _save_steps(str(tmp_path))
  for step, how in zip((2, 4, 6), DAMAGES):
    damage(os.path.join(ckpts, str(step)), how)
  before = sorted(_files(ckpts)) + sorted(os.listdir(ckpts))
  manager = checkpoints.make_manager(str(tmp_path), "bc", _config())
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.restore_latest(manager, _abstract(), CountingIterator(), label="bc")
  manager.close()
  assert isinstance(error.value, UserError)
  message = str(error.value)
  assert message.startswith(f"bc: none of the 3 checkpoints in {ckpts} can be restored (step 6: ")
  assert "; step 4: " in message and "; step 2: " in message and "\n" not in message
  assert "move that directory away" in message
  assert sorted(_files(ckpts)) + sorted(os.listdir(ckpts)) == before  # nothing moved or deleted


def test_latest_params_reader_skips_a_damaged_step(tmp_path):
  ckpts = _save_steps(str(tmp_path))
  damage(os.path.join(ckpts, "6"), "truncated_array_file")
  abstract = _abstract()["params"]
  step, params = checkpoints.restore_latest_params(str(tmp_path), "bc", ("params",), abstract)
  assert step == 4
  np.testing.assert_array_equal(np.asarray(params["params"]["w"]), _state(4)["params"]["w"])
  assert os.path.isdir(os.path.join(ckpts, "6"))  # a reader leaves the workdir as it is
  for s in (2, 4):
    damage(os.path.join(ckpts, str(s)), "empty_step_directory")
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"^bc: none of the checkpoints in .* \(step 6: "):
    checkpoints.restore_latest_params(str(tmp_path), "bc", ("params",), abstract)


def _comparable(history):
  """A metrics history without the wall-clock rates, NaN (an undefined correlation) as a string."""
  return [{k: "nan" if v != v else v for k, v in h.items() if k not in main.MetricsLog.RATE_KEYS}
          for h in history]


@pytest.mark.slow
def test_trainer_falls_back_over_damaged_checkpoints_and_finishes_as_the_reference(tmp_path):
  """The reference run with its last two Q-SFT checkpoints damaged and no DONE: the trainer reports
  both, resumes from step STEPS - 4, and ends with the reference's parameters and metrics."""
  reference = tu.reference_run()
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("eval"))
  os.remove(os.path.join(workdir, "qsft", "DONE"))
  ckpts = os.path.join(workdir, "qsft", "checkpoints")
  last = tu.STEPS
  damage(os.path.join(ckpts, str(last)), "truncated_array_file")
  damage(os.path.join(ckpts, str(last - 2)), "deleted_data_iterator_file")
  # On the step it falls back to, half of the largest per-process file truncated (as large as the
  # merged store's file, give or take a few bytes, so often the largest file of the step): the merged
  # store does not read it, so step STEPS - 4 must restore, and intact (the final state below equals
  # the reference's).
  per_process = [p for p in _files(os.path.join(ckpts, str(last - 4), "state"))
                 if "ocdbt.process_" in os.path.relpath(p, ckpts)]
  assert per_process, "no per-process files under state/ocdbt.process_N/"
  biggest = max(per_process, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)

  text = tu.run_ok(workdir, *tu.SHARED_OVERRIDES)
  for step in (last, last - 2):
    assert f"qsft: the checkpoint of step {step} cannot be restored (" in text, text[-3000:]
    assert os.path.isdir(os.path.join(ckpts, f"{step}.broken"))
  assert f"qsft: resumed from the checkpoint of step {last - 4}" in text
  assert tu.checkpoint_steps(workdir, "qsft")[-1] == last
  assert os.path.exists(os.path.join(workdir, "qsft", "DONE"))
  tu.assert_states_equal(tu.read_state(workdir, "qsft", last), tu.read_state(reference, "qsft", last),
                         what="qsft after the fallback")
  with open(os.path.join(workdir, "qsft", "metrics.json")) as f, \
      open(os.path.join(reference, "qsft", "metrics.json")) as g:
    assert _comparable(json.load(f)) == _comparable(json.load(g))


# ------------------------------------------------------------------------------------------------
# Non-finite values


def _tiny_config():
  return config_lib.load_config_file(tu.TINY)


@pytest.mark.parametrize("field,value", [("bc.learning_rate", 1e39), ("qsft.learning_rate", 1e39),
                                         ("bc.learning_rate", float("nan")),
                                         ("qsft.learning_rate", float("inf"))])
def test_learning_rate_that_is_not_a_finite_float32_is_refused(field, value):
  config = _tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError,
                     match=rf"^config\.{re.escape(field)}: {re.escape(str(value))} is not a finite "
                     "float32"):
    config_lib.check_config(config, 8)
  config[section][name] = 3e38  # the largest float32 is about 3.4e38
  config_lib.check_config(config, 8)
  with np.errstate(over="ignore"):  # the float32 rounding the check stands for
    assert not np.isfinite(np.float32(1e39)) and np.isfinite(np.float32(3e38))


def test_nonfinite_section_is_checked():
  for field, value, message in (("max_consecutive_skips", 0, "must be an integer >= 1"),
                                ("max_skipped_fraction", 1.5, r"must be in \[0, 1\]"),
                                ("max_skipped_fraction", -0.1, r"must be in \[0, 1\]")):
    config = _tiny_config()
    config.nonfinite[field] = value
    with pytest.raises(config_lib.ConfigError, match=rf"^config\.nonfinite\.{field}: {message}"):
      config_lib.check_config(config, 8)
  config = _tiny_config()
  config.nonfinite.max_skips = 3
  with pytest.raises(config_lib.ConfigError, match=r"^config\.nonfinite\.max_skips: unknown field"):
    config_lib.check_config(config, 8)


def test_tree_is_finite_against_numpy():
  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int32),
          "c": {"d": rng.standard_normal(7).astype(np.float16)}}
  assert bool(train_steps.tree_is_finite(tree))
  big = dict(tree, a=np.full((3, 4), 3e38, np.float32))  # large but finite: no overflowing sums
  assert bool(train_steps.tree_is_finite(big))
  for bad in (np.inf, -np.inf, np.nan):
    for path in ("a", "c"):
      t = jax.tree.map(np.copy, tree)
      leaf = t["a"] if path == "a" else t["c"]["d"]
      leaf.flat[rng.integers(leaf.size)] = bad
      assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(t))  # the numpy reference
      assert not bool(train_steps.tree_is_finite(t))
  assert bool(train_steps.tree_is_finite({}))


@pytest.fixture(scope="module")
def overflowing_step_setup():
  """A small model on one device and an optimizer whose update is infinite: the loss and gradient of
  the step are finite, the updated parameters are not."""
  from qsft_jax.models import sharded
  from qsft_jax.models.config import get_preset
  from qsft_jax.models.transformer import Transformer
  model_config = get_preset("tiny-llama", vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2,
                            head_dim=8, mlp_dim=64, num_layers=2)
  model = Transformer(model_config)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  optimizer = optax.chain(optax.sgd(1e-3), optax.scale(np.inf))
  params = sharded.init_params_sharded(model_config, jax.random.key(0), mesh, rules)
  batch = mdp_utils.random_batch(np.random.default_rng(0), 4, 32, model_config.vocab_size)
  return model, model_config, mesh, rules, optimizer, params, batch


@pytest.mark.parametrize("skip", [False, True])
def test_step_reports_nonfinite_updated_parameters(overflowing_step_setup, skip):
  model, model_config, mesh, rules, optimizer, params, batch = overflowing_step_setup
  step = train_steps.make_bc_step(model, model_config, optimizer, mesh, rules,
                                  train_steps.StepOptions(chunk_size=16, skip_nonfinite=skip))
  shardings = train_steps.state_shardings(model, model_config, optimizer, mesh, rules, "bc")
  with jax.set_mesh(mesh):
    state = jax.jit(lambda p: train_steps.init_bc_state(jax.tree.map(jnp.copy, p), optimizer),
                    out_shardings=shardings)(params)
  before = jax.tree.map(np.array, state["params"])
  state, metrics = step(state, sharding.global_batch_from_host_local(batch, mesh, rules))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert metrics["params_finite"] == 0.0
  after = jax.tree.map(np.asarray, state["params"])
  if skip:  # the update is not applied
    assert metrics["skipped"] == 1.0
    jax.tree.map(np.testing.assert_array_equal, after, before)
  else:  # the trainer's host check refuses it before any save
    assert metrics["skipped"] == 0.0
    assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after))
    log = _log()
    log.add(7, metrics)
    with pytest.raises(main.NonFiniteError,
                       match=r"^bc step 7: the updated parameters are not finite"):
      log.flush()


def _log(max_consecutive_skips=10, max_skipped_fraction=0.1, total_steps=20, start_step=0,
         restored=None, schedule=lambda s: np.full(np.shape(s), 1e-3)):
  config = ml_collections.ConfigDict(dict(
      log=dict(tensorboard=False, progress_bar=False),
      nonfinite=dict(max_consecutive_skips=max_consecutive_skips,
                     max_skipped_fraction=max_skipped_fraction)))
  return main.MetricsLog(config, "/nonexistent", "bc", total_steps, start_step, 0, schedule,
                         restored=restored)


def _metrics(skipped=False, loss=0.5):
  bad = float("nan") if skipped else loss
  return {"loss": bad, "grad_norm": bad, "tokens": 8.0, "params_finite": 0.0 if skipped else 1.0,
          "skipped": 1.0 if skipped else 0.0}


def test_skipped_steps_are_counted_warned_and_limited(caplog):
  log = _log(max_consecutive_skips=3)
  with caplog.at_level(logging.WARNING):
    for step, skipped in ((1, False), (2, True), (3, True), (4, False)):
      log.add(step, _metrics(skipped))
    log.flush()
  assert (log.skipped_steps, log.consecutive_skips) == (2, 0)
  warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert warnings[0].startswith("bc step 2: non-finite loss, gradient or updated parameters; the "
                                "update was skipped (1 in a row, 1 in this phase)")
  assert warnings[1].startswith("bc step 3:") and len(warnings) == 2
  assert log.history[-1]["step"] == 4 and log.history[-1]["skipped_steps"] == 2
  for step in (5, 6):
    log.add(step, _metrics(True))
  log.flush()  # 2 in a row: still under the limit
  log.add(7, _metrics(True))
  with pytest.raises(main.NonFiniteError) as error:
    log.flush()
  assert isinstance(error.value, UserError)
  assert str(error.value).startswith(
      "bc step 7: steps 5 to 7 were all skipped as non-finite (nonfinite.max_consecutive_skips=3); "
      "the checkpoints hold the state before step 5. Lower bc.learning_rate")


def test_skipped_fraction_limit_and_nonfinite_learning_rate():
  log = _log(max_skipped_fraction=0.1, total_steps=20)
  log.skipped_steps = 2
  log.check_skipped_fraction()  # 2 of 20 is not more than 10%
  log.skipped_steps = 3
  with pytest.raises(main.NonFiniteError, match=r"^bc: 3 of its 20 steps were skipped as non-finite, "
                     r"more than nonfinite\.max_skipped_fraction=0\.1; the phase is not marked DONE"):
    log.check_skipped_fraction()
  log = _log(schedule=lambda s: np.where(np.asarray(s) >= 2, np.inf, 1e-3))
  log.add(2, _metrics())
  log.flush()
  log.add(3, _metrics())
  with pytest.raises(main.NonFiniteError,
                     match=r"^bc step 3: the learning rate is inf; .*bc\.learning_rate"):
    log.flush()


def test_metrics_log_resumes_from_its_snapshot():
  log = _log()
  for step in range(1, 9):
    log.add(step, _metrics(skipped=step == 3, loss=float(step)))
    if step % 2 == 0:
      log.flush()
  log.add_values(8, {"value_corr": 0.5})
  snapshot = log.snapshot()
  assert [h["step"] for h in snapshot["history"]] == [2, 4, 6, 8]
  assert snapshot["skipped_steps"] == 1 and snapshot["history"][-1]["value_corr"] == 0.5
  log.history[-1]["loss"] = -1.0  # the snapshot is a copy
  assert snapshot["history"][-1]["loss"] == 8.0
  resumed = _log(start_step=6, restored=json.loads(json.dumps(snapshot)))
  assert [h["step"] for h in resumed.history] == [2, 4, 6]  # trimmed to the restored step
  assert resumed.history == snapshot["history"][:3] and resumed.skipped_steps == 1
  resumed.add(7, _metrics(loss=7.0))
  resumed.add(8, _metrics(loss=8.0))
  resumed.flush(record=False)  # a SIGTERM save at a step that is not a log step: no entry
  assert [h["step"] for h in resumed.history] == [2, 4, 6]


def test_latest_params_reader_refuses_a_tree_the_checkpoint_does_not_hold(tmp_path):
  # e.g. a LoRA run's adapters asked of a full fine-tuning checkpoint: orbax's partial restore would
  # hand back the missing leaf as its ShapeDtypeStruct instead of an array
  _save_steps(str(tmp_path))
  abstract = _abstract()["params"]
  abstract = {**abstract, "v": abstract["b"]}
  for read in (lambda: checkpoints.restore_latest_params(str(tmp_path), "bc", ("params",), abstract),
               lambda: checkpoints.restore_params_at(str(tmp_path), "bc", 4, ("params",), abstract)):
    with pytest.raises(checkpoints.CheckpointError, match=r"^bc: the checkpoint of step \d in .* holds no "
                       r"params/v \(of 3 arrays asked for, 1 missing\)"):
      read()
