"""A fully observed grid maze in text: a fixed layout, random start cells, a fixed goal.

Layout: rows of ``.`` (free), ``#`` (wall) and one ``G`` (goal, free). Leaving the grid counts as
walking into a wall. The default is 6x6 with a loop and two dead ends (distances to G drawn in)::

    ....#G        9  8  7  6  #  0
    .##.#.       10  #  #  5  #  1
    .#....       11  #  5  4  3  2
    .#.##.       10  #  6  #  #  3
    ...#..        9  8  7  #  5  4
    #.#..#        #  9  #  7  6  #

Episode. ``reset(seed)`` draws the start uniformly from the free cells other than G (or from
``starts``). Observations:

- first: ``"Maze. Reach G. Moves: u d l r.\\n"``, the map rows (the layout as given, without the
  agent), then the position ``"r,c\\n"`` (row, column, 0-based from the top left);
- after each move: only the new position ``"r,c\\n"`` (the map does not change), so an episode of
  the default maze stays under ~200 characters.

Actions (``actions=``): ``"chars"`` (default, one token each: ``u``, ``d``, ``l``, ``r``) or ``"words"``
(``up``, ``down``, ``left``, ``right``). An action that is neither counts as a move into a wall.

Rewards: -1 per move (the move that reaches G included), plus ``wall_penalty`` (default -1) for a
move into a wall or off the grid, which leaves the position unchanged. The episode ends at G
(success) or after ``max_steps`` moves (default 20). The step cap is part of the task (the return of
"reach G within 20 moves"), so hitting it ends the episode with ``done = true``. The optimal return
from a start cell is minus its BFS distance to G (``optimal_returns``).
"""
from __future__ import annotations

import random
from collections import deque
from typing import Iterable, Sequence

from qsft_jax.envs.base import StepResult, TextEnv

DEFAULT_LAYOUT = (
    "....#G",
    ".##.#.",
    ".#....",
    ".#.##.",
    "...#..",
    "#.#..#",
)
MOVES = ("u", "d", "l", "r")  # canonical move names; the order used everywhere
DELTAS = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}
ACTION_TEXTS = {
    "chars": {"u": "u", "d": "d", "l": "l", "r": "r"},
    "words": {"u": "up", "d": "down", "l": "left", "r": "right"},
}
Cell = tuple[int, int]


def parse_layout(layout: str | Sequence[str]) -> tuple[tuple[str, ...], frozenset[Cell], Cell]:
    """Rows, free cells and the goal cell of a layout (a multi-line string or a list of rows).

    Raises ``ValueError`` unless the rows are non-empty, of equal length, made of ``.#G`` only, with
    exactly one ``G``.
    """
    rows = tuple(layout.strip("\n").split("\n")) if isinstance(layout, str) else tuple(layout)
    if not rows or not rows[0]:
        raise ValueError("maze layout is empty")
    if any(len(row) != len(rows[0]) for row in rows):
        raise ValueError(f"maze layout rows differ in length: {[len(r) for r in rows]}")
    bad = {ch for row in rows for ch in row} - set(".#G")
    if bad:
        raise ValueError(f"maze layout has characters other than '.#G': {sorted(bad)}")
    goals = [(r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch == "G"]
    if len(goals) != 1:
        raise ValueError(f"maze layout needs exactly one G, found {len(goals)}")
    free = frozenset((r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch != "#")
    return rows, free, goals[0]


def bfs_distances(free: Iterable[Cell], goal: Cell) -> dict[Cell, int]:
    """Shortest number of moves from each free cell to ``goal`` (cells that cannot reach it are absent)."""
    free = set(free)
    distances = {goal: 0}
    queue = deque([goal])
    while queue:
        r, c = queue.popleft()
        for dr, dc in DELTAS.values():
            nxt = (r + dr, c + dc)
            if nxt in free and nxt not in distances:
                distances[nxt] = distances[(r, c)] + 1
                queue.append(nxt)
    return distances


class MazeEnv(TextEnv):
    """The text maze; see the module docstring for texts and rewards."""

    name = "maze"

    def __init__(
        self,
        layout: str | Sequence[str] = DEFAULT_LAYOUT,
        max_steps: int = 20,
        wall_penalty: float = -1.0,
        actions: str = "chars",
        starts: Sequence[Cell] | None = None,
    ):
        super().__init__()
        self.rows, self.free, self.goal = parse_layout(layout)
        self.distances = bfs_distances(self.free, self.goal)
        unreachable = sorted(self.free - set(self.distances))
        if unreachable:
            raise ValueError(f"maze: free cells that cannot reach G: {unreachable}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"maze: max_steps must be a positive int, got {max_steps!r}")
        if wall_penalty > 0:
            raise ValueError(f"maze: wall_penalty is a penalty, must be <= 0, got {wall_penalty}")
        if actions not in ACTION_TEXTS:
            raise ValueError(f"maze: actions must be one of {sorted(ACTION_TEXTS)}, got {actions!r}")
        self.max_steps = max_steps
        self.max_turns = max_steps
        self.wall_penalty = float(wall_penalty)
        self.actions = actions
        self.action_texts = ACTION_TEXTS[actions]  # move name -> action text (without the stop string)
        self._move_of_text = {text: move for move, text in self.action_texts.items()}
        if starts is None:
            self.starts = tuple(sorted(self.free - {self.goal}))
        else:
            self.starts = tuple((int(r), int(c)) for r, c in starts)
            wrong = [s for s in self.starts if s not in self.free or s == self.goal]
            if not self.starts or wrong:
                raise ValueError(f"maze: starts must be free cells other than G; wrong: {wrong}")
        if not self.starts:
            raise ValueError("maze: the layout has no free cell besides G")
        best = -float(min(self.distances[s] for s in self.starts))
        worst = float(max_steps) * (-1.0 + self.wall_penalty)
        self.return_bounds = (worst, best)
        self.position: Cell = self.starts[0]
        verbs = " ".join(self.action_texts[m] for m in MOVES)
        self.prompt = f"Maze. Reach G. Moves: {verbs}.\n" + "".join(row + "\n" for row in self.rows)

    # ---- dynamics, shared with the behaviour policies and tests ----
    def next_cell(self, cell: Cell, move: str) -> Cell:
        """The cell reached from ``cell`` by ``move`` (one of ``MOVES``); ``cell`` itself into a wall."""
        dr, dc = DELTAS[move]
        nxt = (cell[0] + dr, cell[1] + dc)
        return nxt if nxt in self.free else cell

    def shortest_path_moves(self, cell: Cell) -> list[str]:
        """The moves from ``cell`` that lie on a shortest path to G (empty at G)."""
        d = self.distances[cell]
        return [m for m in MOVES if self.distances.get(self.next_cell(cell, m), d) == d - 1 and d > 0]

    def optimal_returns(self) -> dict[Cell, float]:
        """The exact optimal return from each start cell: minus its BFS distance to G, capped at
        ``max_steps`` moves (a cell farther than the cap can at best spend every move without a bump)."""
        return {s: -float(min(self.distances[s], self.max_steps)) for s in self.starts}

    def expected_optimal_return(self) -> float:
        """The optimal return averaged over the start distribution of ``reset`` (uniform over ``starts``):
        the ceiling against which an evaluation's mean return is read (-6.30 for the default maze)."""
        returns = self.optimal_returns()
        return sum(returns.values()) / len(returns)

    @staticmethod
    def format_position(cell: Cell) -> str:
        return f"{cell[0]},{cell[1]}\n"

    # ---- TextEnv ----
    def _reset(self, seed: int) -> str:
        self.position = random.Random(seed).choice(self.starts)
        return self.prompt + self.format_position(self.position)

    def _step(self, action: str) -> StepResult:
        move = self._move_of_text.get(action.lower())
        nxt = self.next_cell(self.position, move) if move is not None else self.position
        bumped = move is None or nxt == self.position
        self.position = nxt
        reward = -1.0 + (self.wall_penalty if bumped else 0.0)
        reached = nxt == self.goal
        done = reached or self.turn >= self.max_steps
        return StepResult(self.format_position(nxt), reward, done, {"success": reached, "bumped": bumped})
