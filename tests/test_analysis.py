"""Checkpoint analysis on a tiny workdir built here (config, tokenizer, bc/ and qsft/ checkpoints)."""
import functools
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsft_jax import analysis, checkpoints, config_lib, losses
from qsft_jax import run as run_lib
from qsft_jax.data import DataConfig, episodes_to_batch
from qsft_jax.envs import generate_episodes, make_env
from qsft_jax.models import Transformer
from qsft_jax.tokenizers import CharTokenizer

ALPHABET = "".join(sorted(set("Maze. Reach G. Moves: u d l r.\n#,0123456789")))
NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "analyze_checkpoint.ipynb")


@functools.partial(jax.jit, static_argnums=0)
def init_params(model_config, rng):
  """Random parameters of `model_config` (compiled once per config, for every workdir made here)."""
  d = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(Transformer(model_config).init(rng, d, d, d + 1))


def make_workdir(path: str, *, steps: int = 1, done: bool = True, max_length: int = 160,
                 max_steps: int | None = 4) -> dict:
  """A workdir as the trainer lays it out (qsft_jax/run.py docstring), with random phi and theta: a
  checkpoint of step 1 in bc/ and qsft/, `steps` configured for each, both marked DONE (finished)
  unless `done` is False; a maze of `max_steps` moves (None: the environment's default, 20) and three
  held-out episodes of it, data.max_length `max_length`."""
  config = config_lib.base_config()
  config.bc.steps = config.qsft.steps = steps
  config.task = "maze"
  config.env = {} if max_steps is None else {"max_steps": max_steps}
  config.data.max_length = max_length
  worst, _ = make_env("maze", **config.env).return_bounds
  config.data.reward_transform = f"terminal_return:{worst:g},0"
  config.model.overrides = {"d_model": 32, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "mlp_dim": 64}
  config.checkpoint.async_save = False
  os.makedirs(os.path.join(path, "data"), exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  tokenizer = CharTokenizer(ALPHABET)
  tokenizer.save(os.path.join(path, "tokenizer.json"))
  model_config = run_lib.model_config_from(config, tokenizer)
  run_lib.save_model_config(path, model_config)
  phi, theta = init_params(model_config, jax.random.key(0)), init_params(model_config, jax.random.key(1))
  for phase, state in [("bc", {"step": 1, "params": phi}),
                       ("qsft", {"step": 1, "params": theta, "target_params": theta, "behaviour_params": phi})]:
    manager = checkpoints.make_manager(path, phase, config)
    checkpoints.save(manager, 1, state)
    manager.wait_until_finished()
    manager.close()
    if done:
      checkpoints.mark_done(path, phase, 1)
  with open(os.path.join(path, "data", "heldout.jsonl"), "w") as f:
    for ep in generate_episodes("maze", 3, seed=5, **config.env):
      f.write(json.dumps(ep) + "\n")
  return dict(config=config, tokenizer=tokenizer, model_config=model_config, phi=phi, theta=theta)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run"))
  return path, make_workdir(path)


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """configs/tiny.py's episode and row lengths (data.max_length 128, the maze's own 20 moves): an
  untrained policy's history outgrows the training rows long before its episode ends."""
  path = str(tmp_path_factory.mktemp("tiny_run"))
  return path, make_workdir(path, max_length=128, max_steps=None)


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_phis_step_is_phase_ones_not_phase_twos(workdir, tmp_path):
  """phi comes from the Q-SFT checkpoint's frozen copy; its step is still BC's last checkpoint."""
  path, _ = workdir
  copy = str(tmp_path / "run")
  shutil.copytree(path, copy)
  os.rename(os.path.join(copy, "bc", "checkpoints", "1"), os.path.join(copy, "bc", "checkpoints", "5"))
  run = run_lib.load(copy)
  assert (run.behaviour_step, run.theta_step) == (5, 1)


def test_load_reads_every_parameter_set_and_the_runs_files(workdir):
  path, made = workdir
  run = run_lib.load(path)
  assert run.workdir == os.path.abspath(path) and run.config.task == "maze"
  assert run.model_config == made["model_config"]
  assert run.tokenizer.alphabet == made["tokenizer"].alphabet
  assert run.data_config.max_length == 160
  assert run.targets == losses.TargetConfig()  # base_config's qsft.* defaults
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), b)
  same(run.behaviour_params, made["phi"])  # phi from the qsft checkpoint's behaviour_params
  same(run.theta_params, made["theta"])
  same(run.target_params, made["theta"])
  assert (run.behaviour_step, run.theta_step, run.target_step) == (1, 1, 1)
  assert run.control_params is None and run.control_step is None
  swapped = run.with_theta(made["phi"])
  assert swapped.theta_params is made["phi"] and swapped.target_params is None
  assert swapped.behaviour_params is run.behaviour_params


def test_load_logs_no_warning_and_writes_nothing(workdir, caplog):
  """Orbax's CheckpointManager with read_only=True logs three warnings on every open; `load` reads
  without one, and leaves the workdir's files as they were."""
  path, _ = workdir

  def listing():
    return sorted((os.path.relpath(os.path.join(d, n), path), os.path.getmtime(os.path.join(d, n)))
                  for d, dirs, files in os.walk(path) for n in dirs + files)
  before = listing()
  with caplog.at_level(logging.INFO):
    run_lib.load(path)
  warnings = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
  assert warnings == []
  assert listing() == before


def test_load_before_phase_two_and_without_checkpoints(tmp_path):
  config = config_lib.base_config()
  config.checkpoint.async_save = False
  config.model.overrides = {"d_model": 16, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "mlp_dim": 32}
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    run_lib.load(str(tmp_path))
  tokenizer = CharTokenizer(ALPHABET)
  model_config = run_lib.model_config_from(config, tokenizer)
  run_lib.save_model_config(str(tmp_path), model_config)
  with pytest.raises(FileNotFoundError, match="no checkpoint in bc/ or qsft/"):
    run_lib.load(str(tmp_path))
  d = np.zeros((1, 1), np.int32)
  phi = jax.jit(lambda r: nn.unbox(Transformer(model_config).init(r, d, d, d + 1)))(jax.random.key(2))
  for step in (1, 2):
    manager = checkpoints.make_manager(str(tmp_path), "bc", config)
    checkpoints.save(manager, step, {"step": step, "params": phi})
    manager.wait_until_finished()
    manager.close()
  run = run_lib.load(str(tmp_path))
  assert run.behaviour_step == 2 and run.theta_params is None and run.theta_step is None
  a = analysis.from_loaded(run)
  assert a.theta_params is None and a.targets == run.targets


def test_token_values_against_a_full_forward(workdir):
  path, made = workdir
  run = analysis.load(path)
  assert run.env_name == "maze" and run.theta_params is not None
  episode = next(generate_episodes("maze", 1, seed=11, max_steps=4))
  values = run.token_values(episode)
  # The listed tokens are exactly the action turns' text, in order.
  assert "".join(v["text"] for v in values) == "".join(t["text"] for t in episode["turns"] if t["action"])
  # Independent: a plain forward over the data layer's row, log-softmax over the real vocabulary in numpy.
  row = episodes_to_batch([episode], DataConfig.from_config(made["config"].data.to_dict()), made["tokenizer"],
                          pack=False)
  n = int((row["segment_ids"][0] > 0).sum())
  tokens = row["tokens"][:, :n]
  positions = np.arange(n)[None]
  vocab = made["model_config"].vocab_size
  model = Transformer(made["model_config"])
  lp_phi = _log_softmax(np.asarray(model.apply(made["phi"], tokens, positions, np.ones_like(tokens)))[0, :, :vocab])
  lp_theta = _log_softmax(np.asarray(model.apply(made["theta"], tokens, positions, np.ones_like(tokens)))[0, :, :vocab])
  for v in values:
    i, tok = v["index"], v["token"]
    assert tokens[0, i] == tok
    np.testing.assert_allclose(v["pi_phi"], np.exp(lp_phi[i - 1, tok]), rtol=1e-4)
    np.testing.assert_allclose(v["p_theta"], np.exp(lp_theta[i - 1, tok]), rtol=1e-4)
    np.testing.assert_allclose(v["ratio"], v["p_theta"] / v["pi_phi"], rtol=1e-4)
    assert 0 <= v["return_to_go"] <= 1

  state = {"turns": episode["turns"][:3], "done": False}
  top = run.next_token_values(state, top_k=5)
  m = len(run_tokens := [made["tokenizer"].bos_id] + made["tokenizer"].encode("".join(t["text"] for t in state["turns"])))
  seq = np.array([run_tokens])
  last_phi = _log_softmax(np.asarray(model.apply(made["phi"], seq, np.arange(m)[None], np.ones_like(seq)))[0, -1, :vocab])
  last_theta = _log_softmax(np.asarray(model.apply(made["theta"], seq, np.arange(m)[None], np.ones_like(seq)))[0, -1, :vocab])
  assert [t["token"] for t in top] == np.argsort(-last_theta, kind="stable")[:5].tolist()
  for t in top:
    np.testing.assert_allclose(t["pi_phi"], np.exp(last_phi[t["token"]]), rtol=1e-4)
    np.testing.assert_allclose(t["p_theta"], np.exp(last_theta[t["token"]]), rtol=1e-4)
  by_phi = run.next_token_values(state, top_k=3, by="phi")
  assert [t["token"] for t in by_phi] == np.argsort(-last_phi, kind="stable")[:3].tolist()

  fig = run.heatmap(episode)
  assert len(fig.axes[0].texts) == n - 1  # one box per token after the BOS
  table = analysis.format_table(values[:3], ["index", "text", "ratio"])
  assert len(table.splitlines()) == 4


def test_play_uses_the_runs_environment(workdir):
  path, _ = workdir
  run = analysis.load(path)
  played = run.play(seed=3, beta=2.0)
  assert played["meta"]["seed"] == 3 and len([t for t in played["turns"] if t["action"]]) <= 4
  assert played == run.play(seed=3, beta=2.0), "greedy play is deterministic"


def test_play_grows_the_cache_as_the_history_outgrows_it(tiny_workdir):
  """Greedy BC play with phi's logits peaked (a larger init std), so that actions run to several
  characters and the 20-move history outgrows the rows (128 tokens) and the sampler's first cache
  (2 * 128 + 16 slots). Each action must be the greedy continuation of its history by plain uncached
  forward passes over the whole sequence (pad, BOS and EOS never chosen)."""
  path, made = tiny_workdir
  run = analysis.load(path)
  model_config, tokenizer = made["model_config"], made["tokenizer"]
  # init_std 0.02 -> 0.4 on every matrix (norm scales stay 1): peaked logits, ties not decided by float noise
  phi = jax.tree.map(lambda x: x * 20 if x.ndim > 1 else x, made["phi"])
  run.behaviour_params = phi
  played = run.play(seed=0, beta=0.0)
  last = max(i for i, t in enumerate(played["turns"]) if t["action"])
  longest_prompt = 1 + len(tokenizer.encode("".join(t["text"] for t in played["turns"][:last])))
  assert longest_prompt + 16 > 2 * 128 + 16, "the history must outgrow the first cache"

  width = model_config.max_position_embeddings
  forward = jax.jit(lambda tokens, n: Transformer(model_config).apply(
      phi, tokens, np.arange(width)[None], (np.arange(width) < n)[None].astype(np.int32)))
  vocab = model_config.vocab_size
  never = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id]
  for i, turn in enumerate(played["turns"]):
    if not turn["action"]:
      continue
    seq = [tokenizer.bos_id] + tokenizer.encode("".join(t["text"] for t in played["turns"][:i]))
    action = []
    while len(action) < 16 and "\n" not in tokenizer.decode(action):
      tokens = np.zeros((1, width), np.int32)
      tokens[0, :len(seq)] = seq
      z = np.asarray(forward(tokens, len(seq)))[0, len(seq) - 1, :vocab].astype(np.float64)
      z[never] = -np.inf
      action.append(int(np.argmax(z)))
      seq.append(action[-1])
    assert turn["text"] == (tokenizer.decode(action) or "\n"), f"turn {i}"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tiny_workdir, monkeypatch):
  """Every cell of the notebook, headless, on a workdir of configs/tiny.py's lengths; the kernel
  imports this checkout's qsft_jax and draws with matplotlib's Agg backend. A cell that raises fails
  the test (nbclient's CellExecutionError)."""
  import nbclient
  import nbformat

  path, _ = tiny_workdir
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.setenv("QSFT_WORKDIR", path)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(  # what the kernel imported and what the heatmap cell drew
      "import qsft_jax\nprint('qsft_jax:', os.path.dirname(qsft_jax.__file__))\n"
      "print('heatmap boxes:', len(fig.axes[0].texts))"))
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), "every code cell ran"
  outputs = "".join(o.get("text", "") for c in code for o in c.get("outputs", []))
  assert f"qsft_jax: {os.path.join(repo, 'qsft_jax')}" in outputs
  assert path in outputs and "corr(ratio, return-to-go)" in outputs
  assert "beta=0.0: return" in outputs and "beta=4.0: return" in outputs
  assert "heatmap boxes: 0\n" not in outputs and "heatmap boxes: " in outputs


def test_evaluate_command_line_on_the_workdir(workdir, capsys):
  from qsft_jax import evaluate

  path, _ = workdir
  assert evaluate.main(["evaluate", "--workdir", path, "--episodes", "3", "--seed", "40", "--betas", "0,2",
                        "--no_ratio", "--max_new_tokens", "2", "--dataset_mean_return", "-5.5"]) == 0
  with open(os.path.join(path, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["env"] == "maze" and results["episodes"] == 3 and results["dataset_mean_return"] == -5.5
  assert list(results["policies"]) == ["bc", "qsft_beta2"]
  assert results["checkpoint_steps"] == {"phi": 1, "theta": 1, "theta_bar": 1, "control": None}
  assert results["unfinished_phases"] == []
  for name in results["policies"]:
    with open(os.path.join(path, "eval", f"episodes_{name}.jsonl")) as f:
      assert [json.loads(line)["meta"]["seed"] for line in f] == [40, 41, 42]
  assert "| qsft_beta2 | 2 |" in capsys.readouterr().out
  # the same figures in TensorBoard at the checkpoints' step (1), with the value correlations
  from tensorboard_events import read_scalars
  scalars = read_scalars(os.path.join(path, "eval", "tensorboard"))
  for name, r in results["policies"].items():
    assert scalars[f"eval/{name}/mean_return"][-1] == (1, pytest.approx(r["mean_return"]))
    assert scalars[f"eval/{name}/success_rate"][-1] == (1, pytest.approx(r["success_rate"]))
  corr = results["value_correlation"]["qsft"]["all_turns"]
  assert scalars["eval/qsft/value_corr"][-1] == (1, pytest.approx(corr))


def test_the_dummy_token_is_never_played_nor_listed(workdir):
  """qsft.dummy_token carries 1 - w of every training target, so p_theta favours it: the analysis
  follows evaluation's rule (evaluate.suppressed_token_ids) and neither plays nor ranks it. The
  dummy here is the token theta itself would pick first, so leaving it in would show."""
  from qsft_jax import evaluate

  path, made = workdir
  tokenizer = made["tokenizer"]
  plain = analysis.load(path)
  assert plain.targets.dummy_token is None  # base_config: no dummy token
  state = {"turns": plain.play(seed=3, mode="theta")["turns"][:1], "done": False}
  first = plain.next_token_values(state, top_k=3)
  dummy = first[0]["token"]
  assert dummy not in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
  loaded = run_lib.load(path)
  loaded.config.qsft.dummy_token = dummy
  run = analysis.from_loaded(loaded)
  assert run.targets.dummy_token == dummy
  assert evaluate.suppressed_token_ids(tokenizer, dummy) == sorted(
      {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, dummy})
  # ranking: theta's order with the suppressed tokens left out
  top = run.next_token_values(state, top_k=3)
  assert [t["token"] for t in top] == [t["token"] for t in plain.next_token_values(state, top_k=4)[1:]]
  for by in ("theta", "phi", "ratio"):
    listed = [t["token"] for t in run.next_token_values(state, top_k=len(ALPHABET) + 8, by=by)]
    assert not set(listed) & set(evaluate.suppressed_token_ids(tokenizer, dummy)), by
  # playing: theta's greedy policy would emit the dummy first; it never appears in an action
  dummy_text = tokenizer.decode([dummy])
  before = plain.play(seed=3, mode="theta", max_new_tokens=4)
  assert any(dummy_text in t["text"] for t in before["turns"] if t["action"])
  for mode, beta in (("theta", 0.0), ("extract", 50.0)):
    played = run.play(seed=3, mode=mode, beta=beta, max_new_tokens=4)
    assert not any(dummy_text in t["text"] for t in played["turns"] if t["action"]), mode
