"""TFDS builders: array_record written and read back through as_data_source() with TensorFlow blocked;
the grain pipeline on a TFDS source; the bundled task builders against generate_episodes."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from qsft_jax.data import DataConfig, parse_episode, write_jsonl
from qsft_jax.data.pipeline import make_train_iterator
from qsft_jax.data.synthetic import wordle_like_episodes
from qsft_jax.data.tfds_builders import build_dataset, load_data_source, prepared_dir
from qsft_jax.tokenizers import CharTokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDERS = os.path.join(REPO_ROOT, "data")


def normalised(episode):
    """An episode dict as the builder stores it (defaults filled in), for comparisons."""
    parsed, problems = parse_episode(episode)
    assert not problems, problems
    return json.dumps(parsed.to_dict(), sort_keys=True)


@pytest.fixture(scope="module")
def user_jsonl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("manual")
    train, validation = list(wordle_like_episodes(40, seed=5)), list(wordle_like_episodes(8, seed=6))
    write_jsonl(str(folder / "train.jsonl"), train)
    write_jsonl(str(folder / "validation-part.jsonl"), validation)
    return str(folder), train, validation


def test_build_and_read_without_tensorflow(user_jsonl, tmp_path):
    """In a fresh interpreter (nothing else imported), build then read back; TensorFlow is never imported.
    (Blocking it with sys.modules["tensorflow"] = None is no test: tfds then believes TF is loaded.)"""
    manual, train, validation = user_jsonl
    script = textwrap.dedent(
        f"""
        import json, os, sys
        from qsft_jax.data.tfds_builders import build_dataset, load_data_source
        out = build_dataset({os.path.join(BUILDERS, "jsonl_episodes")!r}, {str(tmp_path)!r}, manual_dir={manual!r})
        files = sorted(os.listdir(out))
        splits = {{s: [r["episode"].decode() for r in load_data_source("jsonl_episodes", {str(tmp_path)!r}, s)]
                  for s in ("train", "validation")}}
        assert "tensorflow" not in sys.modules  # not imported (even where it is installed, it is never needed)
        print(json.dumps({{"files": files, "splits": splits}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert any(".array_record-" in f and "train" in f for f in out["files"])
    assert not any("tfrecord" in f for f in out["files"])
    assert sorted(normalised(json.loads(e)) for e in out["splits"]["train"]) == sorted(normalised(e) for e in train)
    assert sorted(normalised(json.loads(e)) for e in out["splits"]["validation"]) == sorted(normalised(e) for e in validation)


def _segment_texts(iterator, tok):
    texts = []
    for b in iterator:
        for tokens, seg in zip(b["tokens"], b["segment_ids"]):
            texts += [tok.decode(tokens[seg == s]) for s in range(1, seg.max() + 1)]
    return texts


def test_pipeline_reads_a_tfds_source_like_the_jsonl(user_jsonl, tmp_path):
    manual, train, _ = user_jsonl
    build_dataset(os.path.join(BUILDERS, "jsonl_episodes"), str(tmp_path), manual_dir=manual)
    tok = CharTokenizer()
    common = dict(max_length=128, pack=True, pack_window=8)
    from_tfds = make_train_iterator(
        DataConfig(source="tfds", tfds_name="jsonl_episodes", tfds_data_dir=str(tmp_path), **common), tok, batch_size_per_process=1
    )
    from_jsonl = make_train_iterator(DataConfig(path=os.path.join(manual, "train.jsonl"), **common), tok, batch_size_per_process=1)
    a, b = _segment_texts(from_tfds, tok), _segment_texts(from_jsonl, tok)
    assert len(a) == len(train) and sorted(a) == sorted(b)
    assert "tensorflow" not in sys.modules


def test_prepared_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        prepared_dir("nothing", str(tmp_path))


def test_builder_rejects_invalid_episodes(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "eps.jsonl").write_text('{"turns": [], "done": true}\n')
    with pytest.raises(ValueError, match=r"eps.jsonl:1: turns: episode has no turns"):
        build_dataset(os.path.join(BUILDERS, "jsonl_episodes"), str(tmp_path / "out"), manual_dir=str(manual))


def test_cli_build(user_jsonl, tmp_path):
    manual, train, _ = user_jsonl
    result = subprocess.run(
        [sys.executable, "-m", "qsft_jax.data", "build", "data/jsonl_episodes", f"--data_dir={tmp_path}", f"--manual_dir={manual}"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "jsonl_episodes" / "1.0.0")
    assert len(load_data_source("jsonl_episodes", str(tmp_path), "train")) == len(train)


@pytest.mark.parametrize("task,num", [("maze", 6), ("wordle", 4), ("chess", 1), ("twenty_questions", 5)])
def test_task_builders_store_the_generated_episodes(task, num, tmp_path):
    from qsft_jax.envs import generate_episodes

    out = build_dataset(os.path.join(BUILDERS, task), str(tmp_path), config="small", num_train=str(num), num_validation="1")
    assert os.path.basename(os.path.dirname(out)).startswith("small-")  # overrides get their own config name
    stored = [json.loads(r["episode"]) for r in load_data_source(out, split="train")]
    expected = list(generate_episodes(task, num, 0))
    assert sorted(normalised(e) for e in stored) == sorted(normalised(e) for e in expected)
    validation = [json.loads(r["episode"]) for r in load_data_source(out, split="validation")]
    assert [normalised(e) for e in validation] == [normalised(e) for e in generate_episodes(task, 1, 1)]


def test_same_file_name_in_two_folders(tmp_path):
    manual = tmp_path / "manual"
    for sub, seed in (("a", 1), ("b", 2)):
        (manual / sub).mkdir(parents=True)
        write_jsonl(str(manual / sub / "train.jsonl"), wordle_like_episodes(3, seed=seed))
    build_dataset(os.path.join(BUILDERS, "jsonl_episodes"), str(tmp_path / "out"), manual_dir=str(manual))
    assert len(load_data_source("jsonl_episodes", str(tmp_path / "out"), "train")) == 6
