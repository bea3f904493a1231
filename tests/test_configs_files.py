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
  assert {"tiny.py", "maze_cpu.py", "maze_trap_cpu.py", "wordle_cpu.py"} <= names
  assert any(n.startswith("pod_") for n in names)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_config_file_passes_check_config(path):
  config = config_lib.load_config_file(path)
  doc = open(path).read().split('"""')[1]
  assert "python -m qsft_jax" in doc, "each config's docstring says how to run it"
  mesh = config_lib.check_config(config, _chips(path))
  assert math.prod(mesh.values()) == _chips(path)
