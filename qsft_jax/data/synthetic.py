"""Small synthetic episode generators for tests and the input-pipeline benchmark (no environment needed).

``wordle_like_episodes`` imitates the shape of a Wordle log: a prompt, then up to six guesses of five
letters each followed by a feedback line; reward 1 on the guess that solves it (so returns are in
[0, 1]), done = true when solved or out of guesses, and sometimes a cut-off episode (done = false,
ending on feedback). Deterministic for a seed.
"""
from __future__ import annotations

import string
from typing import Iterator

import numpy as np


def wordle_like_episodes(num_episodes: int, seed: int = 0, max_guesses: int = 6) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    for i in range(num_episodes):
        answer = "".join(rng.choice(letters, 5))
        turns = [{"text": "Wordle. Guess the 5-letter word.\n", "action": False}]
        solved_at = int(rng.integers(1, max_guesses + 2))  # > max_guesses: never solved
        cut_at = int(rng.integers(1, max_guesses + 1)) if rng.random() < 0.1 else None
        done = True
        for g in range(1, max_guesses + 1):
            guess = answer if g == solved_at else "".join(rng.choice(letters, 5))
            solved = guess == answer
            turns.append({"text": guess + "\n", "action": True, "reward": 1.0 if solved else 0.0})
            feedback = " ".join("g" if a == b else ("y" if a in answer else "b") for a, b in zip(guess, answer))
            if solved:
                break
            turns.append({"text": feedback + "\n", "action": False})
            if cut_at is not None and g == cut_at:
                done = False  # cut off after a feedback line: bootstraps from the last row
                break
        yield {"turns": turns, "done": done, "id": f"wordle-{seed}-{i}"}
