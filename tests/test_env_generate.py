"""Dataset generators: episode format, determinism, the CLI's summary, the behaviour policies' figures."""
import collections
import json
import os

import pytest

from qsft_jax.data.episodes import parse_episode
from qsft_jax.envs import generate_episodes, make_env
from qsft_jax.envs.chess_env import STOCKFISH_PATH
from qsft_jax.envs.generate import main, split_options
from qsft_jax.envs.policies import most_informative_guess
from qsft_jax.envs.wordle import WordleEnv, answer_subset, consistent_words, feedback

needs_stockfish = pytest.mark.skipif(
    not os.path.exists(STOCKFISH_PATH), reason=f"Stockfish is not installed at {STOCKFISH_PATH} (apt-get install stockfish)"
)

META_KEYS = {"task", "policy", "seed", "return", "success", "truncated"}


def check_episode_format(episode, task):
    """Exactly the fields of docs/algorithm.md section 1, alternating turns, rewards on actions only, the
    return in meta equal to the sum of rewards, the recording convention of base.py."""
    assert set(episode) == {"turns", "done", "id", "meta"}
    assert set(episode["meta"]) == META_KEYS and episode["meta"]["task"] == task
    turns = episode["turns"]
    for k, turn in enumerate(turns):
        assert turn["action"] is (k % 2 == 1)
        assert set(turn) == ({"text", "action", "reward"} if turn["action"] else {"text", "action"})
        assert isinstance(turn["text"], str) and turn["text"].endswith("\n") and turn["text"].strip()
    rewards = [t["reward"] for t in turns if t["action"]]
    assert all(isinstance(r, float) for r in rewards)
    assert sum(rewards) == pytest.approx(episode["meta"]["return"])
    if episode["done"]:
        assert turns[-1]["action"] and not episode["meta"]["truncated"]
    else:
        assert not turns[-1]["action"] and episode["meta"]["truncated"]
    env = make_env(task) if task != "chess" else None
    if env is not None:
        low, high = env.return_bounds
        assert low <= episode["meta"]["return"] <= high
    parsed, problems = parse_episode(episode)  # the data layer's own validation accepts it
    assert problems == [] and parsed is not None


@pytest.mark.parametrize("task,policy,options", [
    ("maze", "paper", {}), ("maze", "trap", {}), ("wordle", "paper", {}), ("wordle", "biased", {}),
    ("wordle", "trap", {"invalid": "end", "num_answers": 64}), ("twenty_questions", "paper", {}),
    ("twenty_questions", "trap", {"num_objects": 16})])
def test_generated_episodes_have_the_format_and_are_deterministic(task, policy, options):
    first = list(generate_episodes(task, 30, seed=5, policy=policy, **options))
    assert first == list(generate_episodes(task, 30, seed=5, policy=policy, **options))
    assert first[:10] == list(generate_episodes(task, 10, seed=5, policy=policy, **options))  # a prefix
    assert first != list(generate_episodes(task, 30, seed=6, policy=policy, **options))
    assert len({ep["id"] for ep in first}) == 30
    for episode in first:
        check_episode_format(episode, task)
        assert episode["meta"]["policy"] == policy


@needs_stockfish
def test_chess_generation_is_deterministic_and_records_truncation():
    options = dict(max_turns=12, nodes_choices=(20, 100), random_choices=(0.0, 0.5))
    episodes = list(generate_episodes("chess", 4, seed=2, **options))
    assert episodes == list(generate_episodes("chess", 4, seed=2, **options))
    for episode in episodes:
        check_episode_format(episode, "chess")
    assert any(not ep["done"] for ep in episodes)  # 12 moves rarely finish a game


def test_replaying_the_seed_gives_the_first_observation():
    for episode in generate_episodes("wordle", 5, seed=0):
        env = WordleEnv()
        assert env.reset(episode["meta"]["seed"]) == episode["turns"][0]["text"]
        # the recorded feedback is the feedback of each guess against that seed's answer
        for guess, observation in zip(episode["turns"][1::2], episode["turns"][2::2]):
            assert observation["text"] == feedback(guess["text"].strip(), env.answer) + "\n"


def test_options_reach_the_environment_and_the_policy_and_bad_ones_fail():
    episodes = list(generate_episodes("maze", 20, seed=0, actions="words", optimal_prob=1.0, max_steps=30))
    for episode in episodes:
        assert all(t["text"] in ("up\n", "down\n", "left\n", "right\n") for t in episode["turns"][1::2])
        assert episode["meta"]["success"]  # always a shortest-path move
    assert split_options("chess", "paper", {"engine_path": "x", "max_turns": 3, "nodes_choices": (1,)}) == (
        {"engine_path": "x", "max_turns": 3},
        {"engine_path": "x", "nodes_choices": (1,)},
    )
    with pytest.raises(ValueError, match=r"options \['colour'\] are taken neither"):
        list(generate_episodes("maze", 1, seed=0, colour="red"))
    with pytest.raises(ValueError, match="unknown behaviour policy 'optimal' for wordle"):
        list(generate_episodes("wordle", 1, seed=0, policy="optimal"))
    with pytest.raises(ValueError, match="unknown task"):
        list(generate_episodes("go", 1, seed=0))
    with pytest.raises(ValueError, match="num_episodes"):
        list(generate_episodes("maze", -1, seed=0))


def test_cli_writes_jsonl_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "maze.jsonl"
    assert main(["generate", "--task", "maze", "--episodes", "200", "--seed", "3", "--policy", "trap", "--out", str(out),
                 "--opt", "max_steps=25", "--opt", "actions=words"]) == 0
    episodes = [json.loads(line) for line in out.read_text().splitlines()]
    assert episodes == list(generate_episodes("maze", 200, seed=3, policy="trap", max_steps=25, actions="words"))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    returns = [ep["meta"]["return"] for ep in episodes]
    assert summary["episodes"] == 200
    assert summary["mean_return"] == pytest.approx(sum(returns) / 200)
    assert summary["success_rate"] == pytest.approx(sum(ep["meta"]["success"] for ep in episodes) / 200)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--task", "maze", "--episodes", "1", "--out", str(out), "--opt", "nokey"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "FATAL: python -m qsft_jax.envs.generate: --opt needs key=value, got 'nokey'\n")


def test_wordle_paper_policy_mean_return_is_near_the_papers_dataset():
    """Paper's dataset: -4.12. The default mixture measured -4.115 +- 0.010 on 20000 episodes (seed 7,
    see WordlePaperPolicy). Here 1500 episodes (about 10 s), whose standard error is about 0.035, so the
    0.15 tolerance is about four standard errors."""
    episodes = list(generate_episodes("wordle", 1500, seed=0))
    mean = sum(ep["meta"]["return"] for ep in episodes) / len(episodes)
    assert abs(mean - (-4.12)) < 0.15, mean
    # both halves of the mixture are present: invalid-for-the-feedback guesses and consistent ones
    assert 0.5 < sum(ep["meta"]["success"] for ep in episodes) / len(episodes) < 0.95


def test_wordle_biased_policy_makes_the_most_frequent_action_wrong():
    episodes = list(generate_episodes("wordle", 600, seed=0, policy="biased"))
    openings = collections.Counter(ep["turns"][1]["text"] for ep in episodes)
    assert openings.most_common(1)[0] == ("immix\n", pytest.approx(300, abs=45))
    assert len(openings) > 200  # the consistent openings are spread over many words
    repeats = later = 0
    for episode in episodes:
        guesses = [t["text"] for t in episode["turns"][1::2]]
        later += len(guesses) - 1
        repeats += sum(a == b for a, b in zip(guesses, guesses[1:]))
    assert 0.4 < repeats / later < 0.6  # repeating is the single most frequent later action
    # Greedy BC plays "immix" and then repeats it: return -6 on every answer (immix is not one).
    env = WordleEnv()
    for seed in range(20):
        env.reset(seed)
        total = sum(env.step("immix\n").reward for _ in range(6))
        assert total == -6.0
    data_mean = sum(ep["meta"]["return"] for ep in episodes) / len(episodes)
    assert data_mean > -5.5  # while the data's consistent guesses solve many games


def test_wordle_trap_policy_makes_a_game_ending_guess_the_most_frequent():
    options = dict(invalid="end", num_answers=64)
    episodes = list(generate_episodes("wordle", 1000, seed=0, policy="trap", **options))
    answers = answer_subset(64)
    assert most_informative_guess(answers) == "arose"
    # brute force: no answer splits the 64 into more feedback patterns than the opening
    splits = {g: len({feedback(g, a) for a in answers}) for g in answers}
    assert splits["arose"] == max(splits.values())
    openings = collections.Counter(ep["turns"][1]["text"] for ep in episodes)
    assert openings.most_common(2) == [("xxxxx\n", pytest.approx(400, abs=50)), ("arose\n", pytest.approx(300, abs=50))]
    for episode in episodes:
        guesses = [t["text"][:-1] for t in episode["turns"][1::2]]
        if "xxxxx" in guesses:  # the trap ends the game as a loss, wherever it is played
            assert guesses[-1] == "xxxxx" and episode["meta"]["return"] == -6.0
        else:  # every other guess is consistent with the feedback before it (and here every such game is won)
            assert episode["meta"]["success"]
            answer = guesses[-1]
            for i, guess in enumerate(guesses[1:], start=1):
                assert guess in consistent_words(answers, [(g, feedback(g, answer)) for g in guesses[:i]])
    # At later guesses the trap (40%) is the mode wherever two or more answers remain (60% spread over them).
    later = collections.Counter(t["text"] for ep in episodes for t in ep["turns"][3::2])
    assert later.most_common(1)[0][0] == "xxxxx\n"
    data_mean = sum(ep["meta"]["return"] for ep in episodes) / len(episodes)
    assert -5.0 < data_mean < -4.3  # measured -4.69 on 5000 episodes (configs/wordle_trap_cpu.py)
    with pytest.raises(ValueError, match="invalid='end'"):
        list(generate_episodes("wordle", 1, seed=0, policy="trap", num_answers=64))
    with pytest.raises(ValueError, match="allowed word; it must be invalid"):
        list(generate_episodes("wordle", 1, seed=0, policy="trap", invalid="end", trap="crane"))
