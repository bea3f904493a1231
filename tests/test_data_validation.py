"""The bad-file corpus (tests/data_bad/, one problem per file) through the library and the CLI, plus the
over-long summary and the validator's handling of good files."""
import json
import os
import subprocess
import sys

import pytest

from qsft_jax.data import DataConfig, EpisodeError, load_episodes, validate_paths
from qsft_jax.data.episodes import parse_episode, resolve_paths

BAD_DIR = os.path.join(os.path.dirname(__file__), "data_bad")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# file -> (line, "field: message" substring) it must produce, and nothing else.
EXPECTED = {
    "malformed_json.jsonl": (2, "json: malformed JSON: Expecting ',' delimiter"),
    "not_object.jsonl": (1, "episode: expected a JSON object, got list"),
    "missing_turns.jsonl": (1, "turns: missing field"),
    "missing_done.jsonl": (1, "done: missing field"),
    "done_not_bool.jsonl": (1, "done: expected true or false, got 'yes'"),
    "unknown_field.jsonl": (1, "turn: unknown field"),
    "unknown_turn_field.jsonl": (1, "turns[1].rewrad: unknown field"),
    "bad_id.jsonl": (1, "id: expected a string or an integer, got list"),
    "text_not_string.jsonl": (1, "turns[0].text: expected a string, got int"),
    "action_not_bool.jsonl": (1, "turns[1].action: expected true or false, got 1"),
    "empty_turns.jsonl": (1, "turns: episode has no turns"),
    "empty_action_text.jsonl": (1, "turns[1].text: empty text on an action turn"),
    "reward_not_number.jsonl": (1, "turns[1].reward: expected a number, got '1'"),
    "nan_reward.jsonl": (3, "turns[1].reward: non-finite reward nan"),
    "infinite_reward.jsonl": (1, "turns[1].reward: non-finite reward inf"),
    "reward_on_observation.jsonl": (1, "turns[0].reward: reward on an observation turn"),
    "no_action.jsonl": (1, "turns: episode has no action turn"),
    "return_above_one.jsonl": (1, "turns[1].reward: discounted return-to-go 2 from this turn is outside [0, 1]"),
    "negative_return.jsonl": (1, "turns[1].reward: discounted return-to-go -0.5 from this turn is outside [0, 1]"),
    "done_false_ends_in_action.jsonl": (1, "done: done=false but the last turn is an action"),
    "not_utf8.jsonl": (1, "json: not UTF-8"),
}


def test_corpus_and_table_match():
    assert sorted(os.listdir(BAD_DIR)) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_library_reports_exactly_the_expected_problem(name):
    path = os.path.join(BAD_DIR, name)
    line, message = EXPECTED[name]
    problems, summary = validate_paths(path, DataConfig())
    assert [str(p) for p in problems] and len(problems) == 1, [str(p) for p in problems]
    assert str(problems[0]).startswith(f"{path}:{line}: {message}")
    assert summary.invalid == 1 and not summary.ok
    with pytest.raises(EpisodeError) as err:
        load_episodes(path)
    assert f"{path}:{line}: {message}" in str(err.value)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qsft_jax.data", "validate", *args], capture_output=True, text=True, cwd=REPO_ROOT
    )


def test_cli_prints_every_problem_and_exits_1():
    result = _cli(BAD_DIR)
    assert result.returncode == 1, result.stderr
    for name, (line, message) in EXPECTED.items():
        assert f"{os.path.join(BAD_DIR, name)}:{line}: {message}" in result.stdout
    # Every good line in the corpus (the first lines of two files) is counted as kept.
    assert f"episodes read: {len(EXPECTED) + 2}" in result.stdout
    assert f"invalid: {len(EXPECTED)}" in result.stdout


def test_cli_good_file_exits_0_and_reports_overlong(tmp_path):
    path = tmp_path / "good.jsonl"
    short = {"turns": [{"text": "hi\n", "action": False}, {"text": "a", "action": True, "reward": 1.0}], "done": True}
    long_ = {"turns": [{"text": "x" * 20, "action": False}, {"text": "b", "action": True}, {"text": "y" * 5, "action": False},
                       {"text": "c" * 30, "action": True, "reward": 1.0}], "done": True}
    path.write_text(json.dumps(short) + "\n\n" + json.dumps(long_) + "\n")
    result = _cli(str(path), "--max-length", "32")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "episodes read: 2" in result.stdout and "kept: 2 (of which truncated: 1)" in result.stdout
    result = _cli(str(path), "--max-length", "32", "--overlong", "drop")
    assert result.returncode == 0
    assert "kept: 1 (of which truncated: 0)" in result.stdout
    assert "1 longer than max_length=32" in result.stdout
    # Too short for any prefix holding an action: dropped with its reason, never silently.
    result = _cli(str(path), "--max-length", "4")
    assert "  2 no prefix of whole turns ending on an observation fits in max_length=4" in result.stdout
    assert "kept: 0" in result.stdout and result.returncode == 1  # nothing left to train on
    result = _cli(str(tmp_path / "missing.jsonl"))
    assert result.returncode == 1 and "missing.jsonl: no such file" in result.stderr
    # A return above 1 passes once a transform maps it into [0, 1].
    bad = os.path.join(BAD_DIR, "return_above_one.jsonl")
    assert _cli(bad).returncode == 1
    assert _cli(bad, "--reward-transform", "terminal_return:0,2").returncode == 0


def test_multiple_problems_in_one_episode_are_all_reported():
    ep = {"turns": [{"text": 3, "action": False, "x": 1}, {"text": "a", "action": True, "reward": float("nan")}], "id": 1.5}
    _, problems = parse_episode(ep, "f.jsonl", 7)
    fields = sorted(p.field for p in problems)
    assert fields == ["done", "id", "turns[0].text", "turns[0].x", "turns[1].reward"]
    assert all(str(p).startswith("f.jsonl:7: ") for p in problems)


def test_paths_file_glob_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "sub/b.jsonl", "c.txt"):
        (tmp_path / name).write_text("")
    assert resolve_paths(str(tmp_path)) == [str(tmp_path / "a.jsonl"), str(tmp_path / "sub/b.jsonl")]
    assert resolve_paths(str(tmp_path / "*.txt")) == [str(tmp_path / "c.txt")]
    assert resolve_paths([str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl")]) == [str(tmp_path / "a.jsonl")]
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_paths(str(tmp_path / "missing*.jsonl"))


def test_action_that_encodes_to_nothing_is_an_error():
    class DropsEverything:  # a tokenizer without encode_pieces: exercises the per-text fallback too
        vocab_size, bos_id, eos_id, pad_id = 8, 1, 2, 0

        def encode(self, text):
            return [4] if text == "a" else []

    ep = {"turns": [{"text": "a", "action": False}, {"text": "b", "action": True}], "done": True}
    from qsft_jax.data.loading import EpisodeProcessor

    outcome = EpisodeProcessor(DataConfig(max_length=8), DropsEverything())(ep, "f.jsonl", 2)
    assert outcome.status == "invalid"
    assert str(outcome.problems[0]) == "f.jsonl:2: turns[1].text: action text encodes to no tokens"
