"""The text-environment interface shared by every bundled task, and the episode recorder.

An environment is a seeded Python object that talks text:

- ``reset(seed) -> str``: the first observation (task prompt and initial state), ending with "\\n".
- ``step(action_text) -> StepResult``: the agent's action is one line; the sampler's stop string
  ``action_stop = "\\n"`` ends it and is stripped before parsing (``parse_action_line``).
  Rewards are in the task's original units. ``info["success"]`` is set on the last step, and
  ``info["truncated"]`` is true when the episode stopped on a time limit while the underlying task
  was still going on (see below).
- attributes ``name``, ``max_turns`` (most agent actions in one episode), ``return_bounds =
  (R_min, R_max)`` (tight bounds of the episode return in original units, for the data layer's
  "normalised terminal return" transform) and ``action_stop``.

Batched play is a list of environments stepped together (``play_batch``); it records episodes in the
JSONL episode format (docs/algorithm.md section 1).

Recording convention:
- the observation that follows the last action of a finished episode (``done = true``) is *omitted*:
  the reward of that action and ``meta["success"]`` already say how it ended, and omitting it keeps
  episodes short and ending in an action;
- an episode stopped by a time limit while its task goes on (``info["truncated"]``, e.g. a chess game
  cut at ``max_turns``) is recorded with ``done = false`` and *ends with* that final observation, so the
  last actions can bootstrap from the state in which the agent would act next (docs/architecture.md).
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, Sequence

ACTION_STOP = "\n"


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What ``step`` returns: the next observation text, the reward (original units), done, info."""

    observation: str
    reward: float
    done: bool
    info: dict


class EnvError(RuntimeError):
    """Raised on misuse of an environment (step before reset, step after done)."""


def parse_action_line(action_text: str) -> str:
    """The action inside ``action_text``: the line without the stop string and surrounding spaces.

    The sampler stops at the first "\\n" and includes it; one trailing stop string is removed. Text that
    still contains a newline is not one line; it is returned as is, so that the task treats it as an
    invalid action (its own rule) rather than this function guessing which line was meant.
    """
    if not isinstance(action_text, str):
        raise TypeError(f"action text must be a str, got {type(action_text).__name__}")
    if action_text.endswith(ACTION_STOP):
        action_text = action_text[: -len(ACTION_STOP)]
    if "\n" in action_text:
        return action_text
    return action_text.strip()


class TextEnv(abc.ABC):
    """Base class: a multi-turn, text in / text out, seeded environment.

    Subclasses implement ``_reset(seed)`` and ``_step(action)`` (``action`` already parsed by
    ``parse_action_line``); this class enforces the call order and counts turns.
    """

    name: str = "text_env"
    max_turns: int = 1
    return_bounds: tuple[float, float] = (0.0, 1.0)
    action_stop: str = ACTION_STOP

    def __init__(self) -> None:
        self._done = True
        self._started = False
        self.turn = 0  # agent actions taken in the current episode

    def reset(self, seed: int) -> str:
        """Start a new episode from ``seed`` (an int); returns the first observation."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self._done = False
        self._started = True
        self.turn = 0
        observation = self._reset(seed)
        assert observation.endswith("\n"), "observations end with a newline"
        return observation

    def step(self, action_text: str) -> StepResult:
        """Take the agent's action (one line, trailing "\\n" optional); returns a ``StepResult``."""
        if not self._started:
            raise EnvError(f"{self.name}: step() called before reset()")
        if self._done:
            raise EnvError(f"{self.name}: step() called after the episode ended; call reset()")
        self.turn += 1
        result = self._step(parse_action_line(action_text))
        if result.done:
            self._done = True
            result.info.setdefault("success", False)
            result.info.setdefault("truncated", False)
        return result

    @property
    def done(self) -> bool:
        """Whether the current episode has ended (true before the first reset)."""
        return self._done

    @abc.abstractmethod
    def _reset(self, seed: int) -> str: ...

    @abc.abstractmethod
    def _step(self, action: str) -> StepResult: ...

    def close(self) -> None:
        """Release external resources (engine processes); a no-op for pure-Python tasks."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


History = list  # list of turn dicts in the episode format, observations and actions alternating
ActFn = Callable[[Sequence[History]], Sequence[str]]


def play_batch(envs: Sequence[TextEnv], seeds: Sequence[int], act_fn: ActFn) -> list[dict]:
    """Play one episode in each environment, stepping them together; returns the episodes.

    ``act_fn(histories) -> action_texts`` is called once per round with the histories (lists of turn
    dicts, episode format, ending with an observation) of the episodes still running, in the order of
    ``envs``, and returns one action text per history. Each returned episode is a dict
    ``{"turns", "done", "id", "meta"}`` with ``meta = {"seed", "return", "success", "truncated"}``
    (return in original units) and ``id = "{env.name}-{seed}"`` (the generators set their own).
    """
    if len(envs) != len(seeds):
        raise ValueError(f"play_batch: {len(envs)} envs but {len(seeds)} seeds")
    if len(set(map(id, envs))) != len(envs):
        raise ValueError("play_batch: the same env object appears twice; pass distinct envs")
    turns: list[list[dict]] = [[{"text": env.reset(int(seed)), "action": False}] for env, seed in zip(envs, seeds)]
    returns = [0.0] * len(envs)
    finished: list[dict | None] = [None] * len(envs)
    active = list(range(len(envs)))
    while active:
        actions = list(act_fn([turns[i] for i in active]))
        if len(actions) != len(active):
            raise ValueError(f"act_fn returned {len(actions)} actions for {len(active)} histories")
        still_active = []
        for i, action in zip(active, actions):
            result = envs[i].step(action)
            if not math.isfinite(result.reward):
                raise ValueError(f"{envs[i].name}: non-finite reward {result.reward}")
            turns[i].append({"text": action, "action": True, "reward": float(result.reward)})
            returns[i] += float(result.reward)
            if not result.done:
                turns[i].append({"text": result.observation, "action": False})
                still_active.append(i)
                continue
            truncated = bool(result.info.get("truncated", False))
            if truncated:
                turns[i].append({"text": result.observation, "action": False})
            finished[i] = {
                "turns": turns[i],
                "done": not truncated,
                "id": f"{envs[i].name}-{int(seeds[i])}",
                "meta": {
                    "seed": int(seeds[i]),
                    "return": returns[i],
                    "success": bool(result.info.get("success", False)),
                    "truncated": truncated,
                },
            }
        active = still_active
    return finished  # type: ignore[return-value]


def episode_summary(episodes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean return (original units, from ``meta["return"]``), success rate and count of episodes."""
    n = len(episodes)
    if n == 0:
        return {"episodes": 0, "mean_return": float("nan"), "success_rate": float("nan")}
    returns = [ep["meta"]["return"] for ep in episodes]
    return {
        "episodes": n,
        "mean_return": sum(returns) / n,
        "success_rate": sum(bool(ep["meta"]["success"]) for ep in episodes) / n,
    }
