"""Exact maze values (qsft_jax/envs/maze_values.py) against brute force: every move sequence of a tiny
maze enumerated through the environment's own step, weighted by the behaviour's probabilities, with
returns transformed by the data layer; the behaviour probabilities against the policies' own sampling
(Monte Carlo over generated episodes); the optimal returns against the environment's BFS; and the
stitching property of configs/maze_stitch_cpu.py."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

from qsft_jax import config_lib
from qsft_jax.data.episodes import Episode, Turn
from qsft_jax.data.rewards import RewardTransform, transform_rewards
from qsft_jax.envs import generate_episodes
from qsft_jax.envs.maze import MOVES, MazeEnv
from qsft_jax.envs.maze_values import config_values, exact_values
from qsft_jax.envs.policies import MazeDetourPolicy, MazePaperPolicy, MazeTrapPolicy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("..G", ".#.", "...")
MAX_STEPS = 4
POLICIES = {"paper": MazePaperPolicy(0.3), "trap": MazeTrapPolicy(trap_prob=0.7, traps={"1,0": "d"}),
            "detour": MazeDetourPolicy(avoid=("0,1",), optimal_prob=0.8),
            "shortcut": MazeDetourPolicy(avoid=("0,1",), optimal_prob=0.5, shortcut_prob=0.3)}
TRANSFORMS = (("terminal_return:-8,-1", 0.7), ("affine:-2,-1,4", 0.9), ("none", 1.0))


def transformed_return(rewards: list[float], transform: str, gamma: float) -> float:
    """The discounted return of the first action of an episode with these action rewards, through the data
    layer's reward transform (every action one turn; "none" passes the negative maze rewards as they are,
    which the data layer would reject as returns outside [0, 1])."""
    if transform == "none":
        return float(sum(gamma ** j * r for j, r in enumerate(rewards)))
    turns = []
    for r in rewards:
        turns += [Turn("x", False), Turn("a", True, r)]
    per_turn, problems = transform_rewards(Episode(turns=tuple(turns), done=True),
                                           RewardTransform.from_config(transform), gamma)
    assert not problems
    action_rewards = per_turn[1::2]
    return float(sum(gamma ** j * r for j, r in enumerate(action_rewards)))


def trajectories(env: MazeEnv, start):
    """Every (moves, rewards, cells acted in) of an episode from `start`, played by env.step."""
    env = copy.deepcopy(env)
    env.starts = (start,)
    out = []

    def walk(e, moves, rewards, cells):
        for m in MOVES:
            child = copy.deepcopy(e)
            cell = child.position
            result = child.step(m + "\n")
            if result.done:
                out.append((moves + [m], rewards + [result.reward], cells + [cell]))
            else:
                walk(child, moves + [m], rewards + [result.reward], cells + [cell])
    env.reset(0)
    walk(env, [], [], [])
    return out


def check_against_brute_force(env: MazeEnv, policy, transform: str, gamma: float):
    """Asserts every figure of exact_values at the start states (and every visit probability) equals
    the enumeration's; returns the values."""
    values = exact_values(env, policy, gamma, transform)
    terminal = transform.startswith("terminal")
    probs = {c: policy.move_probabilities(env, c) for c in env.free - {env.goal}}
    visits: dict = {}
    starts = list(env.starts)
    optimal, behaviour = [], []
    for start in starts:
        paths = trajectories(env, start)
        g = {i: transformed_return(rw, transform, gamma) for i, (_, rw, _) in enumerate(paths)}
        p_beh = {i: float(np.prod([probs[c][m] for m, c in zip(mv, cells)]))
                 for i, (mv, _, cells) in enumerate(paths)}
        assert np.isclose(sum(p_beh.values()), 1.0)

        def state_at(path, k):
            moves, rewards, cells = path
            return (cells[k], env.max_steps - k, float(sum(rewards[:k])) if terminal else 0.0)

        # Q* and Q^beta at the start: max / behaviour-weighted mean over the paths that begin with each move.
        q_star = np.array([max(g[i] for i, p in enumerate(paths) if p[0][0] == m) for m in MOVES])
        q_beta = np.array([sum(p_beh[i] / probs[start][m] * g[i] for i, p in enumerate(paths) if p[0][0] == m)
                           for m in MOVES])
        s0 = (start, env.max_steps, 0.0)
        np.testing.assert_allclose(values.q_star[s0], q_star, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(values.q_beta[s0], q_beta, rtol=1e-12, atol=1e-15)
        by = values.by_start[start]
        np.testing.assert_allclose(by["optimal"].transformed, q_star.max(), rtol=1e-12)
        np.testing.assert_allclose(by["behaviour"].transformed, sum(p_beh[i] * g[i] for i in g), rtol=1e-12)
        behaviour_original = sum(p_beh[i] * sum(p[1]) for i, p in enumerate(paths))
        np.testing.assert_allclose(by["behaviour"].original, behaviour_original, rtol=1e-12)
        for i, path in enumerate(paths):  # the behaviour's probability of acting in each state
            for k in range(len(path[0])):
                visits[state_at(path, k)] = visits.get(state_at(path, k), 0.0) + p_beh[i] / len(starts)
        # The greedy-in-Q^beta policy (ties split evenly) replayed on the paths: its probability of each path.
        greedy = {}
        for i, path in enumerate(paths):
            p = 1.0
            for k, m in enumerate(path[0]):
                q = values.q_beta[state_at(path, k)]
                best = np.flatnonzero(np.isclose(q, q.max(), rtol=1e-9, atol=0.0))
                p *= (MOVES.index(m) in best) / len(best)
            greedy[i] = p
        np.testing.assert_allclose(by["greedy_q_beta"].transformed, sum(greedy[i] * g[i] for i in g),
                                   rtol=1e-12)
        np.testing.assert_allclose(by["greedy_q_beta"].original,
                                   sum(greedy[i] * sum(p[1]) for i, p in enumerate(paths)), rtol=1e-12)
        star_set = set(np.flatnonzero(np.isclose(q_star, q_star.max(), rtol=1e-9, atol=0.0)))
        beta_set = set(np.flatnonzero(np.isclose(q_beta, q_beta.max(), rtol=1e-9, atol=0.0)))
        assert (s0 in {d.state for d in values.start_disagreements()}) == (not beta_set <= star_set)
        optimal.append(q_star.max())
        behaviour.append(by["behaviour"].transformed)
    assert values.visit_probability.keys() >= visits.keys()
    for state, p in visits.items():
        np.testing.assert_allclose(values.visit_probability[state], p, rtol=1e-12, err_msg=str(state))
    assert values.optimal_return == pytest.approx(np.mean(optimal), rel=1e-12)
    assert values.behaviour_return == pytest.approx(np.mean(behaviour), rel=1e-12)
    return values


@pytest.mark.parametrize("transform,gamma", TRANSFORMS)
@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_values_equal_brute_force_enumeration(policy_name, transform, gamma):
    env = MazeEnv(layout=TINY, max_steps=MAX_STEPS)
    check_against_brute_force(env, POLICIES[policy_name], transform, gamma)


@pytest.mark.parametrize("transform,gamma", (("terminal_return:-12,-1", 0.7), ("none", 1.0)))
def test_brute_force_on_a_start_where_greedy_q_beta_is_not_optimal(transform, gamma):
    """From (1, 0) of the tiny ring with 6 moves, the detour policy (planning around (0, 1)) goes the long
    way: greedy Q^beta follows it (a start disagreement), while the optimal path is u, r, r."""
    env = MazeEnv(layout=TINY, max_steps=6, starts=((1, 0),))
    policy = MazeDetourPolicy(avoid=("0,1",), optimal_prob=0.8)
    values = check_against_brute_force(env, policy, transform, gamma)
    (d,) = values.start_disagreements()
    assert d.optimal_moves == ("u",) and d.q_beta_moves == ("d",)
    assert values.optimal.original == -3.0 and values.greedy_q_beta.original < -3.0
    assert any(len(np.flatnonzero(q == q.max())) > 1 for q in values.q_star.values())  # ties occur


def test_optimal_returns_are_the_bfs_distances():
    env = MazeEnv()
    for transform, gamma in (("none", 1.0), ("terminal_return:-40,-1", 0.7)):
        values = exact_values(env, MazeTrapPolicy(), gamma, transform)
        for start, want in env.optimal_returns().items():
            assert values.by_start[start]["optimal"].original == pytest.approx(want, abs=1e-12)
            if transform == "none":
                assert values.q_star[(start, env.max_steps, 0.0)].max() == pytest.approx(want, abs=1e-12)
        assert values.optimal.original == pytest.approx(env.expected_optimal_return(), abs=1e-12)


@pytest.mark.parametrize("config_name", ["maze_cpu", "maze_trap_cpu", "maze_stitch_cpu", "maze_stitch_rare_cpu"])
def test_behaviour_return_matches_the_policy_sampled(config_name):
    """The DP's behaviour return equals the mean return of episodes the generator samples with the policy's
    own `act` (within 4 standard errors): move_probabilities is what act draws from."""
    config = config_lib.load_config_file(os.path.join(REPO, "configs", f"{config_name}.py"), "")
    values = config_values(config)
    options = {**config.env.to_dict(), **config.dataset.options.to_dict()}
    options["starts"] = tuple(config.env.get("starts", ())) or None
    episodes = list(generate_episodes("maze", 3000, 123, policy=config.dataset.policy, **options))
    returns = np.array([ep["meta"]["return"] for ep in episodes])
    stderr = returns.std(ddof=1) / np.sqrt(len(returns))
    assert abs(returns.mean() - values.behaviour.original) < 4 * stderr, (returns.mean(),
                                                                          values.behaviour.original)


def test_rare_shortcut_stitching_task_property():
    """configs/maze_stitch_rare_cpu.py: at every start cell the evaluation plays from, greedy Q^beta picks a
    move that is not optimal, and its expected return is below the optimal one by the docstring's margin."""
    config = config_lib.load_config_file(os.path.join(REPO, "configs", "maze_stitch_rare_cpu.py"), "")
    values = config_values(config)
    assert {d.state[0] for d in values.start_disagreements()} == set(map(tuple, config.env.starts))
    assert values.optimal.original == pytest.approx(-5.5, abs=1e-9)
    assert values.greedy_q_beta.original == pytest.approx(-10.5, abs=1e-9)
    assert values.optimal.original - values.greedy_q_beta.original >= 5.0 - 1e-9
    assert values.behaviour.original == pytest.approx(-14.40, abs=0.005)


def generated_moves(config):
    """The config's training episodes, the (cell, move) counts over them, and each episode's cells."""
    d = config.dataset
    episodes = list(generate_episodes("maze", d.num_episodes, d.seed, policy=d.policy,
                                      **{**config.env.to_dict(), **d.options.to_dict()}))
    counts: dict = {}
    cells_of = []
    for ep in episodes:
        texts = [t["text"] for t in ep["turns"]]
        cells = [tuple(int(x) for x in texts[0].strip().split("\n")[-1].split(","))]
        cells += [tuple(int(x) for x in t.strip().split(",")) for t in texts[2::2]]
        for cell, move in zip(cells, texts[1::2]):
            counts[(cell, move.strip())] = counts.get((cell, move.strip()), 0) + 1
        cells_of.append(cells)
    return episodes, counts, cells_of


def filtered_bc_cells(config, episodes, cells_of, tmp_path):
    """The cells of the episodes filtered BC keeps (the data layer's selection), and the selection."""
    from qsft_jax import run as run_lib
    from qsft_jax.data import DataConfig, write_jsonl
    from qsft_jax.data.pipeline import top_return_source
    from qsft_jax.tokenizers import CharTokenizer

    path = str(tmp_path / "train.jsonl")
    write_jsonl(path, episodes)
    data_config = DataConfig.from_config(run_lib.data_config_from(config), path=path)
    _, selection = top_return_source(data_config, CharTokenizer(), config.filtered_bc.top_fraction)
    return {cell for i in selection.indices for cell in cells_of[int(i)]}, selection


def test_stitching_data_hold_the_route_often_and_filtered_bc_sees_no_start_cell(tmp_path):
    """configs/maze_stitch_cpu.py's data, as its docstring counts them."""
    config = config_lib.load_config_file(os.path.join(REPO, "configs", "maze_stitch_cpu.py"), "")
    episodes, counts, cells_of = generated_moves(config)
    assert [counts[((0, c), "r")] for c in range(6)] == [536, 503, 436, 392, 302, 160]
    assert [counts[((0, c), "l")] for c in range(1, 6)] == [826, 725, 584, 460, 267]
    assert (counts[((1, 0), "u")], counts[((2, 0), "u")]) == (503, 369)
    assert np.mean([ep["meta"]["return"] for ep in episodes]) == pytest.approx(-11.66, abs=0.005)
    kept_cells, selection = filtered_bc_cells(config, episodes, cells_of, tmp_path)
    assert selection.kept == 290
    assert kept_cells == {(0, 5), (0, 6), (2, 6), (3, 6)}


def test_rare_shortcut_data_cover_the_short_route_and_filtered_bc_sees_no_start_cell(tmp_path):
    """The generated training data of configs/maze_stitch_rare_cpu.py hold every move of the short route (as the
    docstring counts them), and filtered BC's selection (the data layer's, top_fraction 0.1) holds only the
    one-move episodes from (0,4) and (2,4): no state of the evaluation's start cells."""
    config = config_lib.load_config_file(os.path.join(REPO, "configs", "maze_stitch_rare_cpu.py"), "")
    episodes, counts, cells_of = generated_moves(config)
    route = {((0, 0), "r"): 44, ((0, 1), "r"): 27, ((0, 2), "r"): 24, ((0, 3), "r"): 12, ((0, 4), "d"): 143,
             ((1, 0), "u"): 44, ((2, 0), "u"): 49}
    assert {k: counts.get(k, 0) for k in route} == route
    assert np.mean([ep["meta"]["return"] for ep in episodes]) == pytest.approx(-9.58, abs=0.005)
    kept_cells, selection = filtered_bc_cells(config, episodes, cells_of, tmp_path)
    assert selection.kept == 235 and selection.threshold == 1.0
    assert kept_cells == {(0, 4), (2, 4)}


def test_command_line_prints_the_values(capsys):
    from qsft_jax.envs import maze_values

    assert maze_values.main(["maze_values", f"--config={os.path.join(REPO, 'configs', 'maze_stitch_rare_cpu.py')}"]) == 0
    out = capsys.readouterr().out
    assert "greedy Q^beta: -10.500 (transformed 0.0280)" in out
    assert "start 0,1: optimal -4.00, greedy Q^beta -12.00, behaviour -16.41; argmax Q* r, argmax Q^beta l" in out


def extraction_limit_returns(env: MazeEnv, policy, q: dict) -> float:
    """The mean original return over env.starts of the deterministic policy argmax_a pi_beta(a|s) q(s, a)
    (what pi_phi * exp(beta p_theta) approaches as beta grows, with p_theta = pi_beta q at a fixed point),
    played out move by move through env.step."""
    total = 0.0
    for start in env.starts:
        e = copy.deepcopy(env)
        e.starts = (start,)
        e.reset(0)
        state, done = (start, env.max_steps, 0.0), False
        while not done:
            pi = np.array([policy.move_probabilities(env, state[0])[m] for m in MOVES])
            move = MOVES[int(np.argmax(pi * q[state]))]
            result = e.step(move + "\n")
            total += result.reward
            done = result.done
            state = (e.position, state[1] - 1, state[2] + result.reward)
    return total / len(env.starts)


def test_stitching_task_separates_bootstrapping_from_monte_carlo_returns():
    """configs/maze_stitch_cpu.py, as its docstring states: greedy Q^beta takes the detour from every
    evaluation start (-12 against the optimal -8), and the large-beta limit of Q-SFT's extraction,
    argmax pi_beta Q, reaches the optimum with Q = Q* and the detour with Q = Q^beta."""
    config = config_lib.load_config_file(os.path.join(REPO, "configs", "maze_stitch_cpu.py"), "")
    values = config_values(config)
    assert {d.state[0] for d in values.start_disagreements()} == set(map(tuple, config.env.starts))
    assert values.optimal.original == pytest.approx(-8.0, abs=1e-9)
    assert values.greedy_q_beta.original == pytest.approx(-12.0, abs=1e-9)
    assert values.behaviour.original == pytest.approx(-19.06, abs=0.005)
    env = MazeEnv(layout=tuple(config.env.layout), starts=tuple(map(tuple, config.env.starts)))
    policy = MazeDetourPolicy(**{k: v for k, v in config.dataset.options.to_dict().items() if k != "starts"})
    assert extraction_limit_returns(env, policy, values.q_star) == pytest.approx(-8.0)
    assert extraction_limit_returns(env, policy, values.q_beta) == pytest.approx(-12.0)
    limits = {k: v.original for k, v in values.extraction_limit.items()}
    assert limits == pytest.approx({"q_star": -8.0, "mc_mix 0.25": -26 / 3, "mc_mix 0.5": -10.0, "q_beta": -12.0})
    for lam in (0.25, 0.5):
        assert extraction_limit_returns(env, policy, values.q_mc_mix[lam]) == pytest.approx(limits[f"mc_mix {lam:g}"])


@pytest.mark.parametrize("transform,gamma", TRANSFORMS)
def test_mc_mix_fixed_points_are_q_star_and_q_beta_at_the_ends_and_between_them(transform, gamma):
    """Q_lam at lam 0 is Q*, at lam 1 Q^beta (both checked against brute force above), and in between it
    lies between them and falls with lam (Q^beta <= Q*)."""
    env = MazeEnv(layout=TINY, max_steps=MAX_STEPS)
    values = exact_values(env, POLICIES["shortcut"], gamma, transform, mc_mixes=(0.0, 0.3, 0.7, 1.0))
    for state in values.q_star:
        q = values.q_mc_mix
        np.testing.assert_allclose(q[0.0][state], values.q_star[state], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(q[1.0][state], values.q_beta[state], rtol=1e-12, atol=1e-12)
        assert np.all(values.q_beta[state] <= q[0.7][state] + 1e-12)
        assert np.all(q[0.7][state] <= q[0.3][state] + 1e-12)
        assert np.all(q[0.3][state] <= values.q_star[state] + 1e-12)
