"""Test helpers: token-level MDP arrays built from token-level episodes, and small tabular MDPs.

`episode_arrays` is written from docs/architecture.md's table, independently of qsft_jax.data, so
the loss tests do not depend on the data layer (and would disagree with it if either misread the
contract). An episode here is (turns, done) with turns = [(token ids, is_action, reward), ...].
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

KEYS_INT = ("tokens", "positions", "segment_ids", "next_action_row", "next_turn_row", "turn_index")
KEYS_FLOAT = ("rewards", "discounts", "turn_discounts", "returns_to_go")
KEYS_BOOL = ("action_mask", "done")
PAD_VALUES = {"next_action_row": -1, "next_turn_row": -1, "turn_index": -1}


def episode_arrays(turns, done: bool, gamma: float = 1.0, gamma_token: float = 1.0) -> dict:
  """The [n] arrays of one episode (segment id 1, rows relative to the episode start)."""
  tokens, is_action, turn_of, rewards = [], [], [], []
  for t, (ids, act, reward) in enumerate(turns):
    assert len(ids) > 0
    assert act or reward == 0.0
    for j, tok in enumerate(ids):
      tokens.append(tok)
      is_action.append(act)
      turn_of.append(t)
      rewards.append(reward if (act and j == len(ids) - 1) else 0.0)
  n = len(tokens)
  assert not is_action[0], "episodes start with an observation"
  assert done or not is_action[-1], "truncated episodes end with an observation"
  out = {k: np.full(n, PAD_VALUES.get(k, 0), np.int32) for k in KEYS_INT}
  out.update({k: np.zeros(n, np.float32) for k in KEYS_FLOAT})
  out.update({k: np.zeros(n, bool) for k in KEYS_BOOL})
  out["tokens"][:] = tokens
  out["positions"][:] = np.arange(n)
  out["segment_ids"][:] = 1
  out["done"][:] = done
  out["action_mask"][:] = is_action
  out["rewards"][:] = rewards
  actions = [i for i in range(n) if is_action[i]]
  action_turns = sorted({turn_of[i] for i in actions})
  for i in actions:
    out["turn_index"][i] = action_turns.index(turn_of[i])
    later = [j for j in actions if j > i]
    if later:
      nxt = later[0]
      out["next_action_row"][i] = nxt - 1
      out["discounts"][i] = gamma_token if turn_of[nxt] == turn_of[i] else gamma
    elif not done:
      out["next_action_row"][i] = n - 1
      out["discounts"][i] = gamma
    # per-turn bootstrap: the first action token of the next action turn
    later_turn = [j for j in actions if turn_of[j] > turn_of[i]]
    left_in_turn = sum(1 for j in actions if j > i and turn_of[j] == turn_of[i])
    if later_turn:
      out["next_turn_row"][i] = later_turn[0] - 1
      out["turn_discounts"][i] = gamma_token ** left_in_turn * gamma
    elif not done:
      out["next_turn_row"][i] = n - 1
      out["turn_discounts"][i] = gamma_token ** left_in_turn * gamma
  # Monte Carlo returns along the next-action chain (observed rewards only).
  for i in reversed(actions):
    nxt = out["next_action_row"][i] + 1
    follow = out["returns_to_go"][nxt] if (out["next_action_row"][i] >= 0 and nxt < n and is_action[nxt]) else 0.0
    out["returns_to_go"][i] = out["rewards"][i] + out["discounts"][i] * follow
  return out


def pack_rows(rows: Sequence[Sequence[dict]], length: int) -> dict:
  """[B, L] batch from rows of episode arrays (several episodes per row are packed)."""
  batch = {k: np.full((len(rows), length), PAD_VALUES.get(k, 0), np.int32) for k in KEYS_INT}
  batch.update({k: np.zeros((len(rows), length), np.float32) for k in KEYS_FLOAT})
  batch.update({k: np.zeros((len(rows), length), bool) for k in KEYS_BOOL})
  for b, episodes in enumerate(rows):
    offset = 0
    for seg, ep in enumerate(episodes, start=1):
      n = len(ep["tokens"])
      assert offset + n <= length
      for k, v in ep.items():
        v = v.copy()
        if k in ("next_action_row", "next_turn_row"):
          v = np.where(v >= 0, v + offset, -1)
        if k == "segment_ids":
          v = np.full(n, seg)
        batch[k][b, offset:offset + n] = v
      offset += n
  return batch


def random_batch(rng: np.random.Generator, num_rows: int, length: int, vocab_size: int,
                 gamma: float = 0.9, gamma_token: float = 0.95) -> dict:
  """Random packed episodes: several turns, random turn lengths, done and truncated episodes,
  adjacent action turns; rewards small enough that most (not all) targets stay inside [0, 1]."""
  rows = []
  for _ in range(num_rows):
    episodes, used = [], 0
    while True:
      num_turns = int(rng.integers(2, 6))
      turns, act = [], False
      for t in range(num_turns):
        act = t > 0 and bool(rng.random() < 0.6)
        ids = list(rng.integers(1, vocab_size, size=int(rng.integers(1, 4))))
        turns.append((ids, act, float(rng.uniform(0, 0.5)) if act else 0.0))
      if not any(a for _, a, _ in turns):
        turns.append(([int(rng.integers(1, vocab_size))], True, 0.3))
      done = bool(rng.random() < 0.5) if not turns[-1][1] else True
      ep = episode_arrays(turns, done, gamma, gamma_token)
      if used + len(ep["tokens"]) > length:
        break
      episodes.append(ep)
      used += len(ep["tokens"])
    rows.append(episodes)
  return pack_rows(rows, length)


# ----------------------------------------------------------------------------------------------
# Tabular MDPs on tokens


class TokenMDP:
  """A finite-horizon token-level MDP with a fixed turn layout.

  layout: a sequence of ("act", n_tokens) and ("obs", 1) entries after a BOS token; every action
  token is drawn from `action_tokens`, every observation token from `obs_tokens` with probabilities
  `obs_probs(history)`. Rewards `turn_reward(history)` arrive on the last token of each action turn;
  turn boundaries discount by `gamma`, tokens inside a turn by `gamma_token` (the data layer's
  per-token discounts, docs/architecture.md). The behaviour policy
  `behaviour(history)` gives probabilities over `action_tokens`. All probabilities are multiples of
  1/4 so that an exact-proportion dataset exists (`exact_dataset`).
  """

  def __init__(self, layout, action_tokens, obs_tokens, behaviour, obs_probs, turn_reward,
               gamma=1.0, bos=1, gamma_token=1.0):
    self.layout, self.action_tokens, self.obs_tokens = list(layout), list(action_tokens), list(obs_tokens)
    self.behaviour, self.obs_probs, self.turn_reward = behaviour, obs_probs, turn_reward
    self.gamma, self.bos, self.gamma_token = gamma, bos, gamma_token
    # token position -> (kind, last token of its turn?)
    self.kinds = []
    for kind, n in self.layout:
      self.kinds += [(kind, j == n - 1) for j in range(n)]

  def q_star(self) -> dict:
    """Exact Q*(history, action token) by backward induction, history a tuple of tokens (BOS first)."""
    q = {}

    def value(history):  # V* of the state before position len(history) - 1 of the layout
      pos = len(history) - 1
      if pos == len(self.kinds):
        return 0.0
      kind, last = self.kinds[pos]
      if kind == "obs":
        probs = self.obs_probs(history)
        return sum(p * value(history + (o,)) for o, p in zip(self.obs_tokens, probs))
      best = -np.inf
      for a in self.action_tokens:
        h = history + (a,)
        r = self.turn_reward(h) if last else 0.0
        g = self.gamma if last else self.gamma_token
        q[(history, a)] = r + g * value(h)
        best = max(best, q[(history, a)])
      return best

    value((self.bos,))
    return q

  def propagation_q(self, mode: str = "token", n_step: int = 1, mc_mix: float = 0.0) -> dict:
    """The fixed point Q_set(history, action token) of a value-propagation setting, by DP on the model.

    The WCE fixed point of docs/value_propagation.md on data that covers every behaviour trajectory
    (done episodes, no truncation), with V_set(h) = max_a Q_set(h, a) over the action tokens:

      Q_set(h, a) = (1 - mc_mix) * E_beta[ rewards over n_step links + discount * V_set(h_n) ]
                    + mc_mix * Q^beta(h, a)

    A link is one token (mode "token") or the rest of the current turn (mode "turn": the tokens left
    in the utterance follow the behaviour policy); the links after the first follow the behaviour;
    an episode that ends inside the window adds no bootstrap term. ("token", 1, 0) is `q_star`.
    """
    memo_q, memo_v, memo_qb = {}, {}, {}

    def states_after(h):  # [(prob, next agent state)] after the observations that follow h
      pos = len(h) - 1
      if pos == len(self.kinds):
        return []
      if self.kinds[pos][0] == "act":
        return [(1.0, h)]
      return [(p * q, h2) for o, p in zip(self.obs_tokens, self.obs_probs(h)) if p > 0
              for q, h2 in states_after(h + (o,))]

    def step(h, a):  # (reward, discount, last token of its turn?)
      last = self.kinds[len(h) - 1][1]
      h1 = h + (a,)
      return (self.turn_reward(h1) if last else 0.0), (self.gamma if last else self.gamma_token), last

    def behaviour_mean(h, f):
      return sum(p * f(h, b) for b, p in zip(self.action_tokens, self.behaviour(h)) if p > 0)

    def qb(h, a):
      if (h, a) not in memo_qb:
        r, g, _ = step(h, a)
        memo_qb[(h, a)] = r + g * sum(p * behaviour_mean(h2, qb) for p, h2 in states_after(h + (a,)))
      return memo_qb[(h, a)]

    def v(h):
      if h not in memo_v:
        memo_v[h] = max(q(h, a) for a in self.action_tokens)
      return memo_v[h]

    def links(h, a, k):  # expected return of k more links starting with a at h, then V_set
      r, g, last = step(h, a)
      h1 = h + (a,)
      if mode == "turn" and not last:  # the same link goes on through the utterance
        return r + g * behaviour_mean(h1, lambda h2, b: links(h2, b, k))
      if k == 1:
        follow = lambda h2: v(h2)
      else:
        follow = lambda h2: behaviour_mean(h2, lambda h3, b: links(h3, b, k - 1))
      return r + g * sum(p * follow(h2) for p, h2 in states_after(h1))

    def q(h, a):
      if (h, a) not in memo_q:
        memo_q[(h, a)] = (1 - mc_mix) * links(h, a, n_step) + mc_mix * qb(h, a)
      return memo_q[(h, a)]

    assert mode in ("token", "turn") and n_step >= 1 and 0 <= mc_mix <= 1
    for _, h in states_after((self.bos,)):
      v(h)
    # every agent state of the tree (not only those the max visits first)
    def visit(h):
      for _, h2 in states_after(h):
        for a in self.action_tokens:
          q(h2, a)
          visit(h2 + (a,))
    visit((self.bos,))
    return dict(memo_q)

  def trajectories(self):
    """Every complete trajectory with its probability under the behaviour policy."""
    def walk(history, prob):
      pos = len(history) - 1
      if pos == len(self.kinds):
        yield history, prob
        return
      kind, _ = self.kinds[pos]
      if kind == "obs":
        choices = zip(self.obs_tokens, self.obs_probs(history))
      else:
        choices = zip(self.action_tokens, self.behaviour(history))
      for tok, p in choices:
        if p > 0:
          yield from walk(history + (tok,), prob * p)
    yield from walk((self.bos,), 1.0)

  def episode(self, tokens, truncate_after: int | None = None):
    """(turns, done) of one trajectory; truncate_after: keep that many layout entries (must end
    on an observation) and mark the episode unfinished."""
    turns, pos = [([tokens[0]], False, 0.0)], 1
    layout = self.layout if truncate_after is None else self.layout[:truncate_after]
    for kind, n in layout:
      ids = list(tokens[pos:pos + n])
      pos += n
      reward = self.turn_reward(tuple(tokens[:pos])) if kind == "act" else 0.0
      turns.append((ids, kind == "act", reward))
    return turns, truncate_after is None

  def exact_dataset(self, truncate_after: int | None = None, truncated_share: int = 0):
    """Episodes in exact behaviour proportions: each trajectory repeated prob * 4^depth times.

    With truncate_after, also `truncated_share` copies per complete-prefix mass unit of every
    trajectory cut after that many layout entries (at most one per distinct prefix weight)."""
    depth = len(self.kinds)
    episodes = []
    for tokens, prob in self.trajectories():
      count = prob * 4 ** depth
      assert abs(count - round(count)) < 1e-9, "probabilities must be multiples of 1/4"
      episodes += [self.episode(tokens)] * int(round(count))
    if truncate_after is not None and truncated_share:
      cut = 1 + sum(n for _, n in self.layout[:truncate_after])
      prefixes = {}
      for tokens, prob in self.trajectories():
        prefixes[tokens[:cut]] = prefixes.get(tokens[:cut], 0.0) + prob
      for prefix, prob in prefixes.items():
        count = prob * 4 ** (cut - 1) * truncated_share
        assert abs(count - round(count)) < 1e-9
        full = prefix + (0,) * (len(self.kinds) + 1 - cut)  # tail unused by episode()
        episodes += [self.episode(full, truncate_after)] * int(round(count))
    return episodes


def example_behaviour(history):
  """A stochastic behaviour over three actions: a permutation of (1/2, 1/4, 1/4) chosen by the history
  (the tabular fixed-point tests' behaviour policy)."""
  probs = [0.25, 0.25, 0.25]
  probs[sum(history) % 3] = 0.5
  return probs


def example_obs_probs(history):
  """The environment's probabilities of its two observation tokens, chosen by the last two tokens."""
  return [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25)][(3 * history[-1] + history[-2]) % 3]


def state_ids(tokens: np.ndarray, segment_ids: np.ndarray, index: dict) -> np.ndarray:
  """[B, L] id of the state each row's output describes: the segment's prefix up to that row.

  index maps prefix tuples to ids (extended in place); padding rows get id 0 (a padding state)."""
  out = np.zeros(tokens.shape, np.int32)
  for b in range(tokens.shape[0]):
    start = 0
    for k in range(tokens.shape[1]):
      if segment_ids[b, k] == 0:
        continue
      if k > 0 and segment_ids[b, k] != segment_ids[b, k - 1]:
        start = k
      prefix = tuple(int(t) for t in tokens[b, start:k + 1])
      out[b, k] = index.setdefault(prefix, len(index) + 1)
  return out


def all_sequences(tokens, n):
  return list(itertools.product(tokens, repeat=n))


# ------------------------------------------------------------------ numpy references of the losses


def np_log_softmax_real(z, vocab):
  """log_softmax over the first `vocab` columns, float64 [..., vocab]."""
  z = np.asarray(z, np.float64)[..., :vocab]
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_bellman_values(z_bar, z_phi, vocab, support_min, exclude=None):
  """V = max over the support of p_bar / pi_phi, the support built token by token: the eligible tokens
  (real, not `exclude`) whose pi_phi reaches support_min, or, when none does, the most likely
  eligible token(s)."""
  lp_bar, lp_phi = np_log_softmax_real(z_bar, vocab), np_log_softmax_real(z_phi, vocab)
  out = np.zeros(z_bar.shape[:-1])
  for idx in np.ndindex(out.shape):
    pi = np.exp(lp_phi[idx])
    eligible = [a for a in range(vocab) if a != exclude]
    support = [a for a in eligible if pi[a] >= support_min]
    if not support:
      top = max(pi[a] for a in eligible)
      support = [a for a in eligible if pi[a] == top]
    out[idx] = max(np.exp(lp_bar[idx][a]) / pi[a] for a in support)
  return out


def np_bellman_targets(values, rewards, discounts, next_rows, mask):
  """Clipped one-step targets and the clipped flags, [B, L], by an explicit loop over tokens."""
  targets, clipped = np.zeros(rewards.shape), np.zeros(rewards.shape, bool)
  for b in range(rewards.shape[0]):
    for i in range(rewards.shape[1]):
      if not mask[b, i]:
        continue
      row = next_rows[b, i]
      raw = rewards[b, i] + (discounts[b, i] * values[b, row] if row >= 0 else 0.0)
      targets[b, i] = min(max(raw, 0.0), 1.0)
      clipped[b, i] = raw > 1.0 or raw < 0.0
  return targets, clipped
