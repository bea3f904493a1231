"""Every config file in configs/ loads and passes the pre-compile checks on the device count it is for."""
import glob
import math
import os

import pytest

from qsft_jax import config_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def _chips(path):
  """CPU configs run on this machine's 8 simulated devices; pod configs on their AOT topology."""
  source = open(path).read()
  if "AOT_TOPOLOGY" not in source:
    return 8
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  dims = module.AOT_TOPOLOGY.split(":")[1].split("x")
  return math.prod(int(d) for d in dims) * getattr(module, "AOT_NUM_SLICES", 1)


def test_the_cpu_and_pod_configs_exist():
  names = {os.path.basename(f) for f in FILES}
  assert {"tiny.py", "maze_cpu.py", "maze_trap_cpu.py", "wordle_cpu.py", "wordle_trap_cpu.py",
          "twenty_questions_cpu.py"} <= names
  assert any(n.startswith("pod_") for n in names)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_config_file_passes_check_config(path):
  config = config_lib.load_config_file(path)
  doc = open(path).read().split('"""')[1]
  assert "python -m qsft_jax" in doc, "each config's docstring says how to run it"
  mesh = config_lib.check_config(config, _chips(path))
  assert math.prod(mesh.values()) == _chips(path)


@pytest.mark.parametrize("name", ["maze_cpu.py", "maze_trap_cpu.py", "wordle_cpu.py", "wordle_trap_cpu.py",
                                  "twenty_questions_cpu.py"])
def test_cpu_task_configs_default_and_paper_settings(name):
  path = os.path.join(config_lib.__file__.rsplit("/qsft_jax/", 1)[0], "configs", name)
  default, paper = config_lib.load_config_file(path), config_lib.load_config_file(path, "paper")
  for c in (default, paper):
    assert tuple(c.phases) == ("bc", "qsft", "control")  # every Q-SFT run has its control
    assert c.log.value_diagnostics_every > 0
    config_lib.check_config(c, 1)
  q = default.qsft
  assert (q.targets_mode, q.target_update_every, q.mc_mix, q.support_min) == ("turn", 25, 0.5, 0.01)
  assert q.dummy_token == 3 and default.data.gamma == 0.7
  p = paper.qsft
  assert (p.targets_mode, p.target_update_every, p.tau, p.mc_mix, p.n_step, p.dummy_token, p.support_min,
          p.theta_init) == ("token", 0, 0.005, 0.0, 1, -1, 0.0, "phi_init")
  # everything but the phase-2 settings is the same
  assert {k: v for k, v in default.to_dict().items() if k != "qsft"} == {
      k: v for k, v in paper.to_dict().items() if k != "qsft"}
  with pytest.raises(config_lib.ConfigError, match="'papr' is not one of"):
    config_lib.load_config_file(path, "papr")


def test_twenty_questions_smollm2_and_its_char_setting_share_game_and_data():
  path = os.path.join(CONFIG_DIR, "twenty_questions_smollm2.py")
  pretrained, char = config_lib.load_config_file(path), config_lib.load_config_file(path, "char")
  p, c = pretrained.to_dict(), char.to_dict()
  for field in ("task", "env", "dataset", "seed"):
    assert p[field] == c[field], field
  for field in ("reward_transform", "gamma", "gamma_token"):
    assert pretrained.data[field] == char.data[field], field
  assert (pretrained.model.init, pretrained.tokenizer, pretrained.data.format) == ("smollm2", "smollm2", "chat")
  assert pretrained.model.lora.rank > 0
  assert pretrained.qsft.dummy_token == -1  # the char tokenizer's unk id is a real SmolLM2 token
  assert (char.model.init, char.tokenizer, char.data.format) == ("random", "char", "plain")
  assert tuple(pretrained.phases) == tuple(char.phases) == ("bc", "qsft", "control")
  config_lib.check_config(char, 8)
  with pytest.raises(config_lib.ConfigError, match="'chr' is not one of"):
    config_lib.load_config_file(path, "chr")
