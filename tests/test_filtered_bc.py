"""Filtered BC: the data layer keeps exactly the episodes at or above the (1 - top_fraction) quantile of
the training returns (against a numpy selection computed from the raw rewards), the pipeline trains on
exactly those (JSONL and a generic record source, sharded), and the trainer's filtered_bc phase starts
from BC's initialisation, resumes, and is evaluated as a policy of its own."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qsft_jax.data import DataConfig, write_jsonl
from qsft_jax.data.pipeline import RecordSource, make_dataset, top_return_source
from qsft_jax.tokenizers import CharTokenizer

import trainer_utils as tu

TOK = CharTokenizer()
GAMMA, GAMMA_TOKEN = 0.9, 0.95
LOW, HIGH, MAX_TURNS = -1.0, 1.0, 4
CONFIG = dict(max_length=64, overlong="drop", gamma=GAMMA, gamma_token=GAMMA_TOKEN, pack_window=8,
              reward_transform=f"affine:{LOW},{HIGH},{MAX_TURNS}", num_epochs=1)


def make_episodes(n: int, seed: int) -> list[dict]:
    """Episodes named in their first observation ("ep17\\n"), 1-2 action turns of 1 or 3 characters,
    rewards -1 or 1: 7 distinct returns, so many ties (30 at the 0.75 quantile). Every 10th episode is too
    long for max_length (dropped: it must not count in the quantile)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n):
        turns = [{"text": f"ep{i}\n", "action": False}]
        for _ in range(int(rng.integers(1, 3))):
            turns.append({"text": "a" if rng.random() < 0.8 else "abc", "action": True,
                          "reward": float(rng.choice([-1.0, 1.0]))})
            turns.append({"text": "." * (80 if i % 10 == 9 else 1), "action": False})
        episodes.append({"turns": turns, "done": True, "id": f"ep{i}"})
    return episodes


def numpy_return(episode: dict) -> float:
    """The first action token's discounted return from the raw rewards: the affine transform
    r' = (r - low) / ((high - low) H), H = sum_{k < max_turns} gamma^k; inside an action of n characters
    the discount gamma_token per token, gamma across turns."""
    h = sum(GAMMA ** k for k in range(MAX_TURNS))
    actions = [t for t in episode["turns"] if t["action"]]
    g = 0.0  # at the last token of action turn k: r'_k + gamma * gamma_token^(len_{k+1} - 1) * G_{k+1}
    for k in reversed(range(len(actions))):
        later = GAMMA * GAMMA_TOKEN ** (len(actions[k + 1]["text"]) - 1) * g if k + 1 < len(actions) else 0.0
        g = (actions[k]["reward"] - LOW) / ((HIGH - LOW) * h) + later
    return GAMMA_TOKEN ** (len(actions[0]["text"]) - 1) * g


def numpy_kept(episodes: list[dict], top_fraction: float) -> set[str]:
    trained = [ep for i, ep in enumerate(episodes) if i % 10 != 9]
    g = np.array([numpy_return(ep) for ep in trained])
    threshold = np.quantile(g, 1.0 - top_fraction)
    return {ep["id"] for ep, x in zip(trained, g) if x >= threshold}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    episodes = make_episodes(120, seed=5)
    path = str(tmp_path_factory.mktemp("filtered") / "train.jsonl")
    write_jsonl(path, episodes)
    return path, episodes


def names_in(dataset) -> list[str]:
    """The "epN" first line of every segment of every row the dataset yields."""
    names = []
    for batch in dataset:
        for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
            for s in range(1, seg.max() + 1):
                names.append(TOK.decode(tokens[seg == s]).split("\n")[0])
    return names


@pytest.mark.parametrize("top_fraction", [0.1, 0.25, 0.5, 1.0])
def test_selection_is_the_numpy_quantile_selection_with_ties(data, top_fraction):
    path, episodes = data
    config = DataConfig(path=path, **CONFIG)
    source, selection = top_return_source(config, TOK, top_fraction)
    kept = {episodes[int(i)]["id"] for i in selection.indices}
    want = numpy_kept(episodes, top_fraction)
    assert kept == want
    assert selection.total == 108 and selection.kept == len(want) == len(source)
    if top_fraction == 0.25:  # ties at the threshold are all kept: more than the fraction alone
        assert len(want) == 41 and np.sum(selection.returns == selection.threshold) == 30
    assert f"{len(want)} of 108 episodes kept" in selection.format()


def test_pipeline_trains_on_exactly_the_selection_sharded_and_from_any_source(data):
    path, episodes = data
    config = DataConfig(path=path, **CONFIG)
    source, selection = top_return_source(config, TOK, 0.25)
    want = sorted(numpy_kept(episodes, 0.25))
    shards = [names_in(make_dataset(config, TOK, process_index=s, process_count=2, batch_size_per_process=1,
                                    source=source)) for s in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == want  # each kept episode once per epoch
    with open(path) as f:  # the same selection from a non-JSONL record source (a TFDS split's shape)
        records = RecordSource([{"episode": line} for line in f], name="memory")
    other, other_selection = top_return_source(config, TOK, 0.25, source=records)
    np.testing.assert_array_equal(other_selection.indices, selection.indices)
    assert sorted(names_in(make_dataset(config, TOK, batch_size_per_process=1, source=other))) == want


@pytest.mark.slow
def test_filtered_bc_phase_starts_as_bc_resumes_and_is_evaluated(tmp_path):
    """top_fraction = 1 keeps every episode: the phase then trains exactly what bc trains (same
    initialisation, seed and batches), so its state equals bc's bit for bit, also across a resume.
    Evaluation plays "filtered_bc" with its own parameters in phi's place."""
    import jax
    from qsft_jax import evaluate
    from qsft_jax import run as run_lib

    workdir = str(tmp_path / "run")
    common = ("--config.phases=('bc','filtered_bc')", "--config.bc.steps=4", "--config.data_shards=2",
              "--config.checkpoint.every_steps=2", "--config.eval.enabled=False",
              "--config.filtered_bc.top_fraction=1.0")
    text = tu.run_ok(workdir, *common, "--config.filtered_bc.steps=2")
    assert "filtered_bc: 64 of 64 episodes kept" in text
    text = tu.run_ok(workdir, *common, "--config.filtered_bc.steps=4")
    assert "filtered_bc: resumed from the checkpoint of step 2" in text
    assert os.path.exists(os.path.join(workdir, "filtered_bc", "DONE"))
    bc, filtered = tu.read_state(workdir, "bc", 4), tu.read_state(workdir, "filtered_bc", 4)
    tu.assert_states_equal(filtered, bc, what="filtered_bc (top_fraction 1) vs bc")

    loaded = run_lib.load(workdir)
    assert loaded.filtered_bc_step == 4
    results = evaluate.run(loaded, episodes=2, betas=(0.0,), methods=("bc", "filtered_bc"),
                           value_diagnostics=False)
    assert list(results["policies"]) == ["bc", "filtered_bc"]
    assert results["checkpoint_steps"]["filtered_bc"] == 4
    assert "| filtered_bc | 0 |" in evaluate.results_markdown(results)

    # With parameters other than phi's, "filtered_bc" plays exactly what "bc" plays over those parameters.
    other = jax.tree.map(lambda x: x * 1.5, loaded.behaviour_params)
    kwargs = dict(env_name="maze", env_kwargs=dict(loaded.config.env), model_config=loaded.model_config,
                  tokenizer=loaded.tokenizer, theta_params=None, episodes=2, seed=3,
                  data_config=loaded.data_config, batch_size=2, max_new_tokens=8)
    record_a, record_b = {}, {}
    evaluate.evaluate_policies(behaviour_params=loaded.behaviour_params, filtered_bc_params=other,
                               policies=evaluate.policy_specs((), have_theta=False, have_filtered_bc=True)[1:],
                               record=record_a, **kwargs)
    evaluate.evaluate_policies(behaviour_params=other, policies=evaluate.policy_specs((), have_theta=False),
                               record=record_b, **kwargs)
    assert json.dumps(record_a["filtered_bc"]) == json.dumps(record_b["bc"])


def test_config_checks_name_the_field():
    from qsft_jax import config_lib
    from qsft_jax.errors import ConfigError

    config = config_lib.load_config_file(tu.TINY)
    config.phases = ("filtered_bc",)
    with pytest.raises(ConfigError, match=r"config.phases: the filtered_bc phase .* put 'bc' in phases"):
        config_lib.check_config(config, 8)
    config.phases = ("bc", "filtered_bc")
    for bad in (0.0, 1.5):
        config.filtered_bc.top_fraction = bad
        with pytest.raises(ConfigError, match=r"config.filtered_bc.top_fraction: must be in \(0, 1\]"):
            config_lib.check_config(config, 8)
    config.filtered_bc.top_fraction = 0.1
    config_lib.check_config(config, 8)


def test_a_selection_smaller_than_the_data_shards_is_a_config_error(tmp_path):
    from qsft_jax import config_lib
    from qsft_jax import main as main_lib
    from qsft_jax.errors import ConfigError

    config = config_lib.load_config_file(tu.TINY)
    config.phases = ("bc", "filtered_bc")
    config.data_shards = 8
    config.filtered_bc.top_fraction = 0.01
    with pytest.raises(ConfigError, match=r"config.filtered_bc.top_fraction: 0.01 keeps \d episodes, fewer than "
                                          r"the 8 data shards"):
        main_lib.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "config.json")  # refused before the run's writes
