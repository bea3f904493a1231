"""scripts/results.py --column / --assemble: every row of a column trained and evaluated end to end on a
tiny config, the one table written between its markers, a second run that recomputes nothing, and the
table's statistics against numpy."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from trainer_utils import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import results  # noqa: E402

# configs/tiny.py with the CPU settings (and their :paper setting), one layer, 3-move mazes, 4 steps a phase.
CONFIG = """
from qsft_jax import config_lib


def get_config(setting: str = ""):
  c = config_lib.load_config_file({tiny!r})
  config_lib.cpu_value_learning(c, setting)
  c.env.max_steps = 3
  c.dataset.num_episodes, c.dataset.heldout_episodes = 32, 8
  c.bc.steps = c.qsft.steps = 4
  c.checkpoint.every_steps = 4
  c.log.tensorboard = False
  c.model.overrides.num_layers = 1
  c.eval.batch_size = 4
  return c
"""


def test_column_runs_every_row_writes_the_table_and_a_rerun_recomputes_nothing(tmp_path, monkeypatch):
  config = tmp_path / "tiny_column.py"
  config.write_text(CONFIG.format(tiny=os.path.join(ROOT, "configs", "tiny.py")))
  doc = tmp_path / "results.md"
  doc.write_text("# Results\n\nThe text below the table.\n")
  out, root = tmp_path / "out", tmp_path / "root"
  argv = ["scripts/results.py", "--column=maze_trap", f"--config_file={config}", "--seeds=0", f"--root={root}",
          f"--out={out}", "--episodes=4", "--select_episodes=4", "--betas=4"]
  done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=subprocess_env(device_count=1),
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  data = json.loads((out / "table_maze_trap.json").read_text())
  column_rows = [k for k in results.ROW_ORDER if k not in results.OPTIONAL_ROWS]  # maze_trap adds none
  assert list(data["rows"]) == column_rows
  seed = data["per_seed"]["0"]
  for m in results.column_methods(results.COLUMNS["maze_trap"]):
    assert seed[m.key]["settings"]["episodes"] == 4
    assert (seed[m.key]["beta"] == 4.0) == m.beta
    assert (seed[m.key]["diagnostics"] is not None) == m.values
  assert data["exact"]["optimal"] >= data["exact"]["greedy_q_beta"]
  seed_dir = root / "maze_trap" / "seed0"
  timings = json.loads((seed_dir / "timings.json").read_text())
  trained = {"main": ("bc", "filtered_bc", "mc", "ilql", "qsft", "control"), "qsft_paper": ("qsft",),
             "qsft_mc1": ("qsft",)}
  assert set(timings) == {f"train/{w}/{p}" for w, ps in trained.items() for p in ps} | {
      f"eval/{k}" for k in column_rows if k != "dataset"}
  configs = {w: json.loads((seed_dir / w / "config.json").read_text()) for w in trained}
  paper = configs["qsft_paper"]["qsft"]
  assert (paper["mc_mix"], paper["theta_init"], paper["targets_mode"]) == (0.0, "phi_init", "token")
  assert (configs["qsft_mc1"]["qsft"]["mc_mix"], configs["main"]["qsft"]["mc_mix"]) == (1.0, 0.5)
  assert [configs["main"][p]["steps"] for p in ("filtered_bc", "mc", "ilql")] == [4, 4, 4]
  assert not (seed_dir / "qsft_paper" / "filtered_bc").exists()

  # The second run: nothing trains, loads or is evaluated; the table is rewritten from the caches.
  def refuse(*args, **kwargs):
    raise AssertionError("recomputed")
  from qsft_jax import main as trainer
  monkeypatch.setattr(trainer, "run", refuse)
  monkeypatch.setattr(results.run_lib, "load", refuse)
  monkeypatch.setattr(results.evaluate, "run", refuse)
  monkeypatch.setattr(results, "persistent_compilation_cache", lambda root: None)
  assert results.main(argv) == 0
  assert json.loads((seed_dir / "timings.json").read_text()) == timings
  assert json.loads((out / "table_maze_trap.json").read_text())["per_seed"] == data["per_seed"]
  for _ in range(2):  # the one table opens the document, and a rerun replaces it
    assert results.main(["results.py", "--assemble", f"--out={out}", f"--results_md={doc}"]) == 0
  text = doc.read_text()
  assert text.startswith("# Results\n\n" + results.BEGIN) and text.count(results.BEGIN) == 1
  assert text.rstrip().endswith("The text below the table.")
  for key in column_rows:
    assert f"| {results.ROW_LABELS[key]} | " in text
  assert "Q-SFT, CPU setting - ILQL = " in text


def fake_column(name: str, returns: dict[str, list[float]]) -> dict:
  """A column's JSON with per-seed returns by row key (every row gets beta 16 where it has one)."""
  seeds = len(next(iter(returns.values())))
  per_seed = {str(s): {k: {"result": {"mean_return": v[s]}, "beta": None if k in ("dataset", "bc", "filtered_bc")
                           else 16.0} for k, v in returns.items()} for s in range(seeds)}
  return {"column": name, "title": name, "exact": None, "command": f"cmd {name}",
          "rows": results.summarize_rows({s: per_seed[str(s)] for s in range(seeds)}), "per_seed": per_seed}


def test_rows_and_paired_comparisons_match_numpy():
  rng = np.random.default_rng(0)
  returns = {k: list(rng.normal(size=3)) for k in results.ROW_ORDER}  # the stitching task has every row
  returns["qsft"] = [r + 10.0 for r in returns["ilql"]]  # beats ILQL on every seed
  returns["qsft_paper"] = [returns["ilql"][0] + 1.0, returns["ilql"][1] - 1.0, returns["ilql"][2] + 0.5]
  data = fake_column("maze_stitch", returns)
  for k in results.ROW_ORDER:
    assert data["rows"][k]["mean"] == pytest.approx(np.mean(returns[k]))
    assert data["rows"][k]["se"] == pytest.approx(np.std(returns[k], ddof=1) / math.sqrt(3))
  d = np.subtract(returns["qsft_paper"], returns["ilql"])
  assert results.paired(data, "qsft_paper", "ilql") == pytest.approx((d.mean(), d.std(ddof=1) / math.sqrt(3)))
  lines = results.statements([data])
  assert any(l.startswith("- maze_stitch: Q-SFT, CPU setting - ILQL = 10.00 +- 0.00") and
             l.endswith("**more than two standard errors**") for l in lines)
  assert any(f"Q-SFT, paper setting - ILQL = {d.mean():.2f} +- {d.std(ddof=1) / math.sqrt(3):.2f}" in l and
             l.endswith("not more than two standard errors") for l in lines)
  # The stitching task's comparisons: the paper setting, mc_mix 0 and 0.25, and the CPU setting.
  assert sum("- Q-SFT, " in l and " - MC = " in l for l in lines) == 4


def test_a_row_only_one_column_has_is_a_dash_in_the_others():
  rng = np.random.default_rng(1)
  stitch = fake_column("maze_stitch", {k: list(rng.normal(size=2)) for k in results.ROW_ORDER})
  trap = fake_column("maze_trap", {k: list(rng.normal(size=2)) for k in results.ROW_ORDER
                                   if k not in results.OPTIONAL_ROWS})
  text = results.assembled_markdown([trap, stitch], "out")
  row = next(l for l in text.splitlines() if l.startswith("| Q-SFT, mc_mix 0 | "))
  assert row.split(" | ")[1] == "-" and row.split(" | ")[2] != "-"
  assert sum("Q-SFT, mc_mix 0 - " in l for l in results.statements([trap, stitch])) == 3  # stitching only
