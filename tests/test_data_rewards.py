"""The affine reward transform across episode lengths: what it does to the order of returns, and the
warning the data layer gives when that matters."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from qsft_jax.data import DataConfig
from qsft_jax.data.episodes import Episode, Turn
from qsft_jax.data.loading import EpisodeProcessor
from qsft_jax.data.rewards import RewardTransform, transform_rewards


def episode(rewards) -> Episode:
  turns = [Turn("x", False)]
  for r in rewards:
    turns += [Turn("a", True, float(r)), Turn("y", False)]
  return Episode(turns=tuple(turns), done=True)


def transformed_return(rewards, spec: str, gamma: float = 1.0) -> float:
  out, problems = transform_rewards(episode(rewards), RewardTransform.from_config(spec), gamma)
  assert not problems, problems
  return float(sum(gamma**k * r for k, r in enumerate(out[[t.action for t in episode(rewards).turns]])))


def test_affine_example_a_longer_worse_episode_gets_the_higher_return():
  """affine:-1,0,5, gamma 1 (H = 5): 2 turns of -1 (R = -2) -> 0; 5 turns -1,-1,-1,-1,0 (R = -4) -> 1/5."""
  short, long = [-1, -1], [-1, -1, -1, -1, 0]
  assert sum(long) < sum(short)
  np.testing.assert_allclose(transformed_return(short, "affine:-1,0,5"), 0.0, atol=1e-12)
  np.testing.assert_allclose(transformed_return(long, "affine:-1,0,5"), 0.2, rtol=1e-12)
  # terminal_return keeps the original order
  assert transformed_return(long, "terminal_return:-5,0") < transformed_return(short, "terminal_return:-5,0")


def test_affine_return_is_the_closed_form_with_a_per_turn_constant():
  """R' = (R - n low) / ((high - low) H) at gamma = 1: the order of returns is kept at equal lengths and
  across lengths only when low = 0."""
  rng = np.random.default_rng(0)
  for low, high in ((-1.0, 0.0), (0.5, 2.0), (0.0, 3.0)):
    spec = f"affine:{low},{high},6"
    rows = []
    for _ in range(60):
      n = int(rng.integers(1, 7))
      rewards = rng.uniform(low, high, size=n)
      got = transformed_return(rewards, spec)
      np.testing.assert_allclose(got, (rewards.sum() - n * low) / ((high - low) * 6), rtol=1e-9, atol=1e-12)
      rows.append((n, rewards.sum(), got))
    same_length_swaps = sum(1 for a in rows for b in rows
                            if a[0] == b[0] and a[1] < b[1] and a[2] >= b[2])
    swaps = sum(1 for a in rows for b in rows if a[1] < b[1] and a[2] > b[2] + 1e-12)
    assert same_length_swaps == 0
    assert (swaps > 0) == (low != 0.0), (low, swaps)


def process(spec: str, lengths, caplog) -> list[str]:
  processor = EpisodeProcessor(DataConfig.from_config({"reward_transform": spec}))
  with caplog.at_level(logging.WARNING, logger="qsft_jax.data.rewards"):
    caplog.clear()
    for n in lengths:
      assert processor(episode([0.0] * n)).problems == []
  return [r.getMessage() for r in caplog.records if r.name == "qsft_jax.data.rewards"]


@pytest.mark.parametrize("spec,lengths,warns", [
    ("affine:-1,0,6", (2, 2, 5, 3), True),
    ("affine:-1,0,6", (4, 4, 4), False),      # equal lengths: the order is kept
    ("affine:0,1,6", (2, 5), False),           # low = 0 adds nothing per turn
    ("terminal_return:-6,0", (2, 5), False),
])
def test_affine_warns_once_when_lengths_differ(caplog, spec, lengths, warns):
  messages = process(spec, lengths, caplog)
  assert len(messages) == (1 if warns else 0), messages
  if warns:
    assert messages[0].startswith("data.reward_transform: affine") and "\n" not in messages[0]
    assert "2 and 5" in messages[0]
