"""The trainer's data check before its first step (qsft_jax.data.preflight), the character policy of the
char tokenizer (data.unknown_chars), the truncation / drop summary and its TensorBoard scalars, and the
validator naming every dropped line.

Expected lines, counts and token positions are written out from the test's own episodes (one token per
character plus BOS for the char tokenizer), never read back from the code under test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from qsft_jax.data import DataConfig, DataError, EpisodeError, preflight, validate_paths
from qsft_jax.data.loading import EpisodeProcessor
from qsft_jax.errors import UserError
from qsft_jax.tokenizers import CharTokenizer
from tensorboard_events import read_scalars

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def episode(obs: str = "start\n", act: str = "go", reward: float = 1.0, done: bool = True) -> dict:
  return {"turns": [{"text": obs, "action": False}, {"text": act, "action": True, "reward": reward}],
          "done": done}


def long_episode(n_obs: int) -> dict:
  """obs (n_obs chars), action "a", obs "x", action "b" (reward 1): 1 + n_obs + 1 + 1 + 1 tokens."""
  return {"turns": [{"text": "o" * n_obs, "action": False}, {"text": "a", "action": True},
                    {"text": "x", "action": False}, {"text": "b", "action": True, "reward": 1.0}],
          "done": True}


def write_lines(path, lines: list[str]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


# ------------------------------------------------------------------------------------------------
# Invalid episodes: found before anything is trained, named by line


def test_large_file_with_bad_lines_near_the_end_is_rejected_naming_them(tmp_path):
  n = 4000
  good = json.dumps(episode(obs="start of a rather long observation\n" * 8))
  lines = [good] * n
  lines[3990 - 1] = good[:-5]  # cut short: malformed JSON
  lines[3995 - 1] = json.dumps(episode(obs="Maz\u00e9\u00e9\u4e2d\n"), ensure_ascii=False)
  lines[n - 1] = json.dumps({"turns": episode()["turns"]})  # no "done"
  path = write_lines(tmp_path / "big.jsonl", lines)
  tracemalloc.start()
  try:
    with pytest.raises(EpisodeError) as err:
      preflight(DataConfig(path=path, max_length=512), CharTokenizer(), echo=False)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert isinstance(err.value, UserError)
  message = str(err.value).splitlines()
  assert message[0] == (f"data ({path}): 3 of {n} episodes are invalid (3 problems); no step was run. "
                        "Fix or remove these lines, then run again:")
  assert message[1].startswith(f"{path}:3990: json: malformed JSON")
  assert message[2] == (f"{path}:3995: turns[0].text: characters outside the tokenizer's alphabet: "
                        "'\u00e9' (U+00E9), '\u4e2d' (U+4E2D); replace them, use a tokenizer whose "
                        "alphabet holds them (char:PATH.json), or set data.unknown_chars='unk' to "
                        "encode them as the unknown token")
  assert message[3].startswith(f"{path}:{n}: done: missing field")
  assert len(message) == 4
  # Streamed: the file (about 1.2 MB) is never held in memory, as lines or as episodes.
  assert os.path.getsize(path) > 1_000_000 and peak < 400_000, peak


def test_first_problems_are_listed_and_the_rest_counted(tmp_path):
  lines = [json.dumps(episode())] * 10 + ['{"turns": 1}'] * 30  # each bad line: 2 problems
  path = write_lines(tmp_path / "bad.jsonl", lines)
  with pytest.raises(EpisodeError) as err:
    preflight(DataConfig(path=path, max_length=64), CharTokenizer(), max_problems=5, echo=False)
  message = str(err.value).splitlines()
  assert "30 of 40 episodes are invalid (60 problems)" in message[0]
  assert message[1:6] == [f"{path}:11: done: missing field (true if the episode finished, false if it "
                          "was cut off)", f"{path}:11: turns: expected a list of turns, got int",
                          f"{path}:12: done: missing field (true if the episode finished, false if it "
                          "was cut off)", f"{path}:12: turns: expected a list of turns, got int",
                          f"{path}:13: done: missing field (true if the episode finished, false if it "
                          "was cut off)"]
  assert message[6] == "... and 55 more problems (python -m qsft_jax.data validate lists every one)"
  assert len(err.value.problems) == 5 and err.value.more == 55


def test_missing_empty_and_exhausted_data_are_user_errors(tmp_path):
  tok = CharTokenizer()
  with pytest.raises(DataError, match=r"^data.path: .*missing.jsonl: no such file"):
    preflight(DataConfig(path=str(tmp_path / "missing.jsonl")), tok, echo=False)
  empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
  with pytest.raises(DataError, match=r"^data.path: .*empty.jsonl holds no episodes"):
    preflight(DataConfig(path=empty), tok, echo=False)
  long_ = write_lines(tmp_path / "long.jsonl", [json.dumps(long_episode(40))] * 3)
  with pytest.raises(DataError, match=r"^data.max_length: no episode is left to train on: .*3 dropped"):
    preflight(DataConfig(path=long_, max_length=16, overlong="drop"), tok, echo=False)
  assert issubclass(DataError, UserError)


def test_bad_data_config_fields_are_user_errors_naming_the_field():
  for fields, pattern in [({"max_length": 0}, r"^data.max_length: must be >= 2, got 0"),
                          ({"unknown_chars": "ignore"}, r"^data.unknown_chars: expected one of"),
                          ({"overlong": "cut"}, r"^data.overlong: expected one of"),
                          ({"reward_transform": "scale"}, r"^data.reward_transform.kind: unknown kind"),
                          ({"reward_transform": "affine:0,1"}, r"^data.reward_transform: affine with "
                           "gamma = 1 needs max_turns"),
                          ({"pack_window": 0}, r"^data.pack_window: must be >= 1")]:
    with pytest.raises(DataError, match=pattern):
      DataConfig(**fields)
  DataConfig(reward_transform="affine:0,1", gamma=0.9)  # a finite horizon without max_turns


# ------------------------------------------------------------------------------------------------
# Characters outside the char tokenizer's alphabet


def test_unknown_characters_error_by_default_and_unk_on_request(tmp_path):
  text = "Maz\u00e9\u00e9\u4e2d\n"
  path = write_lines(tmp_path / "a.jsonl", [json.dumps(episode()),
                                            json.dumps(episode(obs=text, act="g\u00f6"))])
  problems, summary = validate_paths(path, DataConfig(max_length=64), CharTokenizer())
  assert [str(p) for p in problems] == [
      f"{path}:2: turns[0].text: characters outside the tokenizer's alphabet: '\u00e9' (U+00E9), "
      "'\u4e2d' (U+4E2D); replace them, use a tokenizer whose alphabet holds them (char:PATH.json), "
      "or set data.unknown_chars='unk' to encode them as the unknown token",
      f"{path}:2: turns[1].text: characters outside the tokenizer's alphabet: '\u00f6' (U+00F6); "
      "replace them, use a tokenizer whose alphabet holds them (char:PATH.json), or set "
      "data.unknown_chars='unk' to encode them as the unknown token"]
  assert summary.invalid == 1 and summary.kept == 1

  tok = CharTokenizer()
  config = DataConfig(max_length=64, unknown_chars="unk")
  outcome = EpisodeProcessor(config, tok)(episode(obs=text, act="g\u00f6"), "f", 1)
  assert outcome.status == "kept" and outcome.unknown_chars
  tokens = outcome.arrays["tokens"]
  full = text + "g\u00f6"  # token i + 1 is character i (BOS first)
  expected_unk = [i + 1 for i, c in enumerate(full) if not (c.isascii() and c.isprintable() or c == "\n")]
  assert expected_unk == [4, 5, 6, 9]
  assert np.flatnonzero(tokens == 3).tolist() == expected_unk
  summary = preflight(DataConfig(path=path, max_length=64, unknown_chars="unk"), tok, echo=False)
  assert summary.kept == 2 and summary.unknown_chars == 1


def test_acting_tokenises_what_the_policy_emitted():
  """The policy is for data files: a history holding the unk token's text (what a sampled unk decodes
  to) still tokenises for the next prompt, as the unk id."""
  from qsft_jax.data.episodes import Episode, Turn
  from qsft_jax.data.mdp import tokenize_episode

  tok = CharTokenizer()
  history = Episode((Turn("start\n", False), Turn("g" + tok.decode([tok.unk_id]), True)), done=False)
  tokenized, problems = tokenize_episode(history, np.zeros(2), tok, DataConfig().mdp)
  assert not problems
  assert tokenized.tokens.tolist() == [tok.bos_id] + tok.encode("start\ng") + [tok.unk_id]


def test_characters_from_a_template_are_named_as_such():
  config = DataConfig(max_length=64, observation_template="\u00ab {text}")
  outcome = EpisodeProcessor(config, CharTokenizer())(episode(), "f.jsonl", 3)
  assert [str(p) for p in outcome.problems] == [
      "f.jsonl:3: turns[0].text: characters outside the tokenizer's alphabet: '\u00ab' (U+00AB) "
      "(some from data.observation_template); replace them, use a tokenizer whose alphabet holds them "
      "(char:PATH.json), or set data.unknown_chars='unk' to encode them as the unknown token"]


def test_tokenizers_without_an_alphabet_are_not_checked():
  class Bytes:  # every string encodes (byte fallback), like a byte-level BPE: no unknown_characters
    vocab_size, bos_id, eos_id, pad_id = 260, 256, 257, 258

    def encode(self, text):
      return list(text.encode("utf-8"))

  outcome = EpisodeProcessor(DataConfig(max_length=64), Bytes())(episode(obs="\u4e2d"), "f", 1)
  assert outcome.status == "kept" and not outcome.unknown_chars
  assert outcome.arrays["tokens"].tolist()[:4] == [256, 0xE4, 0xB8, 0xAD]


def test_char_tokenizer_unknown_characters():
  tok = CharTokenizer("ab\n")
  assert tok.unknown_characters("abc\u00e9a\U0001F600c\n") == "c\u00e9\U0001F600"
  assert tok.unknown_characters("ab\n") == tok.unknown_characters("") == ""
  assert CharTokenizer().unknown_characters("tab\there\r") == "\r"  # \r is outside the default alphabet


# ------------------------------------------------------------------------------------------------
# Truncations and drops: one start-up line, TensorBoard scalars, every dropped line from validate


def _dataset(tmp_path) -> tuple[str, list[int], list[int]]:
  """20 episodes; with max_length 24 the ones of more than 24 tokens are over-long. Returns the path,
  the over-long lines, and those among them for which a prefix ending on an observation fits."""
  sizes = [3, 30, 5, 40, 2, 19, 25, 8, 50, 21, 1, 33, 4, 60, 22, 9, 70, 6, 18, 45]
  path = write_lines(tmp_path / "mixed.jsonl", [json.dumps(long_episode(s)) for s in sizes])
  overlong = [i + 1 for i, s in enumerate(sizes) if s + 4 > 24]
  # A prefix must hold the first action and end on the observation after it: 1 + s + 1 + 1 tokens.
  truncatable = [i + 1 for i, s in enumerate(sizes) if s + 4 > 24 and s + 3 <= 24]
  return path, overlong, truncatable


def test_start_up_line_counts_truncations_and_names_the_first_dropped(tmp_path, capsys):
  path, overlong, truncatable = _dataset(tmp_path)
  assert len(overlong) == 10 and truncatable == [10]
  preflight(DataConfig(path=path, max_length=24, overlong="drop"), CharTokenizer())
  line = capsys.readouterr().out.strip()
  first = ", ".join(f"{path}:{n}" for n in overlong[:5])
  assert line == (f"data ({path}): 0 of 20 episodes truncated, 10 dropped for data.max_length=24 "
                  f"(data.overlong='drop'); 10 kept; dropped: {first} and 5 more")
  summary = preflight(DataConfig(path=path, max_length=24), CharTokenizer())
  line = capsys.readouterr().out.strip()
  not_truncatable = [n for n in overlong if n not in truncatable]
  assert line == (f"data ({path}): 1 of 20 episodes truncated, 9 dropped for data.max_length=24 "
                  f"(data.overlong='truncate'); 11 kept; dropped: "
                  f"{', '.join(f'{path}:{n}' for n in not_truncatable[:5])} and 4 more")
  assert summary.truncated == 1 and summary.num_dropped == 9


def test_tensorboard_scalars_under_data(tmp_path):
  path, overlong, truncatable = _dataset(tmp_path)
  tb = str(tmp_path / "tb")
  preflight(DataConfig(path=path, max_length=24), CharTokenizer(), tensorboard_dir=tb, echo=False)
  scalars = read_scalars(tb)
  dropped = len(overlong) - len(truncatable)
  assert scalars["data/episodes"] == [(0, 20.0)]
  assert scalars["data/kept"] == [(0, 20.0 - dropped)]
  assert scalars["data/truncated"] == [(0, float(len(truncatable)))]
  assert scalars["data/dropped"] == [(0, float(dropped))]
  assert scalars["data/dropped_fraction"] == [(0, pytest.approx(dropped / 20))]
  assert scalars["data/truncated_fraction"] == [(0, pytest.approx(len(truncatable) / 20))]
  assert scalars["data/unknown_chars"] == [(0, 0.0)]


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "qsft_jax.data", "validate", *args], capture_output=True,
                        text=True, cwd=REPO_ROOT)


def test_validate_names_every_dropped_line_and_unknown_characters(tmp_path):
  path, overlong, _ = _dataset(tmp_path)
  result = _cli(path, "--max-length", "24", "--overlong", "drop")
  assert result.returncode == 0, result.stdout + result.stderr
  dropped = [line for line in result.stdout.splitlines() if ": dropped: " in line]
  assert dropped == [f"{path}:{n}: dropped: longer than max_length=24" for n in overlong]
  bad = write_lines(tmp_path / "bad.jsonl", [json.dumps(episode(obs="Maz\u00e9\n"), ensure_ascii=False)])
  result = _cli(bad)  # no --max-length: the characters are still checked
  assert result.returncode == 1
  assert f"{bad}:1: turns[0].text: characters outside the tokenizer's alphabet: '\u00e9'" in result.stdout
  result = _cli(bad, "--unknown-chars", "unk")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "kept with characters encoded as unk: 1" in result.stdout


def test_in_memory_batches_report_a_dropped_episode_as_a_user_error():
  from qsft_jax.data import episodes_to_batch

  with pytest.raises(DataError, match=r"^<episodes>:2: episode dropped: longer than max_length=16"):
    episodes_to_batch([episode(), long_episode(40)], DataConfig(max_length=16, overlong="drop"),
                      CharTokenizer())
