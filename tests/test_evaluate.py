"""Evaluation on the maze with a tiny random model: results.json schema and numbers, tokenisation."""
import json
import math
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from qsft_jax import evaluate
from qsft_jax import run as run_lib
from qsft_jax.data import DataConfig, episodes_to_batch
from qsft_jax.envs import generate_episodes, make_env
from qsft_jax.models import Transformer, get_preset
from qsft_jax.tokenizers import CharTokenizer
from tensorboard_events import read_scalars

# Only the characters the maze uses: random sampling then hits a move character often enough that
# returns vary across episodes.
ALPHABET = "".join(sorted(set("Maze. Reach G. Moves: u d l r.\n#,0123456789")))
TOKENIZER = CharTokenizer(ALPHABET)
CONFIG = get_preset("tiny-llama", vocab_size=TOKENIZER.vocab_size, d_model=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64)
ENV_KWARGS = {"max_steps": 4}
DATA = {"max_length": 160, "reward_transform": "terminal_return:-8,0", "observation_template": "{text}",
        "action_template": "{text}"}


def _params(seed):
  d = np.zeros((1, 1), np.int32)
  return jax.jit(lambda r: nn.unbox(Transformer(CONFIG).init(r, d, d, d + 1)))(jax.random.key(seed))


def test_history_tokens_equal_the_data_layers_episode_tokens():
  episode = next(generate_episodes("maze", 1, seed=3, **ENV_KWARGS))
  # templates made of the alphabet's characters (others are a data error: data.unknown_chars)
  for templates in [{}, {"observation_template": "Maze: {text}", "action_template": ": {text}"}]:
    config = DataConfig.from_config({**DATA, **templates}, pack=False)
    row = episodes_to_batch([episode], config, TOKENIZER)
    n = int((row["segment_ids"][0] > 0).sum())
    expected = row["tokens"][0, :n].tolist()
    assert evaluate.history_tokens(episode["turns"], TOKENIZER, config) == expected
    # a prefix of the turns (what the agent sees before acting) is a prefix of the tokens
    prefix = evaluate.history_tokens(episode["turns"][:3], TOKENIZER, config)
    assert prefix == expected[:len(prefix)] and prefix[0] == TOKENIZER.bos_id


def test_policy_specs():
  names = [s["name"] for s in evaluate.policy_specs([0, 1, 4.5])]
  assert names == ["bc", "qsft_beta1", "qsft_beta4.5", "ratio"]
  assert [s["name"] for s in evaluate.policy_specs([0, 1], have_theta=False)] == ["bc"]
  specs = evaluate.policy_specs([0, 2], have_control=True)
  assert [(s["name"], s["theta"]) for s in specs] == [
      ("bc", "theta"), ("qsft_beta2", "theta"), ("ratio", "theta"), ("control_beta2", "control"),
      ("control_ratio", "control")]
  assert [s["name"] for s in evaluate.policy_specs([2], have_theta=False, have_control=True)] == [
      "bc", "control_beta2", "control_ratio"]
  with pytest.raises(ValueError, match="beta"):
    evaluate.policy_specs([-1])


DUMMY = TOKENIZER.encode("u")[0]


@pytest.mark.slow
def test_results_json_schema_and_numbers_on_the_maze(tmp_path):
  workdir = str(tmp_path)
  os.makedirs(os.path.join(workdir, "data"))
  dataset = list(generate_episodes("maze", 12, seed=0, **ENV_KWARGS))
  with open(os.path.join(workdir, "data", "train.jsonl"), "w") as f:
    f.writelines(json.dumps(ep) + "\n" for ep in dataset)
  config = ml_collections.ConfigDict({
      "task": "maze", "env": ENV_KWARGS, "data": {**DATA, "path": ""}, "qsft": {"support_min": 1e-3, "dummy_token": DUMMY},
      "eval": {"episodes": 7, "seed": 100, "betas": (0.0, 2.0), "max_new_tokens": 1, "batch_size": 4}})
  loaded = run_lib.Run(workdir=workdir, config=config, model_config=CONFIG, tokenizer=TOKENIZER,
                       data_config=run_lib.data_config_from(config), behaviour_params=_params(0),
                       theta_params=_params(1))
  assert loaded.targets.dummy_token == DUMMY and loaded.targets.support_min == 1e-3
  results = evaluate.run(loaded, temperature=1.0)

  with open(os.path.join(workdir, "eval", "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(results))
  assert set(on_disk) == {"env", "episodes", "dataset_mean_return", "policies", "checkpoint_steps",
                          "unfinished_phases", "value_correlation"}
  assert on_disk["value_correlation"] == {}  # no held-out episodes in this workdir
  # a Run built by hand: no checkpoint steps, and a config without phases has none unfinished
  assert on_disk["checkpoint_steps"] == {"phi": None, "theta": None, "theta_bar": None, "control": None}
  assert on_disk["unfinished_phases"] == []
  assert on_disk["env"] == "maze" and on_disk["episodes"] == 7
  assert on_disk["dataset_mean_return"] == pytest.approx(np.mean([ep["meta"]["return"] for ep in dataset]))
  assert list(on_disk["policies"]) == ["bc", "qsft_beta2", "ratio"]
  low, high = make_env("maze", **ENV_KWARGS).return_bounds
  markdown = open(os.path.join(workdir, "eval", "results.md")).read()
  spread = 0.0
  for name, r in on_disk["policies"].items():
    assert set(r) == {"mean_return", "stderr", "success_rate", "beta"}
    assert r["beta"] == {"bc": 0.0, "qsft_beta2": 2.0, "ratio": None}[name]
    with open(os.path.join(workdir, "eval", f"episodes_{name}.jsonl")) as f:
      played = [json.loads(line) for line in f]
    assert [ep["meta"]["seed"] for ep in played] == list(range(100, 107)), "same seeds for every policy"
    returns = np.array([sum(t["reward"] for t in ep["turns"] if t["action"]) for ep in played])
    assert np.all((returns >= low) & (returns <= high)), (returns, (low, high))
    np.testing.assert_allclose([ep["meta"]["return"] for ep in played], returns)
    assert r["mean_return"] == pytest.approx(returns.mean())
    assert r["stderr"] == pytest.approx(np.std(returns, ddof=1) / math.sqrt(len(returns)))
    assert r["success_rate"] == pytest.approx(np.mean([ep["meta"]["success"] for ep in played]))
    for ep in played:
      assert all(t["text"].count("\n") <= 1 for t in ep["turns"] if t["action"]), "actions cut at the stop"
      # qsft.dummy_token ("u" here) carries 1 - w in training, never an action: no policy emits it
      assert not any("u" in t["text"] for t in ep["turns"] if t["action"]), ep["turns"]
    spread = max(spread, returns.std())
    assert f"| {name} |" in markdown
  assert spread > 0, "returns should vary across episodes for the stderr check to mean something"


def test_summarize_edge_cases():
  assert evaluate.summarize([-3.0], [True]) == {"mean_return": -3.0, "stderr": None, "success_rate": 1.0}
  with pytest.raises(ValueError):
    evaluate.summarize([], [])


def test_results_go_to_tensorboard_at_each_policys_checkpoint_step(tmp_path):
  results = {
      "env": "maze", "episodes": 1, "dataset_mean_return": -13.0,
      "policies": {"bc": {"mean_return": -20.0, "stderr": 0.5, "success_rate": 0.25, "beta": 0.0},
                   "qsft_beta4": {"mean_return": -9.0, "stderr": None, "success_rate": 0.75, "beta": 4.0},
                   "control_ratio": {"mean_return": -16.5, "stderr": 0.125, "success_rate": 0.5,
                                     "beta": None}},
      "checkpoint_steps": {"phi": 400, "theta": 800, "theta_bar": 800, "control": 600},
      "value_correlation": {"qsft": {"all_turns": 0.5, "turn0": 0.875},
                            "control": {"all_turns": -0.25, "turn0": float("nan")}}}
  folder = evaluate.write_tensorboard(str(tmp_path), results)
  assert folder == os.path.join(str(tmp_path), "eval", "tensorboard")
  got = read_scalars(folder)
  nan = got.pop("eval/control/value_corr_turn0")
  assert len(nan) == 1 and nan[0][0] == 600 and math.isnan(nan[0][1])
  assert got == {
      "eval/bc/mean_return": [(400, -20.0)], "eval/bc/stderr": [(400, 0.5)],
      "eval/bc/success_rate": [(400, 0.25)],
      "eval/qsft_beta4/mean_return": [(800, -9.0)], "eval/qsft_beta4/success_rate": [(800, 0.75)],
      "eval/control_ratio/mean_return": [(600, -16.5)], "eval/control_ratio/stderr": [(600, 0.125)],
      "eval/control_ratio/success_rate": [(600, 0.5)],
      "eval/qsft/value_corr": [(800, 0.5)], "eval/qsft/value_corr_turn0": [(800, 0.875)],
      "eval/control/value_corr": [(600, -0.25)],
      "eval/dataset/mean_return": [(800, -13.0)]}
