"""Bad training data meets the trainer: it is found before the first step, named by file and line, and
nothing is trained or checkpointed; the start-up summary of truncations and drops.

The trainer runs in subprocesses (tests/trainer_utils.py) on configs/tiny.py.
"""
from __future__ import annotations

import itertools
import json
import os
import re

import pytest

import trainer_utils as tu


def _maze_lines(count: int) -> list[str]:
  from qsft_jax.envs import generate_episodes

  episodes = [json.dumps(e) for e in generate_episodes("maze", 64, 0)]
  return list(itertools.islice(itertools.cycle(episodes), count))


def test_bad_lines_at_the_end_of_a_large_file_stop_the_run_before_step_1(tmp_path):
  n = 3000
  lines = _maze_lines(n)
  lines[n - 3] = lines[n - 3][:-3]  # line 2998: cut short
  bad = json.loads(lines[n - 1])
  bad["turns"][0]["text"] = "Maz\u00e9\u00e9\u4e2d " + bad["turns"][0]["text"]
  lines[n - 1] = json.dumps(bad, ensure_ascii=False)  # line 3000: characters outside the alphabet
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  workdir = str(tmp_path / "run")
  proc = tu.start(workdir, f"--config.data.path={path}", "--config.eval.enabled=False")
  rc = tu.wait(proc)
  out = tu.output(proc)
  assert rc != 0, out[-3000:]
  assert f"2 of {n} episodes are invalid" in out, out[-3000:]
  assert f"{path}:2998: json: malformed JSON" in out
  assert (f"{path}:3000: turns[0].text: characters outside the tokenizer's alphabet: '\u00e9' (U+00E9), "
          "'\u4e2d' (U+4E2D)") in out
  assert "bc step" not in out
  for phase in ("bc", "qsft"):  # nothing trained, nothing checkpointed
    assert not os.path.exists(os.path.join(workdir, phase)), os.listdir(workdir)


@pytest.mark.slow  # free in a full run: the trainer tests' shared reference run
def test_start_up_summary_counts_what_max_length_cut():
  workdir = tu.reference_run()
  with open(f"{workdir}.log0.txt", errors="replace") as f:
    log = f.read()
  train = os.path.join(workdir, "data", "train.jsonl")
  with open(train) as f:
    episodes = [json.loads(line) for line in f if line.strip()]
  # Char tokenizer: one token per character, plus BOS; tiny.py's data.max_length is 128.
  overlong = sum(1 + sum(len(t["text"]) for t in e["turns"]) > 128 for e in episodes)
  match = re.search(rf"^data \({re.escape(train)}\): (\d+) of {len(episodes)} episodes truncated, "
                    r"(\d+) dropped for data.max_length=128 \(data.overlong='truncate'\); (\d+) kept",
                    log, re.MULTILINE)
  assert match, log[:3000]
  truncated, dropped, kept = map(int, match.groups())
  assert truncated + dropped == overlong and kept == len(episodes) - dropped
  tensorboard = os.path.join(workdir, "data", "tensorboard")
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tensorboard))
