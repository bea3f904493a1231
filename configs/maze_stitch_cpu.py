"""Maze stitching task: the behaviour's own returns rank the shortest route's first move below a detour;
values backed up through other episodes' continuations rank it first.

    python -m qsft_jax.main --config=configs/maze_stitch_cpu.py --workdir=/tmp/qsft_stitch
    python -m qsft_jax.envs.maze_values --config=configs/maze_stitch_cpu.py   # the exact values below
    python scripts/results.py --column=maze_stitch --seeds=0,1,2 --root=/tmp/qsft_table --out=docs/results/

The maze (a 5x7 ring around a wall, G on the right side) and the "detour" behaviour policy
(qsft_jax/envs/policies.py, `MazeDetourPolicy`): per move, 50% a move of its plan, which treats the cell
(0,6) above G as a wall, 30% a move on the real shortest path, 20% a uniformly random move. So along the
top row it turns back left (plan) more often than it goes on right (shortest path): the top route to G
is in the data as frequent single moves, but an episode that takes it from the left end rarely keeps to
it, and its return after the route's first move is poor. The data: 2000 episodes, starting uniformly in
every free cell.

    .......   evaluation starts (0,0) (1,0) (2,0): shortest routes 7, 8, 9 moves along the top
    .#####G
    .#####.
    .#####.
    .......

Exact values (`qsft_jax.envs.maze_values`, dynamic programming over (cell, moves left, return so far)
with data.gamma 0.7 and the terminal_return transform; evaluation units, mean over the three starts):
optimal -8.00, greedy in Q^beta -12.00 (the detour from every start), the behaviour -19.06. At each start
the argmax of Q^beta (d, d, d) is not the argmax of Q* (r, u, u).

What each method can reach, from the exact fixed points (the policy argmax_a pi_beta(a|s) Q(s, a) that
Q-SFT's extraction approaches as beta grows, p_theta ~ pi_beta Q; evaluation units, over the starts):
- Q = Q* (Q-SFT bootstrapping with mc_mix 0): -8.00, the shortest route.
- mc_mix 0.25: -8.67; mc_mix 0.5 (the CPU setting): -10.00; mc_mix 1 (Q^beta, return-weighted
  regression): -12.00, the detour.
- MC value heads at large beta (greedy in Q^beta): -12.00. BC's most frequent moves: -12.00.
So in the limit the task separates bootstrapping from Monte Carlo returns by 4 moves, and a method beats
-12 only by backing values up through r + gamma V(s') from other episodes. At the betas the table tries
(up to 256) the limit is not reached: the values at the starts are small (Q* 0.02-0.10), so the bonus
beta * pi_beta * Q is small too; the measured column and its reasons are in docs/results.md. The generated data (seed 0) hold the
route's moves often (r at (0,0)-(0,5): 536, 503, 436, 392, 302, 160 times; u at (1,0) 503, at (2,0) 369)
but the turn back more often (l at (0,1)-(0,5): 826, 725, 584, 460, 267); mean return -11.66, success
77%. Filtered BC's top 10% (290 episodes, ties kept) start at (0,5), (0,6), (2,6) and (3,6), next to G:
no state of the evaluation's start cells is in its data.

configs/maze_stitch_rare_cpu.py is the same idea with the route's moves rare in the data (random moves
only, pi_beta 0.05 at the starts): there Q* and Q^beta differ as well, but no setting of Q-SFT's
extraction can act on it (pi_beta Q* ranks the detour first at every start), and the measured table
(docs/results/table_maze_stitch_rare.md) shows every method at BC's return but MC.

Phases as maze_cpu.py (BC, Q-SFT, the control); the baselines with
`--config.phases="('bc','qsft','control','filtered_bc','mc','ilql')"`; the paper's phase-2 setting with
`--config=configs/maze_stitch_cpu.py:paper`. Scale as maze_trap_cpu.py: 2000 training episodes of at
most 20 moves, rows of 256 characters.
"""
import os

from qsft_jax import config_lib

LAYOUT = (
    ".......",
    ".#####G",
    ".#####.",
    ".#####.",
    ".......",
)
EVAL_STARTS = ((0, 0), (1, 0), (2, 0))  # the cells where greedy Q^beta is not optimal at the start


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=configs/maze_stitch_cpu.py:paper`), as maze_cpu.py."""
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "maze_cpu.py"), setting)
  c.env.layout = LAYOUT
  c.env.starts = EVAL_STARTS  # evaluation; the data start anywhere (dataset.options.starts)
  c.dataset.policy = "detour"
  data_starts = tuple((r, col) for r, row in enumerate(LAYOUT) for col, ch in enumerate(row) if ch == ".")
  c.dataset.options = {"starts": data_starts, "avoid": ("0,6",), "optimal_prob": 0.5, "shortcut_prob": 0.3}
  return c
