"""Twenty Questions: the oracle against the raw table and hand-written facts, the question language,
rewards and the question limit, the optimal return against an exhaustive search, the trap policy."""
from __future__ import annotations

import collections
import os
from fractions import Fraction

import pytest

from qsft_jax import config_lib
from qsft_jax.envs import generate_episodes, make_env
from qsft_jax.envs.base import EnvError
from qsft_jax.envs.policies import informative_question, redundant_question
from qsft_jax.envs.twenty_questions import (
    NO,
    PROMPT,
    UNKNOWN,
    YES,
    TwentyQuestionsEnv,
    object_subset,
    optimal_total_questions,
    parse_question,
    question_text,
)
from qsft_jax.envs.twenty_questions_kb import ATTRIBUTES, OBJECTS
from qsft_jax.models.config import get_preset

RAW = {name: (category, set(attrs)) for name, category, attrs in OBJECTS}


def raw_truth(name: str, key: str) -> bool:
    """The table row itself: the category is an attribute, every unlisted attribute is false."""
    category, attrs = RAW[name]
    return key == category or key in attrs


def env_with(secret: str, **kwargs) -> TwentyQuestionsEnv:
    env = TwentyQuestionsEnv(**kwargs)
    for seed in range(10_000):
        if env.reset(seed) == PROMPT and env.secret == secret:
            return env
    raise AssertionError(f"no seed hides {secret}")


def test_knowledge_base_shape():
    assert len(OBJECTS) == len(RAW) == 176  # names are unique
    assert collections.Counter(c for _, c, _ in OBJECTS) == {
        "animal": 46, "food": 45, "household": 46, "vehicle": 22, "instrument": 17}
    keys = [k for k, _ in ATTRIBUTES]
    assert len(keys) == len(set(keys)) == 46
    assert all(len(phrasings) >= 2 for _, phrasings in ATTRIBUTES)
    assert all(set(attrs) <= set(keys) for _, attrs in RAW.values())


HAND_FACTS = [  # (object, question, answer): common knowledge, written independently of the table
    ("cat", "Does it have fur?", YES), ("cat", "Can it fly?", NO), ("cat", "Is it a pet?", YES),
    ("bat", "Can it fly?", YES), ("bat", "Is it a mammal?", YES), ("bat", "Is it a bird?", NO),
    ("whale", "Is it a fish?", NO), ("whale", "Does it live in water?", YES), ("penguin", "Can it fly?", NO),
    ("shark", "Is it a fish?", YES), ("cow", "Is it a farm animal?", YES), ("elephant", "Is it big?", YES),
    ("bee", "Is it an insect?", YES), ("spider", "Is it an insect?", NO), ("snake", "Is it a reptile?", YES),
    ("mouse", "Can you hold it in one hand?", YES), ("apple", "Is it a fruit?", YES),
    ("apple", "Is it red?", YES), ("banana", "Is it yellow?", YES), ("lemon", "Is it sweet?", NO),
    ("carrot", "Is it a vegetable?", YES), ("milk", "Can you drink it?", YES),
    ("milk", "Does it come from an animal?", YES), ("bread", "Is it an animal?", NO),
    ("coconut", "Does it grow on trees?", YES), ("watermelon", "Is it bigger than a breadbox?", YES),
    ("knife", "Is it sharp?", YES), ("fork", "Is it made of metal?", YES), ("chair", "Is it furniture?", YES),
    ("refrigerator", "Does it use electricity?", YES), ("pillow", "Is it electric?", NO),
    ("hammer", "Is it a tool?", YES), ("window", "Is it made of glass?", YES),
    ("spoon", "Is it used in the kitchen?", YES), ("car", "Does it have wheels?", YES),
    ("car", "Can it fly?", NO), ("airplane", "Can it fly?", YES), ("bicycle", "Does it have an engine?", NO),
    ("train", "Does it run on rails?", YES), ("canoe", "Does it go on water?", YES),
    ("bus", "Is it public transport?", YES), ("fire truck", "Is it red?", YES),
    ("rocket", "Is it a vehicle?", YES), ("piano", "Does it have keys?", YES),
    ("guitar", "Does it have strings?", YES), ("trumpet", "Do you blow into it?", YES),
    ("drum", "Does it have strings?", NO), ("violin", "Is it a musical instrument?", YES),
    ("harp", "Is it food?", NO),
]


@pytest.mark.parametrize("name,question,answer", HAND_FACTS)
def test_oracle_agrees_with_hand_written_facts(name, question, answer):
    env = TwentyQuestionsEnv(objects=[name])
    env.reset(0)
    assert env.answer(question) == answer


def test_every_object_and_attribute_through_every_phrasing_matches_the_table():
    env = TwentyQuestionsEnv()
    for name in RAW:
        env.secret = name
        for key, phrasings in ATTRIBUTES:
            expected = YES if raw_truth(name, key) else NO
            for text in phrasings:
                variants = (text, text.lower(), text.upper(), text.rstrip("?"), "  " + text.replace(" ", "  ") + " ",
                            text.replace("?", " ?!"))
                for variant in variants:
                    assert env.answer(variant) == expected, (name, variant)


def test_phrasings_parse_to_their_own_attribute_and_guesses_to_objects():
    for key, phrasings in ATTRIBUTES:
        for text in phrasings:
            assert parse_question(text) == ("attribute", key), text
    for name in RAW:
        for text in (f"Is it a {name}?", f"Is it an {name}?", f"is it the {name}", f"IS IT {name.upper()}?!",
                     f"is it {name}"):
            assert parse_question(text) == ("guess", name), text


@pytest.mark.parametrize("question", [
    "Is it a unicorn?", "What is it?", "", "Is it an animal? Is it red?", "animal", "Is it a fish or a bird?",
    "Is it cats?", "Does it have fur", "Is it a", "Is it red and big?", "Is it", "it a cat"])
def test_anything_else_is_not_understood_and_costs_a_question(question):
    if question == "Does it have fur":  # a missing question mark is fine
        assert parse_question(question) == ("attribute", "fur")
        return
    env = env_with("cat")
    result = env.step(question + "\n")
    assert (result.observation, result.reward, result.done) == (UNKNOWN + "\n", -1.0, False)
    assert env.history == []  # nothing learnt


def test_guesses_rewards_and_the_end_of_the_game():
    env = env_with("apple", num_objects=0)
    assert env.step("Is it a cat?\n").observation == NO + "\n"
    result = env.step("Is it a fruit?")
    assert (result.observation, result.reward, result.done) == ("Yes.\n", -1.0, False)
    result = env.step("is it an APPLE")
    assert (result.observation, result.reward, result.done, result.info["success"]) == ("Yes.\n", 0.0, True, True)
    with pytest.raises(EnvError):
        env.step("Is it a fruit?")
    # a guess of a knowledge-base object outside the game is a wrong guess
    env = env_with("cat", objects=["cat", "dog"])
    assert env.step("Is it a piano?").observation == NO + "\n"


@pytest.mark.parametrize("max_questions", [20, 3])
def test_question_limit(max_questions):
    env = env_with("tram", max_questions=max_questions)
    assert env.max_turns == max_questions and env.return_bounds == (-float(max_questions), 0.0)
    total = 0.0
    for k in range(max_questions):
        result = env.step("Is it big?")
        total += result.reward
        assert result.done == (k == max_questions - 1)
    assert total == -max_questions and not result.info["success"] and not result.info["truncated"]
    env = env_with("tram", max_questions=max_questions)
    for _ in range(max_questions - 1):
        env.step("Is it a cat?")
    result = env.step("Is it a tram?")  # the right guess as the last question
    assert result.done and result.info["success"] and result.reward == 0.0


def test_object_sets():
    assert object_subset(16) == ("cat", "hamster", "bat", "ostrich", "deer", "peach", "cucumber", "ice cream",
                                 "steak", "door", "cup", "blanket", "basket", "tram", "tractor", "trumpet")
    assert object_subset(176) == tuple(RAW)
    vehicles = tuple(n for n, (c, _) in RAW.items() if c == "vehicle")
    assert TwentyQuestionsEnv(categories=["vehicle"]).objects == vehicles
    assert len(TwentyQuestionsEnv().objects) == 176
    assert make_env("twenty_questions", num_objects=16).objects == object_subset(16)
    env = TwentyQuestionsEnv(num_objects=16)
    assert {(env.reset(s), env.secret)[1] for s in range(400)} == set(object_subset(16))
    for kwargs, match in [({"num_objects": 177}, "num_objects"), ({"categories": ["plant"]}, "categories"),
                          ({"objects": ["unicorn"]}, "unknown"),
                          ({"objects": ["cat"], "num_objects": 2}, "at most one"),
                          ({"max_questions": 0}, "max_questions")]:
        with pytest.raises(ValueError, match=match):
            TwentyQuestionsEnv(**kwargs)


# ---- the optimal strategy, by exhaustive search over question trees ----
def all_trees(objects: frozenset, tests: tuple):
    """Every question tree that identifies each object of ``objects``: a leaf ("guess", o) for one
    object, ("guess", o, rest_tree) (guess o; if wrong, continue), or (test, yes_tree, no_tree) for a
    test (a set of objects) that splits ``objects``."""
    if len(objects) == 1:
        (o,) = objects
        yield ("guess", o)
        return
    for o in sorted(objects):
        for rest in all_trees(objects - {o}, tests):
            yield ("guess", o, rest)
    for t in tests:
        yes, no = objects & t, objects - t
        if yes and no:
            for a in all_trees(yes, tests):
                for b in all_trees(no, tests):
                    yield (t, a, b)


def questions_before_right_guess(tree, secret) -> int:
    """Walk ``secret`` through ``tree``; count the questions that are not the right guess."""
    count = 0
    while True:
        if tree[0] == "guess":
            if tree[1] == secret:
                return count
            count, tree = count + 1, tree[2]
        else:
            count, tree = count + 1, tree[1] if secret in tree[0] else tree[2]


def brute_force_expected_questions(objects, attributes) -> Fraction:
    tests = tuple(frozenset(o for o in objects if raw_truth(o, k)) for k in attributes)
    tests = tuple(sorted(set(tests), key=sorted))
    best = min(sum(questions_before_right_guess(tree, o) for o in objects) for tree in
               all_trees(frozenset(objects), tests))
    return Fraction(best, len(objects))


SMALL_BASES = [
    (("cat", "dog", "apple", "car"), ("animal", "food", "pet")),
    (("cat", "bat", "apple", "banana", "car", "piano"), ("animal", "fly", "fruit", "yellow")),
    (("cat", "cow", "sheep", "bat", "owl", "apple"), ("mammal", "farm", "fly", "fur")),  # cow, sheep: one row
    (("cat", "hamster", "bat", "ostrich", "peach", "cup", "tram"), ("animal", "big", "handheld", "fly", "fur")),
]


@pytest.mark.parametrize("objects,attributes", SMALL_BASES)
def test_optimal_expected_questions_match_an_exhaustive_search_over_question_trees(objects, attributes):
    expected = brute_force_expected_questions(objects, attributes)
    assert Fraction(optimal_total_questions(objects, attributes), len(objects)) == expected


def test_optimal_expected_questions_by_hand():
    assert optimal_total_questions(("cat", "dog")) == 1  # guess one: 0 or 1 question before the right guess
    assert optimal_total_questions(("cow", "sheep", "goat")) == 3  # one row: guess, guess (0 + 1 + 2)
    # cat, dog | apple, car by either attribute: ask, then guess in each pair (4 + 1 + 1), or guess first
    # (3 + 3: guess again, then ask or guess); 6 either way
    assert optimal_total_questions(("cat", "dog", "apple", "car"), ("animal", "fur")) == 6
    assert optimal_total_questions(("cat",)) == 0


def exact_return_of(policy_action, env: TwentyQuestionsEnv) -> float:
    """The policy's mean return over the game's objects, each hidden once (deterministic policies)."""
    total = 0.0
    for secret in env.objects:
        env.reset(0)
        env.secret = secret
        done = False
        while not done:
            result = env.step(policy_action(env))
            total += result.reward
            done = result.done
    return total / len(env.objects)


def test_cpu_game_optimal_return_and_the_informative_policy():
    """The 16-object game of configs/twenty_questions_cpu.py: optimal -3.5 (56 questions over the 16
    objects, dynamic programming checked above against the exhaustive search); the informative action
    (halving questions, a guess when two remain) is itself optimal there, checked by playing it."""
    env = TwentyQuestionsEnv(num_objects=16)
    assert env.expected_optimal_return() == -3.5
    assert exact_return_of(lambda e: informative_question(e.consistent()), env) == -3.5
    assert redundant_question(env.objects) == "Is it red?"
    assert not any(raw_truth(o, "red") for o in env.objects)


def test_trap_policy_makes_the_redundant_question_the_most_frequent():
    episodes = list(generate_episodes("twenty_questions", 600, seed=0, policy="trap", num_objects=16))
    first = collections.Counter(ep["turns"][1]["text"] for ep in episodes)
    (top, n_top), (second, n_second) = first.most_common(2)
    assert (top, second) == ("Is it red?\n", "Is it big?\n")  # the trap, then the halving question
    assert n_top == pytest.approx(300, abs=40) and n_second == pytest.approx(240, abs=40)
    # Greedy BC asks "Is it red?" forever: -20 on every object; the data's informative questions are optimal.
    env = TwentyQuestionsEnv(num_objects=16)
    assert exact_return_of(lambda e: "Is it red?", env) == -20.0
    mean = sum(ep["meta"]["return"] for ep in episodes) / len(episodes)
    assert -9.5 < mean < -7.5, mean
    assert sum(ep["meta"]["success"] for ep in episodes) / len(episodes) > 0.97
    # every recorded answer is the oracle's, replayed from the episode's seed
    for episode in episodes[:50]:
        env.reset(episode["meta"]["seed"])
        for question, answer in zip(episode["turns"][1::2], episode["turns"][2::2]):
            assert answer["text"] == env.answer(question["text"].strip()) + "\n"


def test_cpu_config_context_holds_a_whole_game_of_the_longest_questions():
    """Evaluation feeds the whole history back: 20 questions of eval.max_new_tokens characters, each
    answered "I don't understand.", must fit the model's positions (BOS + prompt + 19 turns + the last
    question), and the longest question the policies ask must fit eval.max_new_tokens with its newline."""
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "twenty_questions_cpu.py")
    c = config_lib.load_config_file(path)
    positions = get_preset(c.model.preset, **c.model.overrides.to_dict()).max_position_embeddings
    env = TwentyQuestionsEnv(**c.env.to_dict())
    turn = c.eval.max_new_tokens + len(UNKNOWN + "\n")
    assert 1 + len(PROMPT) + (env.max_questions - 1) * turn + c.eval.max_new_tokens <= positions
    longest = max(len(question_text(k)) for k, _ in ATTRIBUTES)
    assert longest + 1 <= c.eval.max_new_tokens
    assert max(len(f"Is it an {o}?") for o in env.objects) + 1 <= c.eval.max_new_tokens
