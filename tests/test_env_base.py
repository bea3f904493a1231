"""The environment interface: action parsing, call order, play_batch's checks, summaries, the registry."""
import pytest

from qsft_jax.envs import ENVS, episode_summary, make_env, parse_action_line, play_batch
from qsft_jax.envs.base import EnvError
from qsft_jax.envs.maze import MazeEnv


def test_parse_action_line_strips_one_stop_string_and_spaces():
    assert parse_action_line("e2e4\n") == "e2e4"
    assert parse_action_line("  crane \n") == "crane"
    assert parse_action_line("u") == "u"
    assert parse_action_line("a\nb\n") == "a\nb"  # not one line: left for the task to reject
    with pytest.raises(TypeError):
        parse_action_line(b"u\n")


def test_call_order_and_seed_type_are_enforced():
    env = MazeEnv()
    with pytest.raises(EnvError, match="before reset"):
        env.step("u\n")
    with pytest.raises(TypeError, match="seed must be an int"):
        env.reset("0")
    assert env.reset(0).endswith("\n") and not env.done


def test_play_batch_rejects_mismatched_or_shared_envs():
    env = MazeEnv()
    with pytest.raises(ValueError, match="2 envs but 1 seeds"):
        play_batch([env, MazeEnv()], [0], lambda h: ["u\n"] * len(h))
    with pytest.raises(ValueError, match="same env object"):
        play_batch([env, env], [0, 1], lambda h: ["u\n"] * len(h))


def test_play_batch_histories_alternate_and_end_in_an_observation():
    seen = []

    def act(histories):
        for history in histories:
            assert [t["action"] for t in history] == [k % 2 == 1 for k in range(len(history))]
            assert not history[-1]["action"]
            seen.append(len(history))
        return ["u\n"] * len(histories)

    (episode,) = play_batch([MazeEnv(starts=[(2, 5)])], [4], act)
    assert seen == [1, 3] and episode["id"] == "maze-4"
    assert [t["text"] for t in episode["turns"][1:]] == ["u\n", "1,5\n", "u\n"]  # G reached: no last observation


def test_episode_summary_and_registry():
    episodes = [{"meta": {"return": -2.0, "success": True}}, {"meta": {"return": -5.0, "success": False}}]
    assert episode_summary(episodes) == {"episodes": 2, "mean_return": -3.5, "success_rate": 0.5}
    assert set(ENVS) == {"wordle", "chess", "maze", "twenty_questions"}
    assert isinstance(make_env("maze", max_steps=7), MazeEnv) and make_env("maze", max_steps=7).max_turns == 7
    with pytest.raises(ValueError, match="unknown environment 'go'"):
        make_env("go")
    # the distances drawn in maze.py's docstring sum to 145 over the 23 start cells
    assert MazeEnv().expected_optimal_return() == pytest.approx(-145 / 23)
