"""Maze: optimal returns against finite-horizon dynamic programming, wall penalty, step cap, encodings,
and the trap dataset's greedy-BC gap."""
import collections

import pytest

from qsft_jax.envs.base import play_batch
from qsft_jax.envs.generate import generate_episodes
from qsft_jax.envs.maze import DEFAULT_LAYOUT, MazeEnv, bfs_distances, parse_layout

STEPS = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}


def dp_optimal_returns(layout, max_steps, wall_penalty):
    """Optimal return from every free cell by backward induction over the step budget, with the
    dynamics re-derived from the layout strings (independent of the environment's BFS)."""
    rows = list(layout)
    cells = [(r, c) for r in range(len(rows)) for c in range(len(rows[0])) if rows[r][c] != "#"]
    goal = next(cell for cell in cells if rows[cell[0]][cell[1]] == "G")

    def move(cell, step):
        r, c = cell[0] + step[0], cell[1] + step[1]
        inside = 0 <= r < len(rows) and 0 <= c < len(rows[0]) and rows[r][c] != "#"
        return ((r, c), -1.0) if inside else (cell, -1.0 + wall_penalty)

    value = {cell: 0.0 for cell in cells}  # 0 moves left
    for _ in range(max_steps):
        new = {}
        for cell in cells:
            best = -float("inf")
            for step in STEPS.values():
                nxt, reward = move(cell, step)
                best = max(best, reward + (0.0 if nxt == goal else value[nxt]))
            new[cell] = best
        value = new
    return {cell: v for cell, v in value.items() if cell != goal}


@pytest.mark.parametrize("max_steps", [20, 6])
def test_bfs_optimal_returns_match_dynamic_programming(max_steps):
    env = MazeEnv(max_steps=max_steps)
    dp = dp_optimal_returns(DEFAULT_LAYOUT, max_steps, env.wall_penalty)
    assert env.optimal_returns() == pytest.approx(dp)
    assert max(env.distances.values()) == 11 and len(env.starts) == 23


def test_following_shortest_path_moves_earns_the_optimal_return_from_every_start():
    for start, optimal in MazeEnv().optimal_returns().items():
        env = MazeEnv(starts=[start])
        observation = env.reset(0)
        assert observation.endswith(f"{start[0]},{start[1]}\n")
        total, done = 0.0, False
        while not done:
            result = env.step(env.action_texts[env.shortest_path_moves(env.position)[0]] + "\n")
            total += result.reward
            done = result.done
        assert result.info["success"] and total == optimal


def test_first_observation_shows_the_map_and_later_ones_the_position():
    env = MazeEnv(starts=[(2, 2)])
    first = env.reset(0)
    assert first == "Maze. Reach G. Moves: u d l r.\n" + "".join(row + "\n" for row in DEFAULT_LAYOUT) + "2,2\n"
    assert env.step("r\n").observation == "2,3\n"


def test_walls_and_grid_edges_cost_the_extra_penalty_and_do_not_move():
    env = MazeEnv(starts=[(0, 3)])
    env.reset(0)
    bump = env.step("r\n")  # (0, 4) is a wall
    assert (bump.observation, bump.reward, bump.info["bumped"]) == ("0,3\n", -2.0, True)
    edge = env.step("u\n")  # off the grid
    assert (edge.observation, edge.reward) == ("0,3\n", -2.0)
    assert env.step("nonsense\n").reward == -2.0  # unparseable counts as a bump
    ok = env.step("l\n")
    assert (ok.observation, ok.reward, ok.info["bumped"]) == ("0,2\n", -1.0, False)
    env = MazeEnv(starts=[(0, 3)], wall_penalty=-3.0)
    env.reset(0)
    assert env.step("r").reward == -4.0


def test_step_cap_ends_the_episode_and_bounds_the_return():
    env = MazeEnv(starts=[(0, 3)])
    env.reset(0)
    results = [env.step("u\n") for _ in range(20)]
    assert [r.done for r in results] == [False] * 19 + [True]
    assert results[-1].info == {"success": False, "bumped": True, "truncated": False}
    assert sum(r.reward for r in results) == env.return_bounds[0] == -40.0
    assert env.return_bounds[1] == -6.0  # the best return from its only start, (0, 3)
    assert MazeEnv().return_bounds == (-40.0, -1.0)  # over all starts: (1, 5) is next to G


def test_word_actions_and_layout_errors():
    env = MazeEnv(actions="words", starts=[(1, 5)])
    assert "Moves: up down left right." in env.reset(0)
    assert env.step("u\n").reward == -2.0  # a char action is not a word action
    result = env.step("up\n")
    assert result.done and result.info["success"] and result.reward == -1.0
    with pytest.raises(ValueError, match="exactly one G"):
        MazeEnv(layout=["...", "..."])
    with pytest.raises(ValueError, match="cannot reach G"):
        MazeEnv(layout=[".#G", "#.."])
    with pytest.raises(ValueError, match="differ in length"):
        MazeEnv(layout=["..G", "."])
    with pytest.raises(ValueError, match="actions must be"):
        MazeEnv(actions="arrows")
    with pytest.raises(ValueError, match="starts"):
        MazeEnv(starts=[(0, 4)])


def test_bfs_distances_on_an_open_grid_are_manhattan():
    rows, free, goal = parse_layout("....\n....\n...G")
    distances = bfs_distances(free, goal)
    assert all(d == abs(r - goal[0]) + abs(c - goal[1]) for (r, c), d in distances.items())


def test_play_batch_steps_several_mazes_together():
    envs = [MazeEnv(starts=[(1, 5)]), MazeEnv(starts=[(2, 5)]), MazeEnv(starts=[(0, 3)])]
    calls = []

    def act(histories):
        calls.append(len(histories))
        return ["u\n"] * len(histories)

    episodes = play_batch(envs, [0, 1, 2], act)
    assert calls == [3, 2] + [1] * 18  # (1,5) done after 1 move, (2,5) after 2, (0,3) runs to the cap
    assert [ep["meta"]["return"] for ep in episodes] == [-1.0, -2.0, -40.0]
    assert [ep["meta"]["success"] for ep in episodes] == [True, True, False]
    assert [sum(t["action"] for t in ep["turns"]) for ep in episodes] == [1, 2, 20]
    assert all(ep["done"] and ep["turns"][-1]["action"] for ep in episodes)  # final observation omitted
    with pytest.raises(ValueError, match="returned 1 actions for 3"):
        play_batch(envs, [0, 1, 2], lambda h: ["u\n"])


def _greedy_bc_table(episodes):
    """Empirical most frequent action per position (the state) in the data, with its counts."""
    counts = collections.defaultdict(collections.Counter)
    for episode in episodes:
        turns = episode["turns"]
        for observation, action in zip(turns[0::2], turns[1::2]):
            position = observation["text"].splitlines()[-1]
            counts[position][action["text"]] += 1
    return counts


def _greedy_return(counts, start):
    env = MazeEnv(starts=[start])
    position = env.reset(0).splitlines()[-1]
    total = 0.0
    while True:
        result = env.step(counts[position].most_common(1)[0][0])
        total += result.reward
        position = result.observation.strip()
        if result.done:
            return total


def test_trap_dataset_makes_greedy_bc_clearly_suboptimal():
    env = MazeEnv()
    episodes = list(generate_episodes("maze", 3000, seed=0, policy="trap"))
    counts = _greedy_bc_table(episodes)
    optimal = env.optimal_returns()
    greedy = {start: _greedy_return(counts, start) for start in env.starts}
    mean_optimal = sum(optimal.values()) / len(optimal)
    mean_greedy = sum(greedy.values()) / len(greedy)
    mean_data = sum(ep["meta"]["return"] for ep in episodes) / len(episodes)
    print(f"trap data: optimal {mean_optimal:.2f}, greedy BC {mean_greedy:.2f}, data {mean_data:.2f}")
    assert mean_greedy < mean_optimal - 5.0
    assert mean_greedy < mean_data  # greedy BC is worse than the data it was cloned from
    from qsft_jax.envs.policies import default_trap_moves

    traps = default_trap_moves(env)
    assert traps == {(2, 3): "u", (2, 5): "d", (4, 1): "d"}
    for (r, c), trap_move in traps.items():
        seen = counts[f"{r},{c}"]
        assert seen.most_common(1)[0][0] == trap_move + "\n"  # the most frequent move is wrong ...
        for good in env.shortest_path_moves((r, c)):
            assert seen[good + "\n"] > 0.3 * sum(seen.values())  # ... while the right one is well covered


def test_paper_dataset_greedy_bc_is_optimal_contrast():
    """The uniform-noise behaviour has a shortest-path move as its most frequent action everywhere
    (docs/algorithm.md section 7), which is why the trap dataset exists."""
    env = MazeEnv()
    counts = _greedy_bc_table(list(generate_episodes("maze", 3000, seed=0, policy="paper")))
    assert all(_greedy_return(counts, s) == v for s, v in env.optimal_returns().items())
