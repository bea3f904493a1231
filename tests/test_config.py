"""Config checks (qsft_jax.config_lib.check_config), command-line overrides, and the launch scripts."""
import os
import subprocess
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags
import pytest

from qsft_jax import config_lib
from qsft_jax.config_lib import ConfigError, check_config

import trainer_utils as tu

REPO = tu.REPO


def tiny():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", tu.TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def rejects(config, pattern, device_count=8, process_count=1):
  with pytest.raises(ConfigError, match=pattern):
    check_config(config, device_count, process_count)


def test_shipped_configs_pass_and_resolve_the_mesh():
  assert check_config(tiny(), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  c = tiny()
  c.mesh.shape = {"data": -1, "fsdp": 2, "tensor": 1}
  assert check_config(c, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert check_config(config_lib.base_config(), 1) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_unknown_top_level_field():
  c = tiny()
  c.learning_rate = 1e-3  # belongs in bc / qsft
  rejects(c, r"^config\.learning_rate: unknown field; known top-level fields: .*bc")


@pytest.mark.parametrize("section,field", [("bc", "stepz"), ("qsft", "taux"), ("mesh", "axes"),
                                           ("checkpoint", "every"), ("eval", "betaz"),
                                           ("dataset", "episodes"), ("log", "every")])
def test_unknown_section_field(section, field):
  c = tiny()
  c[section][field] = 1
  rejects(c, rf"^config\.{section}\.{field}: unknown field; known: ")


def test_unknown_data_field_is_rejected_by_data_config():
  from qsft_jax.data import DataConfig
  c = tiny()
  c.data.max_len = 64
  check_config(c, 8)  # data fields are DataConfig's to check
  with pytest.raises(ValueError, match=r"unknown fields \['max_len'\]"):
    DataConfig.from_config(c.data.to_dict())


@pytest.mark.parametrize("shape,devices,pattern", [
    ({"data": 4, "fsdp": 1, "tensor": 1}, 8, r"has 4 devices but 8 are available"),
    ({"data": 2, "fsdp": 2, "tensor": 4}, 8, r"has 16 devices but 8 are available"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, 8, r"cannot fill 8 devices \(3 does not divide it\)"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, 8, r"at most one axis may be -1"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, 8, r"sizes must be positive or -1"),
    ({"data": 8, "fsdp": 1}, 8, r"needs exactly the axes data, fsdp, tensor"),
    ({"data": 8, "fsdp": 1, "tensor": 1, "pipe": 1}, 8, r"needs exactly the axes data, fsdp, tensor"),
])
def test_mesh_must_match_the_devices(shape, devices, pattern):
  c = tiny()
  c.mesh.shape = ml_collections.ConfigDict(shape)
  rejects(c, r"^config\.mesh\.shape: .*" + pattern, device_count=devices)


def test_mesh_shape_with_an_extra_axis_is_also_an_unknown_field():
  c = tiny()
  c.mesh.shape.pipe = 1
  rejects(c, r"^config\.mesh\.shape: needs exactly the axes")


def test_task_and_phases():
  c = tiny()
  c.task = "go"
  rejects(c, r"^config\.task: 'go' is not a bundled task")
  for phases, pattern in [((), "non-empty"), (("bc", "ppo"), "non-empty ordered subset"),
                          (("bc", "bc"), "non-empty ordered subset")]:
    c = tiny()
    c.phases = phases
    rejects(c, r"^config\.phases: must be a " + pattern)


def test_qsft_without_bc():
  c = tiny()
  c.phases = ("qsft",)
  rejects(c, r"^config\.phases: the qsft phase needs phi from the bc phase: put 'bc' first")
  c.phases = ("qsft", "bc")
  rejects(c, r"^config\.phases: the qsft phase needs phi from the bc phase")
  c.phases = ("control",)
  rejects(c, r"^config\.phases: the control phase needs phi from the bc phase")
  c.phases = ("bc", "qsft", "control")
  config_lib.check_config(c, 8)
  c.qsft.tau, c.qsft.target_update_every = 0.0, 0  # the control's phase-2 settings are checked too
  c.phases = ("bc", "control")
  rejects(c, r"^config\.qsft\.tau: is 0 and target_update_every is 0")


def test_no_data_source():
  c = tiny()
  c.task = ""
  rejects(c, r"^config\.data\.path: is empty and no bundled task generates data")
  c = tiny()
  c.dataset.generate = False
  rejects(c, r"^config\.data\.path: is empty")
  c.data.path = "/some/file.jsonl"
  check_config(c, 8)


@pytest.mark.parametrize("phase", ["bc", "qsft"])
def test_optimisation_fields(phase):
  c = tiny()
  c[phase].steps = 0
  rejects(c, rf"^config\.{phase}\.steps: must be >= 1; got 0")
  c = tiny()
  c[phase].learning_rate = 0.0
  rejects(c, rf"^config\.{phase}\.learning_rate: must be > 0")
  c = tiny()
  c[phase].microbatches = 3
  rejects(c, rf"^config\.{phase}\.microbatches: 3 must be >= 1 and divide {phase}\.batch_size=8")
  c = tiny()
  c[phase].microbatches = 0
  rejects(c, rf"^config\.{phase}\.microbatches: 0 must be >= 1")


def test_batch_must_divide_across_the_mesh_and_microbatches():
  c = tiny()
  c.bc.batch_size = 12
  rejects(c, r"^config\.bc\.batch_size: 12 rows \(12 per microbatch\) do not divide across the mesh's "
          r"data x fsdp = 8 devices")
  c = tiny()
  c.qsft.batch_size = 16
  c.qsft.microbatches = 4  # 4 rows per microbatch over 8 devices
  rejects(c, r"^config\.qsft\.batch_size: 16 rows \(4 per microbatch\) do not divide")
  c = tiny()
  c.mesh.shape = {"data": 2, "fsdp": 1, "tensor": 4}  # tensor does not split the batch
  c.bc.batch_size = c.qsft.batch_size = 6
  check_config(c, 8)
  c.bc.batch_size = 5
  rejects(c, r"^config\.bc\.batch_size: 5 rows .* data x fsdp = 2 devices")


def test_batch_must_divide_across_data_shards_and_processes():
  c = tiny()
  c.data_shards = 3
  rejects(c, r"^config\.data_shards: 3 is not a multiple of the 2 processes", process_count=2)
  c = tiny()
  c.mesh.shape = {"data": 2, "fsdp": 1, "tensor": 4}
  c.bc.batch_size = c.qsft.batch_size = 6
  c.data_shards = 4
  rejects(c, r"^config\.bc\.batch_size: 6 rows do not divide across 4 data shards")
  c.data_shards = 0  # one shard per process: 4 processes
  rejects(c, r"^config\.bc\.batch_size: 6 rows do not divide across 4 data shards", process_count=4)
  c = tiny()
  c.bc.batch_size = 16
  c.bc.microbatches = 2  # 8 rows per microbatch, 16 shards
  c.data_shards = 16
  rejects(c, r"^config\.bc\.batch_size: 16 rows do not divide across 16 data shards")


def test_target_network_settings():
  c = tiny()
  c.qsft.tau = 0.0
  rejects(c, r"^config\.qsft\.tau: is 0 and target_update_every is 0: the target network would never move")
  c.qsft.target_update_every = 10
  check_config(c, 8)
  c = tiny()
  c.qsft.tau = 1.5
  rejects(c, r"^config\.qsft\.tau: must be in \[0, 1\]; got 1\.5")
  c = tiny()
  c.qsft.target_update_every = -1
  rejects(c, r"^config\.qsft\.target_update_every: must be >= 0; got -1")
  c = tiny()
  c.qsft.support_min = 1.0
  rejects(c, r"^config\.qsft\.support_min: must be in \[0, 1\); got 1\.0")
  c = tiny()
  c.qsft.mc_mix = 1.5
  rejects(c, r"^config\.qsft\.mc_mix: must be in \[0, 1\]; got 1\.5")
  c = tiny()
  c.qsft.n_step = 0
  rejects(c, r"^config\.qsft\.n_step: must be >= 1; got 0")
  c = tiny()
  c.phases = ("bc",)  # phase-2 settings are not checked when there is no phase 2
  c.qsft.tau = 0.0
  check_config(c, 8)


def test_targets_mode_and_theta_init():
  c = tiny()
  c.qsft.targets_mode = "monte_carlo"
  rejects(c, r"^config\.qsft\.targets_mode: 'monte_carlo' is not one of \('token', 'turn', 'ones'\)")
  c = tiny()
  c.qsft.theta_init = "bc"
  rejects(c, r"^config\.qsft\.theta_init: 'bc' is not one of \('pretrained', 'phi', 'phi_init', 'fresh'\)")
  c = tiny()
  c.qsft.theta_init = "pretrained"
  rejects(c, r"^config\.qsft\.theta_init: is 'pretrained' but model\.init is 'random'")
  c.model.init = "smollm2"
  check_config(c, 8)
  for init in ("random", "smollm2"):  # phi's own starting point exists for either model.init
    c = tiny()
    c.qsft.theta_init, c.model.init = "phi_init", init
    check_config(c, 8)


def test_theta_init_phi_init_is_the_model_phi_started_from():
  """main.initial_params: with "phi_init" theta starts from exactly the parameters the BC phase
  started from (the same random draw, or the pretrained weights), with "fresh" from another draw."""
  import jax
  import numpy as np
  from qsft_jax.main import initial_params

  draws = []

  def fresh_params(offset):
    draws.append(offset)
    return {"w": np.asarray(jax.random.normal(jax.random.key(7 + offset), (3, 4)))}

  phi = {"w": np.full((3, 4), 5.0)}
  same = lambda a, b: np.array_equal(a["w"], b["w"])
  for pretrained in (None, {"w": np.arange(12.0).reshape(3, 4)}):
    start = initial_params("bc", "phi_init", pretrained, fresh_params, lambda: phi)
    theta, behaviour = initial_params("qsft", "phi_init", pretrained, fresh_params, lambda: phi)
    assert same(theta, start) and behaviour is phi and not same(theta, phi)
    theta, _ = initial_params("control", "phi", pretrained, fresh_params, lambda: phi)
    assert theta is phi
  theta, _ = initial_params("qsft", "fresh", None, fresh_params, lambda: phi)
  assert not same(theta, initial_params("bc", "fresh", None, fresh_params, lambda: phi))
  assert draws == [0, 0, 1, 0]


def test_other_fields():
  c = tiny()
  c.on_nonfinite = "ignore"
  rejects(c, r"^config\.on_nonfinite: must be 'stop' or 'skip'; got 'ignore'")
  for field in ("every_steps", "keep"):
    c = tiny()
    c.checkpoint[field] = 0
    rejects(c, r"^config\.checkpoint\.every_steps: every_steps and keep must be >= 1")
  c = tiny()
  c.loss.chunk_size = 0
  rejects(c, r"^config\.loss\.chunk_size: must be >= 1; got 0")


# ------------------------------------------------------------------------------------------------
# The command line


def parse(*overrides):
  argv = ["prog", f"--config={tu.TINY}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True,
                                  sys_argv=argv)  # as main.py's, on a private FlagValues
  fv(argv)
  return fv.config


def test_command_line_overrides_reach_the_locked_config():
  c = parse("--config.bc.steps=3", "--config.qsft.tau=0.01", "--config.mesh.shape.fsdp=2",
            "--config.eval.enabled=False", "--config.qsft.targets_mode=turn")
  assert (c.bc.steps, c.qsft.tau, c.mesh.shape.fsdp, c.eval.enabled) == (3, 0.01, 2, False)
  assert c.qsft.targets_mode == "turn"
  assert check_config(c, 8)["data"] == 4
  with pytest.raises(AttributeError, match="locked"):
    c.bc.stepz = 3  # a locked config takes no new fields
  with pytest.raises(AttributeError, match='Did you mean "steps"'):
    parse("--config.bc.stepz=3")


@pytest.mark.slow
def test_command_line_typo_and_bad_config_fail_clearly(tmp_path):
  workdir = str(tmp_path / "w")
  result = subprocess.run(tu.main_command(workdir, "--config.bc.stepz=3"), cwd=REPO, env=tu.subprocess_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "FATAL: python -m qsft_jax.main: bad --config override (--config.bc.stepz=3): the config has no field 'stepz'; "
      "did you mean 'steps'?"), result.stderr[-2000:]
  assert not os.path.exists(workdir)
  # a well-formed override that check_config rejects: stops before anything is written or compiled
  result = subprocess.run(tu.main_command(workdir, "--config.qsft.tau=0.0"), cwd=REPO,
                          env=tu.subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "ConfigError: config.qsft.tau: is 0 and target_update_every is 0" in result.stderr, \
      result.stderr[-2000:]
  assert not os.path.exists(os.path.join(workdir, "config.json"))


# ------------------------------------------------------------------------------------------------
# Launch scripts

LAUNCH = ["launch/local.sh", "launch/tpu_pod.sh", "launch/gpu_hosts.sh"]


@pytest.mark.parametrize("script", LAUNCH)
def test_launch_script_parses_and_prints_usage(script):
  path = os.path.join(REPO, script)
  assert os.access(path, os.X_OK), f"{script} is not executable"
  subprocess.run(["bash", "-n", path], check=True)
  result = subprocess.run(["bash", path, "-h"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr
  assert "usage" in result.stdout.lower() and "qsft_jax.main" in result.stdout
  result = subprocess.run(["bash", path], capture_output=True, text=True, timeout=30)
  assert result.returncode != 0  # no arguments: usage on stderr, nothing launched
  assert "usage" in result.stderr.lower()


def test_launch_scripts_dry_run_print_the_commands():
  run = lambda *a: subprocess.run(["bash", *a], capture_output=True, text=True, timeout=30,
                                  cwd=REPO, env={**os.environ, "DRY_RUN": "1"})
  out = run("launch/tpu_pod.sh", "-n", "my-tpu", "-z", "us-central2-b", "-c", "configs/tiny.py",
            "-w", "/gcs/bucket/run", "-u", "--", "--config.bc.steps=5")
  assert out.returncode == 0, out.stderr
  assert "gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all" in out.stdout
  assert "QSFT_DISTRIBUTED=1" in out.stdout and "scripts/setup.sh" in out.stdout
  assert "--workdir=/gcs/bucket/run" in out.stdout and "--config.bc.steps=5" in out.stdout
  assert "jax[tpu]==" in out.stdout
  out = run("launch/tpu_pod.sh", "-n", "t", "-z", "z", "-c", "configs/tiny.py", "-w", "gs://bucket/run")
  assert out.returncode == 2 and "gs:// workdirs are not supported" in out.stderr
  out = run("launch/gpu_hosts.sh", "-H", "gpu1,gpu2", "-c", "configs/tiny.py", "-w", "/shared/run")
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "ssh gpu1" in text and "ssh gpu2" in text
  assert "--config.distributed.coordinator_address=gpu1:" in text
  assert "--config.distributed.process_id=0" in text and "--config.distributed.process_id=1" in text
  assert "--config.distributed.num_processes=2" in text
  out = run("launch/local.sh", "-c", "configs/tiny.py", "-w", "/tmp/qsft_local", "-p", "2")
  assert out.returncode == 0, out.stderr
  assert out.stdout.count("-m qsft_jax.main") == 2 and "QSFT_CPU_COLLECTIVES=gloo" in out.stdout
