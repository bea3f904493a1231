"""The grain pipeline: determinism, resuming from a saved state (mid-window, across an epoch boundary),
per-host shards, epochs, dropped and invalid episodes."""
import json

import numpy as np
import pytest

from qsft_jax.data import ARRAY_SPECS, DataConfig, EpisodeError, write_jsonl
from qsft_jax.data.pipeline import PipelineStats, iterator_state, make_train_iterator, restore_iterator
from qsft_jax.data.synthetic import wordle_like_episodes
from qsft_jax.tokenizers import CharTokenizer

TOK = CharTokenizer()
NUM_EPISODES = 60


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """Episodes whose first observation names them ("episode 17\\n"), split over two files."""
    d = tmp_path_factory.mktemp("episodes")
    episodes = list(wordle_like_episodes(NUM_EPISODES, seed=3))
    for i, ep in enumerate(episodes):
        ep["turns"][0]["text"] = f"episode {i}\n"
    write_jsonl(str(d / "a.jsonl"), episodes[:25])
    write_jsonl(str(d / "b.jsonl"), episodes[25:])
    return str(d)


def make(jsonl, batch=4, **kw):
    cfg = DataConfig(path=jsonl, **{"max_length": 96, "pack_window": 8, **kw})
    return make_train_iterator(cfg, TOK, batch_size_per_process=batch)


def episode_names(batch):
    """The 'episode N' prompt of every segment in a batch."""
    names = []
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            text = TOK.decode(tokens[seg == s])
            names.append(int(text.split("\n")[0].split()[1]))
    return names


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ARRAY_SPECS:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_have_the_contract_shapes_and_are_deterministic(jsonl):
    first = list(make(jsonl))
    assert len(first) > 3
    for b in first:
        assert set(b) == set(ARRAY_SPECS)
        for key, (dtype, _) in ARRAY_SPECS.items():
            assert b[key].shape == (4, 96) and b[key].dtype == dtype, key
    assert_batches_equal(first, list(make(jsonl)))
    other_seed = make_train_iterator(DataConfig(path=jsonl, max_length=96, pack_window=8, shuffle_seed=1), TOK, batch_size_per_process=4)
    assert episode_names(next(other_seed)) != episode_names(first[0])


@pytest.mark.parametrize("stop_after", [1, 3, 7, 12, 16])
def test_restored_iterator_yields_the_same_batches(jsonl, stop_after):
    # Two epochs, small windows: the stops fall mid-window and after the epoch boundary.
    uninterrupted = list(make(jsonl, num_epochs=2))
    it = make(jsonl, num_epochs=2)
    for _ in range(stop_after):
        next(it)
    state = json.loads(json.dumps(iterator_state(it)))  # what a checkpoint stores
    resumed = restore_iterator(make(jsonl, num_epochs=2), state)
    assert_batches_equal(list(resumed), uninterrupted[stop_after:])


def test_orbax_checkpoint_of_the_iterator(jsonl, tmp_path):
    """The trainer's path: grain's checkpoint handler inside an orbax CheckpointManager."""
    import grain
    import orbax.checkpoint as ocp

    uninterrupted = list(make(jsonl, num_epochs=2))
    it = make(jsonl, num_epochs=2)
    for _ in range(5):
        next(it)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    fresh = make(jsonl, num_epochs=2)
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal(list(fresh), uninterrupted[5:])


def test_epoch_boundary_is_crossed_in_the_checked_range(jsonl):
    batches = list(make(jsonl, num_epochs=2))
    names = [n for b in batches[:12] for n in episode_names(b)]
    assert len(names) > NUM_EPISODES  # so the restore test's stops at 12 and 16 lie in epoch 2


def test_epochs_cover_every_episode_once_each_and_reshuffle(jsonl):
    names = [n for b in make(jsonl, batch=1, num_epochs=2, pack=False) for n in episode_names(b)]
    assert sorted(names) == sorted(list(range(NUM_EPISODES)) * 2)
    assert names[:NUM_EPISODES] != names[NUM_EPISODES:]
    assert sorted(names[:NUM_EPISODES]) == list(range(NUM_EPISODES))


def test_two_hosts_see_disjoint_shards_that_cover_the_data(jsonl):
    seen = []
    for index in range(2):
        cfg = DataConfig(path=jsonl, max_length=96, pack_window=8)
        it = make_train_iterator(cfg, TOK, process_index=index, process_count=2, batch_size_per_process=1)
        seen.append([n for b in it for n in episode_names(b)])
    assert len(seen[0]) == len(set(seen[0])) == NUM_EPISODES // 2
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(NUM_EPISODES))


def test_dropped_episodes_are_counted_and_invalid_ones_raise(tmp_path):
    good = {"turns": [{"text": "hi\n", "action": False}, {"text": "a", "action": True, "reward": 1.0}], "done": True}
    long_ = {"turns": [{"text": "x" * 50, "action": False}, {"text": "b", "action": True}], "done": True}
    write_jsonl(str(tmp_path / "d.jsonl"), [good, long_, good])
    stats = PipelineStats()
    cfg = DataConfig(path=str(tmp_path / "d.jsonl"), max_length=16, overlong="drop")
    batches = list(make_train_iterator(cfg, TOK, batch_size_per_process=1, stats=stats))
    assert (stats.kept, stats.dropped) == (2, 1)
    assert sum(int(b["segment_ids"].max()) for b in batches) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"turns": [], "done": True}) + "\n")
    cfg = DataConfig(path=str(tmp_path / "bad.jsonl"), max_length=16)
    with pytest.raises(EpisodeError, match=r"bad.jsonl:2: turns: episode has no turns"):
        list(make_train_iterator(cfg, TOK, batch_size_per_process=1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="process_index 2 outside"):
        make_train_iterator(DataConfig(path="x"), TOK, process_index=2, process_count=2, batch_size_per_process=1)
    with pytest.raises(ValueError, match="data.path: empty"):
        make_train_iterator(DataConfig(), TOK, batch_size_per_process=1)


@pytest.mark.slow  # starts grain worker processes twice (~15-20 s on 2 busy cores)
def test_worker_processes_are_deterministic_and_resumable(jsonl):
    cfg = DataConfig(path=jsonl, max_length=96, pack_window=8, num_epochs=2, num_workers=2)
    uninterrupted = list(make_train_iterator(cfg, TOK, batch_size_per_process=4))
    names = [n for b in uninterrupted for n in episode_names(b)]
    assert sorted(names) == sorted(list(range(NUM_EPISODES)) * 2)
    it = make_train_iterator(cfg, TOK, batch_size_per_process=4)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(iterator_state(it)))
    resumed = restore_iterator(make_train_iterator(cfg, TOK, batch_size_per_process=4), state)
    assert_batches_equal(list(resumed), uninterrupted[5:])


def test_benchmark_script_prints_its_figures_last(capsys):
    """Smoke run of benchmarks/input_pipeline.py (not a timing test): the last line is the JSON record."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "input_pipeline.py")
    spec = importlib.util.spec_from_file_location("input_pipeline_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["input_pipeline", "--task", "wordle_like", "--episodes", "40", "--epochs", "1",
                         "--batch", "2", "--train-tokens-per-s", "1000"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"episodes_per_s", "tokens_per_s", "headroom"} and last == result
    assert last["tokens_per_s"] > 0 and last["headroom"] == pytest.approx(last["tokens_per_s"] / 1000)
