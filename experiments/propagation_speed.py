"""How fast do values reach the first turn? Q-SFT value-propagation settings on a deep tabular MDP.

A corridor task shaped like the text maze (qsft_jax/envs/maze.py): T agent turns of 2 tokens each
(a direction L / S / R, then a step size a = 1, b = 1, c = 2), the environment's observation token
(the new position; a move slips, i.e. does not happen, with probability SLIP) between turns, and one
reward at the end: (final position / (P - 1))^2 in [0, 1]. The behaviour policy prefers L (the wrong
way) so that greedy BC is poor and values must travel back ~2T token steps.

The "model" is tabular on the Markov state (turn, position, tokens of the turn so far): one-hot hidden
states [B, L, S] and a logit table [S, V_pad], trained through the project's own `losses.qsft_loss`
(dummy-token WCE) with `train_steps.update_target`, full batch, Adam at a constant learning rate.
phi is the exact BC optimum (log of the dataset's action frequencies per state).

For each setting the script reports:
  steps    optimizer steps until max |p_theta / pi_phi - fixed point| <= TOL over the first turn's
           covered (state, token) pairs ("-" = not within the budget);
  corr@K   correlation of p_theta / pi_phi with Q* (exact DP on the true MDP) over those pairs after
           K steps, and at the end of the budget;
  fp_corr, fp_gap  the setting's own fixed point (closed-form WCE iteration on the dataset, with the
           library's `compute_targets`): its correlation with Q* and max |fixed point - Q*| at the first
           turn (bias of the setting; the empirical MDP of a finite dataset adds its own noise).

    python experiments/propagation_speed.py [--episodes 400] [--steps 2000] [--quick] [--only TEXT]

The last line is one JSON object with every row.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mdp_utils  # noqa: E402  tests/mdp_utils.py: token-level MDP arrays from token episodes
from qsft_jax import cli, losses, train_steps  # noqa: E402

PAD, BOS, L_, S_, R_, A_, B_, C_, DUMMY = range(9)
DIRS, SIZES = (L_, S_, R_), (A_, B_, C_)
MOVE = {L_: -1, S_: 0, R_: 1}
SIZE = {A_: 1, B_: 1, C_: 2}
P, T, SLIP, GOAL = 13, 6, 0.4, 12
POS0 = 9  # position tokens 9 .. 9 + P - 1
VOCAB, V_PAD = POS0 + P, 24
DIR_PROBS, SIZE_PROBS = (0.5, 0.2, 0.3), (0.4, 0.4, 0.2)
STARTS = (0, 2, 4, 6)
TOL, SUPPORT_MIN = 0.05, 0.05
LOGIT_FLOOR = -8.0


def final_reward(pos):
  return (pos / (P - 1)) ** 2


def move(pos, d, s):
  return int(np.clip(pos + MOVE[d] * SIZE[s], 0, P - 1))


# ---------------------------------------------------------------------------------- the task


class States:
  """Ids of the Markov states a row's output describes; 0 = a row never trained or bootstrapped."""

  def __init__(self):
    self.ids = {}

  def __call__(self, key):
    return self.ids.setdefault(key, len(self.ids) + 1)


def sample_dataset(n, seed):
  """(batch of [N, L] arrays, states [N, L] int)."""
  rng = np.random.default_rng(seed)
  states = States()
  eps, rows = [], []
  for _ in range(n):
    pos = int(rng.choice(STARTS))
    turns = [([BOS], False, 0.0), ([POS0 + pos], False, 0.0)]
    row_states = [0, states((0, pos, None))]
    for t in range(T):
      d = DIRS[rng.choice(3, p=DIR_PROBS)]
      s = SIZES[rng.choice(3, p=SIZE_PROBS)]
      new = pos if rng.random() < SLIP else move(pos, d, s)
      last = t == T - 1
      turns.append(([d, s], True, final_reward(new) if last else 0.0))
      row_states += [states((t, pos, d)), 0]  # the row after s predicts the observation: unused
      pos = new
      if not last:
        turns.append(([POS0 + pos], False, 0.0))
        row_states.append(states((t + 1, pos, None)))
    eps.append(mdp_utils.episode_arrays(turns, True))
    rows.append(row_states)
  length = len(rows[0])
  batch = mdp_utils.pack_rows([[e] for e in eps], length)
  return batch, np.array(rows, np.int32), states.ids


def q_star():
  """Exact Q*[(t, pos, None), d] and Q*[(t, pos, d), s] on the true MDP (dict)."""
  q, v = {}, {}
  for t in reversed(range(T)):
    for pos in range(P):
      for d in DIRS:
        for s in SIZES:
          outcomes = [(SLIP, pos), (1 - SLIP, move(pos, d, s))]
          q[((t, pos, d), s)] = sum(p * (final_reward(x) if t == T - 1 else v[(t + 1, x)])
                                    for p, x in outcomes)
        q[((t, pos, None), d)] = max(q[((t, pos, d), s)] for s in SIZES)
      v[(t, pos)] = max(q[((t, pos, None), d)] for d in DIRS)
  return q


def behaviour_table(batch, states, num_states):
  """Exact BC optimum: log of the dataset's token frequencies per state ([S, V_PAD] logits)."""
  counts = np.zeros((num_states, V_PAD))
  for b, i in zip(*np.nonzero(batch["action_mask"])):
    counts[states[b, i - 1], batch["tokens"][b, i]] += 1
  logits = np.log(np.maximum(counts, 1e-12) / np.maximum(counts.sum(-1, keepdims=True), 1))
  # Floor: a trained LM gives unseen tokens a small probability, not exp(-30); with the floor at -8
  # (3e-4, far below support_min) the dummy token can gain mass at Adam's speed in ~100 steps.
  return np.maximum(logits, LOGIT_FLOOR).astype(np.float32), counts


# ---------------------------------------------------------------------------------- fixed points


def fixed_point(batch, states, pi, mode, mc_mix, n_step, rounds=80):
  """Closed-form WCE Bellman iteration on the dataset (dummy variant):
  p(a | s) = E_data[w 1{x = a} | s], w from `losses.compute_targets`. Returns p [S, V_PAD]."""
  num_states = pi.shape[0]
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  mask = batch["action_mask"]
  bi, ii = np.nonzero(mask)
  s_of, x_of = states[bi, ii - 1], batch["tokens"][bi, ii]
  count = np.bincount(s_of, minlength=num_states).astype(np.float64)
  supported = pi >= np.minimum(SUPPORT_MIN, pi.max(-1, keepdims=True))
  p = np.full_like(pi, 1.0 / VOCAB)
  targets_fn = jax.jit(functools.partial(
      losses.compute_targets, targets=losses.TargetConfig(mode=mode, mc_mix=mc_mix, n_step=n_step)))
  for _ in range(rounds):
    value = np.where(supported, p / np.maximum(pi, 1e-30), -np.inf).max(-1)
    w = np.asarray(targets_fn(jnp.asarray(value[states], jnp.float32), jb)[0])[bi, ii]
    new = np.zeros_like(p)
    np.add.at(new, (s_of, x_of), w)
    np.add.at(new, (s_of, np.full_like(s_of, DUMMY)), 1 - w)
    seen = count > 0
    new[seen] /= count[seen, None]
    new[~seen] = p[~seen]
    done = np.abs(new - p).max() < 1e-7
    p = new
    if done:
      break
  return p


# ---------------------------------------------------------------------------------- training


@functools.partial(jax.jit, static_argnames=("blocks", "every_eval", "lr", "tau", "every", "mode",
                                             "mc_mix", "n_step"))
def train(batch, one_hot, phi, theta0, watch, blocks, every_eval, lr, tau, every, mode, mc_mix, n_step):
  """Returns softmax(theta)[watch] after every block of `every_eval` steps: [blocks, W, V_PAD]."""
  n = losses.action_token_count(batch["action_mask"])
  opt = optax.adam(lr, b2=0.99)

  def loss_fn(table, target_table):
    return losses.qsft_loss(one_hot, table, one_hot, target_table, one_hot, phi, batch, n,
                            vocab_size=VOCAB, chunk_size=one_hot.shape[1],
                            targets=losses.TargetConfig(mode=mode, support_min=SUPPORT_MIN,
                                                        dummy_token=DUMMY, mc_mix=mc_mix,
                                                        n_step=n_step))[0]

  def step(carry, i):
    table, target_table, opt_state = carry
    grads = jax.grad(loss_fn)(table, target_table)
    updates, opt_state = opt.update(grads, opt_state)
    table = optax.apply_updates(table, updates)
    update = train_steps.TargetUpdate(tau=tau, every=every)
    return (table, train_steps.update_target(target_table, table, i + 1, update), opt_state), None

  def block(carry, b):
    carry, _ = jax.lax.scan(step, carry, b * every_eval + jnp.arange(every_eval))
    probs = jax.nn.softmax(carry[0][:, :VOCAB], -1)
    return carry, probs[watch]

  _, out = jax.lax.scan(block, (theta0, theta0, opt.init(theta0)), jnp.arange(blocks))
  return out


SETTINGS = [  # (name, options); the base is token bootstrap, Polyak tau 0.05, theta from phi
    ("token, tau 0.005", dict(tau=0.005)),
    ("token, tau 0.05 (base)", dict()),
    ("token, hard every 20", dict(every=20)),
    ("token, hard every 100", dict(every=100)),
    ("turn, tau 0.05", dict(mode="turn")),
    ("turn, hard every 20", dict(mode="turn", every=20)),
    ("token, mc_mix 0.3", dict(mc_mix=0.3)),
    ("token, mc_mix 0.7", dict(mc_mix=0.7)),
    ("token, n_step 2", dict(n_step=2)),
    ("token, n_step 4", dict(n_step=4)),
    ("token, theta fresh", dict(init="fresh")),
    ("token, theta pretrained-like", dict(init="pretrained")),
]


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_integer("episodes", 400, "Sampled episodes in the dataset.", flag_values=fv)
  flags.DEFINE_integer("steps", 2000, "Optimizer steps per setting.", flag_values=fv)
  flags.DEFINE_integer("eval_every", 25, "Steps between measurements.", flag_values=fv)
  flags.DEFINE_float("lr", 0.03, "Adam learning rate (constant).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Dataset and initialisation seed.", flag_values=fv)
  flags.DEFINE_bool("quick", False, "3 settings, 1000 steps (a smoke run).", flag_values=fv)
  flags.DEFINE_string("only", "", "Run the settings whose name contains this text.", flag_values=fv)
  return fv


def main(argv: list[str] | None = None) -> int:
  """Runs the experiment; argv as sys.argv holds it (the program name first)."""
  args = define_flags()
  cli.parse(args, argv, prog="python experiments/propagation_speed.py", doc=__doc__)
  settings = [s for s in (SETTINGS[:3] if args.quick else SETTINGS) if args.only in s[0]]
  steps = 1000 if args.quick else args.steps
  blocks = steps // args.eval_every

  batch, states, ids = sample_dataset(args.episodes, args.seed)
  num_states = len(ids) + 1
  one_hot = jnp.asarray(np.eye(num_states, dtype=np.float32)[states])
  phi, counts = behaviour_table(batch, states, num_states)
  pi = np.exp(phi[:, :VOCAB].astype(np.float64))
  pi /= pi.sum(-1, keepdims=True)
  qs = q_star()
  # first turn's covered (state, token) pairs, both tokens of the utterance, >= 10 samples each
  pairs = [(ids[key], a, value) for (key, a), value in qs.items()
           if key[0] == 0 and key in ids and counts[ids[key], a] >= 10]
  watch = np.array(sorted({s for s, _, _ in pairs}), np.int32)
  where = {s: j for j, s in enumerate(watch)}
  ps = np.array([where[s] for s, _, _ in pairs])
  pa = np.array([a for _, a, _ in pairs])
  qv = np.array([v for _, _, v in pairs])
  pi_pairs = pi[watch[ps], pa]
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  rng = np.random.default_rng(args.seed + 1)
  fresh = rng.normal(0.0, 1.0, phi.shape).astype(np.float32)
  pretrained = np.full(phi.shape, LOGIT_FLOOR, np.float32)
  pretrained[:, list(DIRS) + list(SIZES)] = 0.0  # knows the action format, not which move is good
  inits = {"phi": phi, "fresh": fresh, "pretrained": pretrained}
  print(f"{args.episodes} episodes, {T} turns x 2 tokens, {len(pairs)} first-turn pairs, "
        f"{num_states} states, dataset mean return {batch['returns_to_go'][:, 2].mean():.3f}; "
        f"Adam lr {args.lr}, {steps} full-batch steps, tolerance {TOL}", flush=True)

  rows = []
  mid = min(1000, steps)
  header = (f"{'setting':32s} {'steps':>6s} {'corr@' + str(mid):>9s} {'corr@end':>9s} "
            f"{'fp_corr':>8s} {'fp_gap':>7s} {'sec':>5s}")
  print(header)
  for name, opts in settings:
    o = {**dict(tau=0.05, every=0, mode="token", mc_mix=0.0, n_step=1, init="phi"), **opts}
    if o["every"]:
      o["tau"] = 0.0
    fp = fixed_point(batch, states, pi, o["mode"], o["mc_mix"], o["n_step"])
    fp_ratio = fp[watch[ps], pa] / pi_pairs
    start = time.time()
    probs = np.asarray(train(jb, one_hot, jnp.asarray(phi), jnp.asarray(inits[o["init"]]),
                             jnp.asarray(watch), blocks, args.eval_every, args.lr, o["tau"],
                             o["every"], o["mode"], o["mc_mix"], o["n_step"]))
    secs = time.time() - start
    ratio = probs[:, ps, pa] / pi_pairs  # [blocks, pairs]
    err = np.abs(ratio - fp_ratio).max(-1)
    within = np.nonzero(err <= TOL)[0]
    # the first evaluation from which the error stays within the tolerance
    reached = None
    if len(within) and err[within[-1]:].max() <= TOL and err[-1] <= TOL:
      bad = np.nonzero(err > TOL)[0]
      reached = int((bad[-1] + 2 if len(bad) else 1) * args.eval_every)
    corr = lambda x: float(np.corrcoef(x, qv)[0, 1])
    row = dict(setting=name, options=o, steps_to_tol=reached,
               corr_mid=corr(ratio[mid // args.eval_every - 1]), corr_end=corr(ratio[-1]),
               final_error=float(err[-1]), fp_corr=corr(fp_ratio),
               fp_gap=float(np.abs(fp_ratio - qv).max()), seconds=round(secs, 1))
    rows.append(row)
    print(f"{name:32s} {str(reached or '-'):>6s} {row['corr_mid']:9.3f} {row['corr_end']:9.3f} "
          f"{row['fp_corr']:8.3f} {row['fp_gap']:7.3f} {secs:5.0f}", flush=True)
  print(json.dumps({"episodes": args.episodes, "steps": steps, "lr": args.lr, "tol": TOL,
                    "rows": rows}))
  return 0


if __name__ == "__main__":
  cli.run(main)
