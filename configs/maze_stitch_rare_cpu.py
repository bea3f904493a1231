"""Maze stitching task with a rare shortcut: Q* and Q^beta rank the start's moves differently, but the
shortest route's moves are so rare in the data that Q-SFT's extraction cannot act on its values.

    python -m qsft_jax.main --config=configs/maze_stitch_rare_cpu.py --workdir=/tmp/qsft_stitch
    python -m qsft_jax.envs.maze_values --config=configs/maze_stitch_rare_cpu.py   # the exact values below

The maze (5x5 ring around a wall, G on the right side) and the "detour" behaviour policy
(qsft_jax/envs/policies.py, `MazeDetourPolicy`): 80% of its moves follow a shortest path of the maze
with the cell (0,4) walled up, 20% are uniformly random. So from the top-left it goes the long way
(down, along the bottom, up the right side), and from (0,1)-(0,3) it turns back left, while the short
route along the top row through (0,4) appears only as random moves, each followed by good play from the
next cells: from (0,4) (real shortest path: d into G) and from cells whose own episodes start past the
detour. The data (2000 episodes, starting uniformly in every free cell) cover the short route's moves
(counts in the generated train.jsonl: r at (0,0) 44 times, at (0,1) 27, at (0,2) 24, at (0,3) 12; d at
(0,4) 143; u at (1,0) 44, at (2,0) 49) but no episode from the evaluation's start cells follows it.

    .....     evaluation starts (0,0) (0,1) (1,0) (2,0); shortest routes 5, 4, 6, 7 moves
    .###G     along the top; the behaviour's detour 11, 12, 10, 9 moves
    .###.
    .###.
    .....

Exact values (`qsft_jax.envs.maze_values`, dynamic programming over (cell, moves left, return so far)
with data.gamma 0.7 and the terminal_return transform; evaluation units, mean over the four starts):
optimal -5.50 (transformed 0.1945), greedy in Q^beta -10.50 (0.0280), the behaviour -14.40 (0.0136).
At every evaluation start the argmax of Q^beta (d, l, d, d) is not the argmax of Q* (r, r, u, u): a
policy that improves on the behaviour by its own Monte Carlo returns (return-weighted regression, MC value
heads, Q-SFT with qsft.mc_mix=1) takes the detour, and only a method that bootstraps through the other
episodes' continuations can reach -5.5. BC's most frequent moves give the detour too (-10.5). The
training data's mean return (all start cells) is -9.58, success rate 98%.

Filtered BC (top_fraction 0.1) keeps the 235 episodes with the highest first-action return, the
one-move episodes from (2,4) (u) and (0,4) (d) (threshold 1.0: ties kept): no state of the evaluation's
start cells or of the top row left of (0,4) is in its data, so it cannot have learnt the stitched path
(its moves there are extrapolation; u and d alone never reach G from them).

The table over three seeds and every method (`python scripts/results.py --column=maze_stitch_rare`,
docs/results/table_maze_stitch_rare.md): no method but MC leaves BC's -10.49. The reason is the
extraction, not the values: p_theta ~ pi_beta Q, and at (0,0) pi_beta is 0.85 for d against 0.05 for r,
so r ranks first only if Q(r) / Q(d) > 17, while the exact Q*(r) / Q*(d) is 2.2 (0.215 / 0.0995): the
extraction limit argmax pi_beta Q is -10.5 for Q*, every mc_mix and Q^beta alike (maze_values prints it).
configs/maze_stitch_cpu.py is the task with the route's moves frequent enough for that ratio to win.

Measured once before the table (seed 0, 2 shared CPU cores, about 25 minutes of training; `--config.phases=
"('bc','qsft','control','filtered_bc')"`, then `python -m qsft_jax.evaluate --workdir=DIR --episodes 12
--betas 0,64 --no_ratio --methods bc,filtered_bc,qsft`, whose 12 episodes start at (1,0) 5 times, (2,0) 3
times, (0,1) 4 times: optimal -5.58, greedy Q^beta -10.42 for that mix): BC -10.42 (the detour, success
100%), filtered BC -27.1 +- 2.8 (success 0%), Q-SFT with the CPU setting at beta 64 -10.42 (the detour
too; value correlation 0.90, at turn 0 0.97). Whether a bootstrapped setting stitches here is what the
task measures.

Phases as maze_cpu.py (BC, Q-SFT, the control); the baselines with
`--config.phases="('bc','qsft','control','filtered_bc','mc','ilql')"`; the paper's phase-2 setting with
`--config=configs/maze_stitch_rare_cpu.py:paper`. Scale as maze_trap_cpu.py: 2000 training episodes of at
most 20 moves, rows of 256 characters.
"""
import os

from qsft_jax import config_lib

LAYOUT = (
    ".....",
    ".###G",
    ".###.",
    ".###.",
    ".....",
)
EVAL_STARTS = ((0, 0), (0, 1), (1, 0), (2, 0))  # every cell where greedy Q^beta is not optimal at the start


def get_config(setting: str = ""):
  """setting: "" (default) or "paper" (`--config=configs/maze_stitch_rare_cpu.py:paper`), as maze_cpu.py."""
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "maze_cpu.py"), setting)
  c.env.layout = LAYOUT
  c.env.starts = EVAL_STARTS  # evaluation; the data start anywhere (dataset.options.starts)
  c.dataset.policy = "detour"
  data_starts = tuple((r, col) for r, row in enumerate(LAYOUT) for col, ch in enumerate(row) if ch == ".")
  c.dataset.options = {"starts": data_starts, "avoid": ("0,4",), "optimal_prob": 0.8}
  return c
