"""Exact values of a maze task and a behaviour policy, by dynamic programming.

For a ``MazeEnv``, a maze behaviour policy of ``policies.py`` (anything with ``move_probabilities(env,
cell) -> {move: probability}``, a function of the cell alone), the per-turn discount ``gamma_turn`` and
the data layer's reward transform, ``exact_values`` computes over the finite-horizon MDP the training
data define:

- Q* and Q^beta (the behaviour's own action values) per (state, move), in the transformed, discounted
  units the methods learn (the return of the first action as the token-level MDP arrays define it,
  ``data.reward_transform`` and ``data.gamma``, with every action one turn);
- the expected returns, from the start distribution of ``reset`` (uniform over ``env.starts``), of the
  optimal policy, of the behaviour, and of the policy greedy in Q^beta (one step of policy
  improvement over the behaviour: what return-weighted regression and Monte Carlo value methods
  approach), each in transformed units and in the task's original units (the undiscounted sum of the
  environment's rewards, what evaluation reports);
- the states where the greedy choice of Q^beta is not optimal under Q*, with the probability that the
  behaviour visits each: where only stitching (bootstrapping through other episodes' continuations) can
  find the better move;
- Q-SFT's fixed point with Monte Carlo mixing lam (``mc_mixes``; per-turn bootstrap, n_step 1, the max
  over every move: docs/algorithm.md section 4), Q_lam(s, a) = (1 - lam) E[r + gamma max Q_lam(s')] +
  lam Q^beta(s, a), which is Q* at lam 0 and Q^beta at lam 1;
- the extraction limit of each Q (Q*, each Q_lam, Q^beta): the expected return of the policy
  argmax_a pi_beta(a | s) Q(s, a), which pi_phi * exp(beta p_theta) approaches as beta grows when
  p_theta = pi_beta Q (docs/algorithm.md section 10).

State. ``(cell, moves_left, past)``: the agent's cell, the moves it may still make (``max_steps`` at the
start), and the original return collected so far. ``past`` matters only for ``terminal_return``, whose
one reward, on the last action, is the normalised episode return; for the per-step transforms
(``none``, ``affine``) it is always 0.0 so the states are (cell, moves left). Moves are the four of
``maze.MOVES`` in that order (the behaviour policies only emit those; any other text is a wall bump).
An episode ends at G or when no move is left.

Argmax ties (several shortest-path moves) are sets: the greedy policy splits its probability evenly
over the maxima of Q^beta (relative tolerance ``TIE_RTOL``), and a state disagrees when some maximum of
Q^beta is not a maximum of Q*.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from qsft_jax import cli
from qsft_jax.data.rewards import RewardTransform
from qsft_jax.envs.maze import MOVES, Cell, MazeEnv

State = tuple[Cell, int, float]  # (cell, moves left, original return so far)
TIE_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Disagreement:
    """A state where a greedy move of Q^beta is not optimal. Moves as strings of ``MOVES``;
    ``visit_probability``: the probability that a behaviour episode acts in this state."""

    state: State
    optimal_moves: tuple[str, ...]
    q_beta_moves: tuple[str, ...]
    visit_probability: float
    q_star: np.ndarray  # [4]
    q_beta: np.ndarray  # [4]


@dataclasses.dataclass(frozen=True)
class PolicyReturns:
    """Expected returns of one policy: ``transformed`` (discounted, transformed units; the values the
    methods learn) and ``original`` (the sum of the environment's rewards, as evaluation reports)."""

    transformed: float
    original: float


@dataclasses.dataclass(frozen=True)
class MazeValues:
    """What ``exact_values`` returns; see the module docstring.

    q_star, q_beta: state -> float64 [4] (``MOVES`` order), over every state reachable from a start.
    start_states: the state (start, max_steps, 0.0) of each start cell, in ``env.starts`` order.
    optimal, greedy_q_beta, behaviour: PolicyReturns averaged over the start cells (uniform);
    by_start: start cell -> {"optimal", "greedy_q_beta", "behaviour", "limit/NAME" for each extraction
      limit} PolicyReturns from that cell.
    disagreements: sorted by visit probability, highest first.
    visit_probability: state -> probability that a behaviour episode acts there.
    q_mc_mix: lam -> Q_lam (state -> float64 [4]) for each of ``mc_mixes``.
    extraction_limit: "q_star", "mc_mix {lam:g}", "q_beta" -> PolicyReturns of argmax pi_beta Q over
      the start cells.
    """

    q_star: dict[State, np.ndarray]
    q_beta: dict[State, np.ndarray]
    start_states: tuple[State, ...]
    optimal: PolicyReturns
    greedy_q_beta: PolicyReturns
    behaviour: PolicyReturns
    by_start: dict[Cell, dict[str, PolicyReturns]]
    disagreements: tuple[Disagreement, ...]
    visit_probability: dict[State, float]
    q_mc_mix: dict[float, dict[State, np.ndarray]] = dataclasses.field(default_factory=dict)
    extraction_limit: dict[str, PolicyReturns] = dataclasses.field(default_factory=dict)

    @property
    def optimal_return(self) -> float:
        """The optimal policy's expected transformed return from the start distribution."""
        return self.optimal.transformed

    @property
    def greedy_q_beta_return(self) -> float:
        """The expected transformed return of acting greedily in Q^beta from the start distribution."""
        return self.greedy_q_beta.transformed

    @property
    def behaviour_return(self) -> float:
        """The behaviour's expected transformed return from the start distribution."""
        return self.behaviour.transformed

    def start_disagreements(self) -> list[Disagreement]:
        """The disagreements at the start states."""
        starts = set(self.start_states)
        return [d for d in self.disagreements if d.state in starts]

    def disagreement_visits_by_cell(self) -> dict[Cell, float]:
        """Cell -> expected number of behaviour actions per episode taken in a disagreeing state of the
        cell (any moves left, any past return), highest first."""
        out: dict[Cell, float] = {}
        for d in self.disagreements:
            out[d.state[0]] = out.get(d.state[0], 0.0) + d.visit_probability
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self) -> str:
        """A few lines: the three returns in both units and the most visited disagreements."""
        def fmt(name: str, r: PolicyReturns) -> str:
            return f"{name}: {r.original:.3f} (transformed {r.transformed:.4f})"
        lines = [fmt("optimal", self.optimal), fmt("greedy Q^beta", self.greedy_q_beta),
                 fmt("behaviour", self.behaviour),
                 f"states where argmax Q^beta is not optimal: {len(self.disagreements)}, at start states: "
                 f"{len(self.start_disagreements())}"]
        for cell, visits in list(self.disagreement_visits_by_cell().items())[:8]:
            lines.append(f"  cell {cell[0]},{cell[1]}: {visits:.3f} behaviour actions per episode")
        return "\n".join(lines)


def _argmax_set(q: np.ndarray) -> tuple[int, ...]:
    best = q.max()
    return tuple(int(i) for i in np.flatnonzero(np.isclose(q, best, rtol=TIE_RTOL, atol=0.0) | (q == best)))


def exact_values(env: MazeEnv, policy: Any, gamma_turn: float, reward_transform: Any = None,
                 mc_mixes: tuple[float, ...] = (0.25, 0.5)) -> MazeValues:
    """Q*, Q^beta, the optimal, greedy-in-Q^beta and behaviour returns, the disagreeing states, and the
    mc_mix fixed points and extraction limits of ``env`` under the behaviour ``policy`` (see the module
    docstring). ``reward_transform``: a ``RewardTransform`` or its spec string (``data.reward_transform``);
    None = "none"."""
    transform = RewardTransform.from_config(reward_transform)
    if not 0.0 <= gamma_turn <= 1.0:
        raise ValueError(f"gamma_turn must be in [0, 1], got {gamma_turn}")
    terminal = transform.kind == "terminal_return"
    affine = transform.kind == "affine"
    scale = (transform.high - transform.low) * transform.horizon(gamma_turn) if affine else 1.0
    behaviour = {cell: np.array([policy.move_probabilities(env, cell).get(m, 0.0) for m in MOVES])
                 for cell in env.free - {env.goal}}
    for cell, p in behaviour.items():
        if not np.isclose(p.sum(), 1.0):
            raise ValueError(f"behaviour move probabilities at {cell} sum to {p.sum()}, not 1")

    def transitions(state: State):
        """[(move index, next state or None when the episode ends, original reward, transformed reward)]."""
        cell, left, past = state
        out = []
        for i, m in enumerate(MOVES):
            nxt = env.next_cell(cell, m)
            r = -1.0 + (env.wall_penalty if nxt == cell else 0.0)
            done = nxt == env.goal or left == 1
            if transform.kind == "none":
                r_t = r
            elif transform.kind == "affine":
                r_t = (r - transform.low) / scale
            else:
                r_t = (past + r - transform.low) / (transform.high - transform.low) if done else 0.0
            out.append((i, None if done else (nxt, left - 1, past + r if terminal else 0.0), r, r_t))
        return out

    # Every state reachable from a start under any moves, by moves left (forward), with its transitions.
    start_states = tuple((s, env.max_steps, 0.0) for s in env.starts)
    levels: list[list[State]] = [list(dict.fromkeys(start_states))]
    edges: dict[State, list] = {}
    while levels[-1]:
        following: dict[State, None] = {}
        for state in levels[-1]:
            edges[state] = transitions(state)
            for _, nxt, _, _ in edges[state]:
                if nxt is not None:
                    following[nxt] = None
        levels.append(list(following))

    def backward(choose: Callable[[State, np.ndarray], np.ndarray] | None, field: int,
                 discount: float, q_of: dict[State, np.ndarray] | None = None) -> dict[State, float]:
        """Values of every state, latest states first. choose(state, q) -> move probabilities [4]; None
        = the max (Q*). field: 3 transformed rewards, 2 original. q_of receives the Q rows when given."""
        values: dict[State, float] = {}
        for level in reversed(levels):
            for state in level:
                q = np.array([e[field] + (discount * values[e[1]] if e[1] is not None else 0.0)
                              for e in edges[state]])
                if q_of is not None:
                    q_of[state] = q
                values[state] = float(q.max()) if choose is None else float(choose(state, q) @ q)
        return values

    beta_probs = lambda state, q: behaviour[state[0]]
    q_star: dict[State, np.ndarray] = {}
    q_beta: dict[State, np.ndarray] = {}
    backward(None, 3, gamma_turn, q_star)
    backward(beta_probs, 3, gamma_turn, q_beta)

    def mixed(lam: float) -> dict[State, np.ndarray]:
        """Q_lam, latest states first: (1 - lam) (r + gamma max Q_lam(s')) + lam Q^beta (r alone at the end)."""
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"mc_mix must be in [0, 1], got {lam}")
        q_lam: dict[State, np.ndarray] = {}
        for level in reversed(levels):
            for state in level:
                boot = np.array([e[3] + (gamma_turn * q_lam[e[1]].max() if e[1] is not None else 0.0)
                                 for e in edges[state]])
                q_lam[state] = (1.0 - lam) * boot + lam * q_beta[state]
        return q_lam

    q_mc_mix = {float(lam): mixed(float(lam)) for lam in mc_mixes}

    def uniform_over(argmax_of: dict[State, np.ndarray]):
        def choose(state, q):
            p = np.zeros(len(MOVES))
            best = _argmax_set(argmax_of[state])
            p[list(best)] = 1.0 / len(best)
            return p
        return choose

    policies = {"optimal": uniform_over(q_star), "greedy_q_beta": uniform_over(q_beta), "behaviour": beta_probs}
    limits = {"q_star": q_star, **{f"mc_mix {lam:g}": q for lam, q in q_mc_mix.items()}, "q_beta": q_beta}
    for name, q in limits.items():
        policies[f"limit/{name}"] = uniform_over({s: behaviour[s[0]] * row for s, row in q.items()})
    by_start: dict[Cell, dict[str, PolicyReturns]] = {s[0]: {} for s in start_states}
    means = {}
    for name, choose in policies.items():
        transformed = backward(choose, 3, gamma_turn)
        original = backward(choose, 2, 1.0)
        for s in start_states:
            by_start[s[0]][name] = PolicyReturns(transformed[s], original[s])
        means[name] = PolicyReturns(float(np.mean([transformed[s] for s in start_states])),
                                    float(np.mean([original[s] for s in start_states])))

    # The behaviour's probability of acting in each state (forward).
    visit: dict[State, float] = {}
    for s in start_states:
        visit[s] = visit.get(s, 0.0) + 1.0 / len(start_states)
    for level in levels:
        for state in level:
            p = visit.get(state, 0.0)
            if p == 0.0:
                continue
            for i, nxt, _, _ in edges[state]:
                if nxt is not None:
                    visit[nxt] = visit.get(nxt, 0.0) + p * behaviour[state[0]][i]

    disagreements = []
    for state, qb in q_beta.items():
        star, greedy = _argmax_set(q_star[state]), _argmax_set(qb)
        if not set(greedy) <= set(star):
            disagreements.append(Disagreement(
                state=state, optimal_moves=tuple(MOVES[i] for i in star),
                q_beta_moves=tuple(MOVES[i] for i in greedy), visit_probability=visit.get(state, 0.0),
                q_star=q_star[state], q_beta=qb))
    disagreements.sort(key=lambda d: (-d.visit_probability, d.state))
    return MazeValues(q_star=q_star, q_beta=q_beta, start_states=start_states, optimal=means["optimal"],
                      greedy_q_beta=means["greedy_q_beta"], behaviour=means["behaviour"], by_start=by_start,
                      disagreements=tuple(disagreements), visit_probability=visit, q_mc_mix=q_mc_mix,
                      extraction_limit={k.removeprefix("limit/"): v for k, v in means.items()
                                        if k.startswith("limit/")})


def config_values(config: Any) -> MazeValues:
    """``exact_values`` for a run config of the maze task: its environment (``config.env``, with the
    generation's ``dataset.options`` that the environment takes), its behaviour policy
    (``dataset.policy`` with its options), ``data.gamma`` and ``data.reward_transform``. The values are
    from the evaluation's start cells (``config.env``'s own ``starts``, when set)."""
    from qsft_jax.envs.generate import make_policy, split_options

    if config.task != "maze":
        raise ValueError(f"config.task is {config.task!r}, not 'maze'")
    env_options = dict(config.env.to_dict())
    options = {**env_options, **config.dataset.options.to_dict()}
    env_kwargs, policy_kwargs = split_options("maze", config.dataset.policy, options)
    env_kwargs = {k: v for k, v in env_kwargs.items() if k != "starts"}  # the data's starts may differ
    if "starts" in env_options:
        env_kwargs["starts"] = env_options["starts"]
    env = MazeEnv(**env_kwargs)
    policy = make_policy("maze", config.dataset.policy, **policy_kwargs)
    return exact_values(env, policy, config.data.gamma, config.data.reward_transform)


def main(argv: list[str] | None = None) -> int:
    """``python -m qsft_jax.envs.maze_values --config=configs/NAME.py``: prints ``MazeValues.summary``."""
    import sys

    argv = list(sys.argv if argv is None else argv)
    fv = cli.new_flags()
    cli.config_flag(fv, argv)
    cli.parse(fv, argv, prog="python -m qsft_jax.envs.maze_values", doc=main.__doc__, required=["config"])
    values = config_values(fv.config)
    print(values.summary())
    print("extraction limit, argmax pi_beta Q: " + ", ".join(
        f"{name.replace('q_star', 'Q*').replace('q_beta', 'Q^beta')} {r.original:.2f}"
        for name, r in values.extraction_limit.items()))
    disagree = {d.state[0]: d for d in values.start_disagreements()}
    for cell, returns in values.by_start.items():
        line = (f"start {cell[0]},{cell[1]}: optimal {returns['optimal'].original:.2f}, greedy Q^beta "
                f"{returns['greedy_q_beta'].original:.2f}, behaviour {returns['behaviour'].original:.2f}")
        if cell in disagree:
            d = disagree[cell]
            line += f"; argmax Q* {'/'.join(d.optimal_moves)}, argmax Q^beta {'/'.join(d.q_beta_moves)}"
        print(line)
    return 0


if __name__ == "__main__":
    cli.run(main)
