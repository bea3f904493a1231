"""scripts/combine_seeds.py: mean and standard error across seeds, held against numpy."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import combine_seeds  # noqa: E402


def fake_result(q: float, c: float, bc: float, corr: float) -> dict:
  def theta(ret, beta, corr):
    return {"best_beta": beta, "extract": {"mean_return": ret}, "ratio": {"mean_return": ret - 1},
            "diagnostics": {"first_turn_correlation": corr, "correlation": corr / 2}}
  return {"bc": {"mean_return": bc}, "dataset_mean_return": -5.0,
          "control": theta(c, 4.0, 0.0), "Q-SFT": theta(q, 64.0, corr)}


def test_mean_and_standard_error_across_seeds_match_numpy():
  q = [-2.0, -3.5, -2.25]
  results = [fake_result(v, -6.0 + i, -7.0, 0.5 + 0.1 * i) for i, v in enumerate(q)]
  rows = {r["label"]: r for r in combine_seeds.combine(results)}
  assert rows["Q-SFT"]["mean"] == pytest.approx(np.mean(q))
  assert rows["Q-SFT"]["se"] == pytest.approx(np.std(q, ddof=1) / np.sqrt(3))
  assert rows["Q-SFT"]["betas"] == [64.0] * 3
  assert rows["Q-SFT"]["turn0"][0] == pytest.approx(0.6)
  assert rows["Q-SFT"]["all_turns"][0] == pytest.approx(0.3)
  assert rows["control"]["mean"] == pytest.approx(-5.0)
  assert rows["Q-SFT, greedy p_theta/pi_phi"]["mean"] == pytest.approx(np.mean(q) - 1)
  assert rows["dataset"]["se"] == 0.0


def test_command_writes_the_table_and_refuses_a_bad_file(tmp_path):
  paths = []
  for i, v in enumerate([-2.0, -3.0]):
    p = tmp_path / f"s{i}.json"
    p.write_text(json.dumps(fake_result(v, -6.0, -7.0, 0.5)))
    paths.append(str(p))
  out = tmp_path / "t.md"
  script = os.path.join(ROOT, "scripts", "combine_seeds.py")
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  done = subprocess.run([sys.executable, script, "--name", "T", f"--out={out}", *paths],
                        capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr
  assert "| Q-SFT | -2.50 +- 0.50 | [-2.00, -3.00] | 64, 64 | 0.25 +- 0.00 | 0.50 +- 0.00 |" in out.read_text()
  bad = tmp_path / "bad.json"
  bad.write_text("{\n oops")
  done = subprocess.run([sys.executable, script, "--name", "T", f"--out={out}", str(bad)],
                        capture_output=True, text=True, env=env)
  assert done.returncode == 1 and "bad.json: line 2" in done.stderr and "Traceback" not in done.stderr
