"""Reward transforms: map a task's rewards so that every discounted return-to-go lies in [0, 1].

Q-SFT reads probabilities as Q-values, so every return must be in [0, 1]. ``RewardTransform.kind``:

- ``"none"``: rewards are used as they are. Every action turn's discounted return-to-go
  ``G_j = r_j + gamma * G_{j+1}`` (over the episode's action turns, with gamma_token taken as 1) must lie
  in [0, 1]; otherwise the episode is rejected and the offending return reported. (The token-level
  returns are checked again after tokenisation, where gamma_token is known.)
- ``"affine"``: declared per-step bounds ``low <= r <= high`` and a horizon ``max_turns`` (the most action
  turns an episode may have; may be left out when gamma < 1). With ``H = sum_{k < max_turns} gamma^k``
  (or ``1 / (1 - gamma)`` when max_turns is unset), each action turn's reward becomes

      r' = (r - low) / ((high - low) * H)

  so r' is in [0, 1/H] and any discounted sum over at most max_turns turns is in [0, 1]. A missing reward
  counts as 0 in original units and is transformed like any other. Rewards outside [low, high] and
  episodes with more than max_turns action turns are errors.

  The map is per step, so it adds ``-low / ((high - low) H)`` to the return for every action turn:
  an episode of n action turns with original return R gets (gamma = 1)
  ``R' = (R - n low) / ((high - low) H)``. Among episodes of equal length the order of returns is kept;
  across lengths it is not unless ``low = 0``. With ``low < 0`` every extra turn is a bonus: e.g.
  ``affine:-1,0,5`` (rewards -1 or 0 per step) gives 2 turns of -1 (R = -2) ``R' = 0`` but 5 turns
  -1, -1, -1, -1, 0 (R = -4) ``R' = 1/5``, so the longer, worse episode becomes the better one; with
  ``low > 0`` longer episodes are penalised. The values Q-SFT learns then rank actions by the
  transformed return. ``AffineLengthWarning`` logs one warning when a data set with episodes of
  different lengths goes through such a transform; for returns that must keep their order, use
  ``terminal_return`` (order-preserving for gamma = 1) or rewards with ``low = 0``.
- ``"terminal_return"``: the episode's undiscounted total ``R = sum_j r_j`` becomes
  ``R' = (R - low) / (high - low)`` (low = R_min, high = R_max, declared) on the final action turn; every
  other reward is 0. Order-preserving for gamma = 1. ``R`` outside [low, high] is an error.

Evaluation reports original units: ``original_step_reward`` and ``original_return`` invert the maps.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping

import numpy as np

from qsft_jax.data.episodes import Episode, Problem

log = logging.getLogger(__name__)

KINDS = ("none", "affine", "terminal_return")
RETURN_TOLERANCE = 1e-6  # float slack on the [0, 1] bounds


@dataclasses.dataclass(frozen=True)
class RewardTransform:
    """A reward transform spec; ``low``/``high`` are per-step bounds (affine) or R_min/R_max (terminal_return)."""

    kind: str = "none"
    low: float | None = None
    high: float | None = None
    max_turns: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"reward_transform.kind: unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.kind in ("affine", "terminal_return"):
            if self.low is None or self.high is None:
                raise ValueError(f"reward_transform: kind {self.kind!r} needs declared low and high bounds")
            if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
                raise ValueError(f"reward_transform: need finite low < high, got low={self.low}, high={self.high}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"reward_transform.max_turns: must be >= 1, got {self.max_turns}")

    @classmethod
    def from_config(cls, spec: Any) -> "RewardTransform":
        """Accepts a RewardTransform, None, a string ("none", "affine:LOW,HIGH[,MAX_TURNS]",
        "terminal_return:RMIN,RMAX") or a mapping / ConfigDict with the dataclass's fields."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            kind, _, args = spec.partition(":")
            values = [a.strip() for a in args.split(",")] if args else []
            try:
                low = float(values[0]) if len(values) > 0 else None
                high = float(values[1]) if len(values) > 1 else None
                max_turns = int(values[2]) if len(values) > 2 else None
            except ValueError:
                raise ValueError(f"reward_transform: cannot parse {spec!r}; expected KIND[:LOW,HIGH[,MAX_TURNS]]") from None
            if len(values) > 3:
                raise ValueError(f"reward_transform: too many values in {spec!r}")
            return cls(kind.strip(), low, high, max_turns)
        if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
            spec = spec.to_dict()
        if isinstance(spec, Mapping):
            unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"reward_transform: unknown fields {sorted(unknown)}")
            return cls(**spec)
        raise TypeError(f"reward_transform: cannot build from {type(spec).__name__}")

    def horizon(self, gamma: float) -> float:
        """H = sum_{k < max_turns} gamma^k (affine scale)."""
        if self.max_turns is not None:
            return float(sum(gamma**k for k in range(self.max_turns)))
        if gamma < 1.0:
            return 1.0 / (1.0 - gamma)
        raise ValueError("reward_transform: affine with gamma = 1 needs max_turns (the longest episode, in action turns)")

    def original_step_reward(self, transformed: np.ndarray | float, gamma: float = 1.0):
        """Inverse of the per-step map (affine / none). terminal_return has no per-step inverse."""
        if self.kind == "none":
            return transformed
        if self.kind == "affine":
            return np.asarray(transformed) * (self.high - self.low) * self.horizon(gamma) + self.low
        raise ValueError("terminal_return has no per-step inverse; use original_return")

    def original_return(self, transformed_return, num_action_turns=None, gamma: float = 1.0):
        """Maps a transformed (discounted from the first action turn) return back to original units.

        affine needs ``num_action_turns`` (each contributes ``low`` before scaling): the original return is
        ``(high - low) * H * G' + low * sum_{k < n} gamma^k``.
        """
        g = np.asarray(transformed_return, dtype=np.float64)
        if self.kind == "none":
            return g
        if self.kind == "terminal_return":
            return g * (self.high - self.low) + self.low
        if num_action_turns is None:
            raise ValueError("affine original_return needs num_action_turns")
        n = np.asarray(num_action_turns, dtype=np.float64)
        offset = n if gamma == 1.0 else (1.0 - gamma**n) / (1.0 - gamma)  # sum_{k < n} gamma^k
        return g * (self.high - self.low) * self.horizon(gamma) + self.low * offset


def turn_returns_to_go(action_rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_j = r_j + gamma * G_{j+1} over the action turns. [num_action_turns] -> [num_action_turns]."""
    out = np.zeros(len(action_rewards), dtype=np.float64)
    acc = 0.0
    for j in range(len(action_rewards) - 1, -1, -1):
        acc = action_rewards[j] + gamma * acc
        out[j] = acc
    return out


def transform_rewards(episode: Episode, transform: RewardTransform, gamma: float) -> tuple[np.ndarray | None, list[Problem]]:
    """Per-turn transformed rewards, float64 [num_turns] (0 on observation turns), or (None, problems)."""
    is_action = np.array([t.action for t in episode.turns])
    original = np.array([t.reward for t in episode.turns], dtype=np.float64)
    action_turns = np.flatnonzero(is_action)
    problems: list[Problem] = []

    def bad(field: str, message: str) -> None:
        problems.append(Problem(episode.file, episode.line, field, message))

    if transform.kind == "none":
        out = original
        g = turn_returns_to_go(out[action_turns], gamma)
        outside = np.flatnonzero((g < -RETURN_TOLERANCE) | (g > 1 + RETURN_TOLERANCE))
        if len(outside):
            k = outside[0]
            bad(
                f"turns[{action_turns[k]}].reward",
                f"discounted return-to-go {g[k]:g} from this turn is outside [0, 1] (gamma={gamma:g}); "
                "rescale the rewards or configure a reward transform (affine or terminal_return)",
            )
            return None, problems
        return out, []
    if transform.kind == "affine":
        if transform.max_turns is not None and len(action_turns) > transform.max_turns:
            bad("turns", f"{len(action_turns)} action turns exceed reward_transform.max_turns={transform.max_turns}")
        for j in action_turns:
            r = original[j]
            if not transform.low <= r <= transform.high:
                note = " (a missing reward counts as 0)" if r == 0.0 else ""
                bad(f"turns[{j}].reward", f"reward {r:g} outside the declared bounds [{transform.low:g}, {transform.high:g}]{note}")
        if problems:
            return None, problems
        scale = (transform.high - transform.low) * transform.horizon(gamma)
        return np.where(is_action, (original - transform.low) / scale, 0.0), []
    # terminal_return
    total = float(original[action_turns].sum())
    if not transform.low <= total <= transform.high:
        bad("turns", f"episode return {total:g} outside the declared [R_min, R_max] = [{transform.low:g}, {transform.high:g}]")
        return None, problems
    out = np.zeros(len(episode.turns), dtype=np.float64)
    out[action_turns[-1]] = (total - transform.low) / (transform.high - transform.low)
    return out, []


class AffineLengthWarning:
    """Logs one warning, naming ``data.reward_transform``, once episodes with different numbers of
    action turns have gone through an affine transform with ``low != 0``: it adds
    ``-low / ((high - low) H)`` per turn, which reorders returns across episode lengths (module
    docstring). Other transforms never warn.

    ``see(episode)`` after each transformed episode; ``warned`` tells whether the warning was given.
    """

    def __init__(self, transform: RewardTransform):
        self.active = transform.kind == "affine" and transform.low != 0.0
        self.transform = transform
        self.lengths: set[int] = set()
        self.warned = False

    def see(self, episode: Episode) -> None:
        if not self.active or self.warned:
            return
        self.lengths.add(sum(1 for t in episode.turns if t.action))
        if len(self.lengths) > 1:
            self.warned = True
            t = self.transform
            step = -t.low / (t.high - t.low)
            log.warning(
                "data.reward_transform: affine low=%g != 0 adds %g / H to the return per action turn and "
                "the data has episodes of %s action turns, so a longer episode can outrank a better "
                "shorter one (qsft_jax/data/rewards.py); terminal_return keeps the order",
                t.low, step, " and ".join(str(n) for n in sorted(self.lengths)))
