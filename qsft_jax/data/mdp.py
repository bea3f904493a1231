"""Tokenisation into the token-level MDP arrays of docs/architecture.md, truncation, packing and padding.

Tokenisation (``format="plain"``). Each turn's text (through ``observation_template`` /
``action_template``, default ``"{text}"``) is encoded on its own and the pieces are concatenated after one BOS token, so every turn
boundary is a token boundary and token 0 (BOS) is always an observation token. An action turn that
encodes to no tokens is an error. ``unknown_character_problems`` names the turns holding characters
the tokenizer can only encode as its unknown token (a ``CharTokenizer``'s characters outside its
alphabet); the data layer applies it to data files (``data.unknown_chars``, ``loading.py``), while
acting tokenises whatever the policy emitted. ``format="chat"`` renders the whole episode as a
conversation instead (``qsft_jax/data/chat.py``); its turns below are the assistant messages' spans
(content + end-of-turn token) and the tokens between them, token 0 the conversation's first.
``prompt_tokens``, ``action_stops`` and ``action_text`` are acting's side of either format.

Per episode of n tokens (token i; ``n(i)`` = the next action token after i in the same episode):

- ``next_action_row[i] = n(i) - 1`` for an action token with a next action (= i inside an utterance);
  for the episode's last action token: -1 when done, else ``n - 1`` (the row after the final
  observation: the state in which the agent acts next). -1 on observation tokens.
- ``discounts[i]``: gamma_token when n(i) is in the same turn, gamma when it is in another turn or when
  bootstrapping from the final row of a truncated episode; 0 where next_action_row = -1.
- ``next_turn_row[i]``: for every token of action turn j, (first token of the next action turn) - 1, with
  the same end rule (-1 when done, n - 1 when truncated). ``turn_discounts[i]`` =
  gamma_token^(tokens left in the turn after i) * gamma, the product of the per-token discounts up to the
  next turn; 0 where next_turn_row = -1.
- ``rewards``: the turn's transformed reward on its last token.
- ``returns_to_go[i] = rewards[i] + discounts[i] * returns_to_go[n(i)]`` (0 beyond the last action), the
  Monte Carlo return of the observed rewards; off actions 0. For truncated episodes it omits what lies
  beyond the cut.
- ``turn_index``: ordinal of the action turn (0-based), -1 elsewhere; ``done`` the episode's flag.

Over-long episodes (more than max_length tokens, BOS included): ``overlong="drop"`` drops them;
``overlong="truncate"`` keeps the longest prefix of whole turns that fits, ends on an observation turn and
holds at least one action; the result has done = false so its last actions bootstrap from its last row.
If no such prefix exists the episode is dropped. Either way the caller counts it.

Packing (first-fit in arrival order): each episode goes into the first row with room; segment ids 1, 2,
... per row, positions restart at 0, and next_action_row / next_turn_row are shifted by the segment's
offset, so they never leave their segment. Padding mode puts one episode per row.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from qsft_jax.data.episodes import Episode, Problem, Turn

# key -> (dtype, padding value). The order is the order of docs/architecture.md.
ARRAY_SPECS: dict[str, tuple[type, float | int | bool]] = {
    "tokens": (np.int32, 0),  # padding value replaced by the tokenizer's pad id
    "positions": (np.int32, 0),
    "segment_ids": (np.int32, 0),
    "action_mask": (np.bool_, False),
    "rewards": (np.float32, 0.0),
    "next_action_row": (np.int32, -1),
    "discounts": (np.float32, 0.0),
    "next_turn_row": (np.int32, -1),
    "turn_discounts": (np.float32, 0.0),
    "done": (np.bool_, False),
    "turn_index": (np.int32, -1),
    "returns_to_go": (np.float32, 0.0),
}
ROW_INDEX_KEYS = ("next_action_row", "next_turn_row")  # shifted by the segment offset when packing
OVERLONG_MODES = ("truncate", "drop")
FORMATS = ("plain", "chat")


@dataclasses.dataclass(frozen=True)
class MDPConfig:
    """How episodes become arrays. ``max_length`` = L, the row length (BOS included)."""

    max_length: int
    gamma: float = 1.0
    gamma_token: float = 1.0
    overlong: str = "truncate"
    observation_template: str = "{text}"
    action_template: str = "{text}"
    format: str = "plain"
    system_prompt: str = ""
    chat_template: str = ""

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length: must be >= 2, got {self.max_length}")
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {self.format!r}")
        if self.format == "plain" and (self.system_prompt or self.chat_template):
            field = "system_prompt" if self.system_prompt else "chat_template"
            raise ValueError(f"{field}: only read in chat format; set data.format='chat' or leave it empty")
        if self.format == "chat":
            for name in ("observation_template", "action_template"):
                if getattr(self, name) != "{text}":
                    raise ValueError(f"{name}: only read in plain format (chat format writes each turn's text "
                                     "as its message content); leave it '{text}' or use data.format='plain'")
        if self.overlong not in OVERLONG_MODES:
            raise ValueError(f"overlong: expected one of {OVERLONG_MODES}, got {self.overlong!r}")
        for name in ("gamma", "gamma_token"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {v}")
        for name in ("observation_template", "action_template"):
            if "{text}" not in getattr(self, name):
                raise ValueError(f"{name}: must contain {{text}}, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class TokenizedEpisode:
    """An episode as tokens with its turn structure. T = number of turns, n = number of tokens."""

    tokens: np.ndarray  # int32 [n], tokens[0] = BOS
    turn_lengths: np.ndarray  # int64 [T], tokens per turn (BOS not included)
    turn_is_action: np.ndarray  # bool [T]
    turn_rewards: np.ndarray  # float64 [T], transformed, 0 on observations
    done: bool

    @property
    def length(self) -> int:
        return len(self.tokens)


def encode_turns(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each text encoded on its own: (concatenated ids int32 [sum n_j], lengths int64 [J])."""
    encode_pieces = getattr(tokenizer, "encode_pieces", None)  # one call for all turns, when offered
    if encode_pieces is not None:
        ids, lengths = encode_pieces(texts)
        return np.asarray(ids, dtype=np.int32), np.asarray(lengths, dtype=np.int64)
    pieces = [np.asarray(tokenizer.encode(t), dtype=np.int32) for t in texts]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int32)), lengths


def tokenize_episode(
    episode: Episode, turn_rewards: np.ndarray, tokenizer, config: MDPConfig
) -> tuple[TokenizedEpisode | None, list[Problem]]:
    """Plain format: encodes each turn separately behind one BOS; chat format: the whole conversation
    rendered by the chat template (``chat.tokenize_chat_episode``). turn_rewards: float [T] (already
    transformed)."""
    if config.format == "chat":
        from qsft_jax.data import chat

        return chat.tokenize_chat_episode(episode, turn_rewards, tokenizer, config)
    texts = [(config.action_template if t.action else config.observation_template).format(text=t.text) for t in episode.turns]
    ids, lengths = encode_turns(tokenizer, texts)
    is_action = np.array([t.action for t in episode.turns], dtype=bool)
    problems = [
        Problem(episode.file, episode.line, f"turns[{j}].text", "action text encodes to no tokens")
        for j in np.flatnonzero(is_action & (lengths == 0))
    ]
    if problems:
        return None, problems
    return (
        TokenizedEpisode(
            tokens=np.concatenate([np.array([tokenizer.bos_id], dtype=np.int32), ids]),
            turn_lengths=lengths,
            turn_is_action=is_action,
            turn_rewards=np.asarray(turn_rewards, dtype=np.float64),
            done=episode.done,
        ),
        [],
    )


def check_format(tokenizer, config: MDPConfig) -> None:
    """Raises ConfigError when the tokenizer cannot tokenise this format (chat: no chat template)."""
    if config.format == "chat":
        from qsft_jax.data import chat

        chat.renderer(tokenizer, config.chat_template, config.system_prompt)


def prompt_tokens(history: Sequence[Mapping[str, Any]], tokenizer, config: MDPConfig) -> list[int]:
    """The token ids the policy conditions on before its next action. history: turn dicts of the episode
    format ({"text", "action"}), ending with an observation. Plain: BOS + each templated turn encoded
    separately (``tokenize_episode``); chat: the template's rendering of the history with the generation
    prompt, which is the training conversation's tokens up to the next action."""
    turns = [(str(t["text"]), bool(t["action"])) for t in history]
    if config.format == "chat":
        from qsft_jax.data import chat

        return chat.prompt_tokens(turns, chat.renderer(tokenizer, config.chat_template, config.system_prompt))
    episode = Episode(turns=tuple(Turn(text, action) for text, action in turns), done=False)
    tokenized, problems = tokenize_episode(episode, np.zeros(len(turns)), tokenizer, config)
    if problems:
        raise ValueError("cannot tokenise history: " + "; ".join(str(p) for p in problems))
    return tokenized.tokens.tolist()


@dataclasses.dataclass(frozen=True)
class ActionStops:
    """What ends a generated action: token ids (ended on device) and stop strings (matched on the text)."""

    token_ids: tuple[int, ...]
    strings: tuple[str, ...]


def action_stops(tokenizer, config: MDPConfig, env_stop: str) -> ActionStops:
    """Plain: the environment's stop string; chat: the template's end-of-turn token."""
    if config.format == "chat":
        from qsft_jax.data import chat

        return ActionStops((chat.renderer(tokenizer, config.chat_template, config.system_prompt).eot_id,), ())
    return ActionStops((), (env_stop,))


def action_text(generated_text: str, config: MDPConfig, env_stop: str) -> str:
    """What the environment receives for a generated action. Plain: generated_text cut right after its
    first env_stop (env_stop alone when that leaves nothing: an empty line). Chat: generated_text is the
    message content (the decoded tokens before the end-of-turn token); it is cut before its first
    env_stop and env_stop is appended, so the environment sees what the same action is in plain format."""
    if config.format == "chat":
        from qsft_jax.data import chat

        return chat.action_text(generated_text, env_stop)
    if env_stop and env_stop in generated_text:
        generated_text = generated_text[:generated_text.index(env_stop) + len(env_stop)]
    return generated_text or env_stop


def _quote_chars(chars: str, limit: int = 10) -> str:
    shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def holds_unknown(tokens: np.ndarray, tokenizer) -> bool:
    """Whether tokens hold the unk id of a tokenizer that reports unknown characters (char tokenizer)."""
    unk_id = getattr(tokenizer, "unk_id", None)
    return hasattr(tokenizer, "unknown_characters") and unk_id is not None and bool(np.any(tokens == unk_id))


def unknown_character_problems(episode: Episode, tokens: np.ndarray, tokenizer, config: MDPConfig) -> list[Problem]:
    """One problem per turn whose templated text holds characters the tokenizer can only encode as unk.

    tokens: the episode's encoding [n] (``tokenize_episode``); the per-turn search runs only when it
    holds the unk id. Tokenizers without ``unknown_characters`` (byte-level BPE) are never checked.
    """
    if not holds_unknown(tokens, tokenizer):
        return []
    problems = []
    for j, turn in enumerate(episode.turns):
        text = (config.action_template if turn.action else config.observation_template).format(text=turn.text)
        chars = tokenizer.unknown_characters(text)
        if not chars:
            continue
        template = "action_template" if turn.action else "observation_template"
        origin = "" if all(c in turn.text for c in chars) else f" (some from data.{template})"
        problems.append(Problem(
            episode.file, episode.line, f"turns[{j}].text",
            f"characters outside the tokenizer's alphabet: {_quote_chars(chars)}{origin}; replace them, "
            "use a tokenizer whose alphabet holds them (char:PATH.json), or set data.unknown_chars='unk' "
            "to encode them as the unknown token"))
    return problems


def fit_to_length(ep: TokenizedEpisode, max_length: int, overlong: str) -> tuple[TokenizedEpisode | None, str]:
    """Returns (episode, "kept") when it fits, (prefix, "truncated"), or (None, reason it was dropped)."""
    if ep.length <= max_length:
        return ep, "kept"
    if overlong == "drop":
        return None, f"longer than max_length={max_length}"
    ends = 1 + np.cumsum(ep.turn_lengths)  # token count of the prefix through turn j
    has_action = np.cumsum(ep.turn_is_action) > 0
    ok = (ends <= max_length) & ~ep.turn_is_action & has_action
    candidates = np.flatnonzero(ok)
    if len(candidates) == 0:
        return None, f"no prefix of whole turns ending on an observation fits in max_length={max_length}"
    last = candidates[-1]
    return (
        TokenizedEpisode(
            tokens=ep.tokens[: ends[last]],
            turn_lengths=ep.turn_lengths[: last + 1],
            turn_is_action=ep.turn_is_action[: last + 1],
            turn_rewards=ep.turn_rewards[: last + 1],
            done=False,
        ),
        "truncated",
    )


def episode_arrays(ep: TokenizedEpisode, gamma: float, gamma_token: float) -> dict[str, np.ndarray]:
    """The token-level MDP arrays of one episode, each [n] (see the module docstring); segment id 1.

    Vectorised over tokens; the only python loop runs over action turns, on scalars.
    """
    n = ep.length
    out = {key: np.full(n, pad, dtype=dtype) for key, (dtype, pad) in ARRAY_SPECS.items()}
    out["tokens"][:] = ep.tokens
    out["positions"][:] = np.arange(n)
    out["segment_ids"][:] = 1
    out["done"][:] = ep.done
    starts = 1 + np.concatenate([[0], np.cumsum(ep.turn_lengths)[:-1]]).astype(np.int64)  # first token per turn
    action_turns = np.flatnonzero(ep.turn_is_action & (ep.turn_lengths > 0))  # [m]
    m = len(action_turns)
    if m == 0:
        return out
    a_start = starts[action_turns]  # [m] first token of each action turn
    a_end = a_start + ep.turn_lengths[action_turns] - 1  # [m] last token (inclusive)
    a_reward = ep.turn_rewards[action_turns]  # [m]
    # Where each action turn's last token bootstraps: the row before the next action turn; after the last
    # one, none when done, else the final row (n - 1), the state in which the agent acts next.
    next_row = np.empty(m, dtype=np.int64)
    next_row[:-1] = a_start[1:] - 1
    next_row[-1] = -1 if ep.done else n - 1
    cross = np.where(next_row >= 0, gamma, 0.0)  # [m] discount across the turn boundary
    # Return at each turn's last token: G_k = r_k + gamma * gamma_token^(len_{k+1} - 1) * G_{k+1}; a
    # truncated episode's last turn has no observed reward beyond it.
    g_end = np.empty(m, dtype=np.float64)
    acc = 0.0
    for k in range(m - 1, -1, -1):
        acc = a_reward[k] + (gamma * gamma_token ** float(a_end[k + 1] - a_start[k + 1]) * acc if k + 1 < m else 0.0)
        g_end[k] = acc
    # Token level: turn ordinal k of every action token, and its distance to the turn's last token.
    lengths = a_end - a_start + 1
    k_of = np.repeat(np.arange(m), lengths)  # [num action tokens]
    offset_in_turn = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    idx = np.repeat(a_start, lengths) + offset_in_turn  # [num action tokens] token index
    steps_left = a_end[k_of] - idx
    inside = steps_left > 0
    decay = gamma_token ** steps_left.astype(np.float64)
    out["action_mask"][idx] = True
    out["turn_index"][idx] = k_of
    out["rewards"][a_end] = a_reward
    out["next_action_row"][idx] = np.where(inside, idx, next_row[k_of])  # inside: n(i) - 1 = i
    out["discounts"][idx] = np.where(inside, gamma_token, cross[k_of])
    out["next_turn_row"][idx] = next_row[k_of]
    out["turn_discounts"][idx] = decay * cross[k_of]
    out["returns_to_go"][idx] = decay * g_end[k_of]
    return out


def empty_row(max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of padding [L]."""
    row = {key: np.full(max_length, pad, dtype=dtype) for key, (dtype, pad) in ARRAY_SPECS.items()}
    row["tokens"][:] = pad_id
    return row


def build_row(segments: Sequence[dict[str, np.ndarray]], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenates episodes' arrays into one [L] row: segment ids 1.., row indices shifted, padding after."""
    row = empty_row(max_length, pad_id)
    offset = 0
    for seg_id, seg in enumerate(segments, start=1):
        n = len(seg["tokens"])
        if offset + n > max_length:
            raise ValueError(f"segments of {offset + n} tokens do not fit a row of {max_length}")
        for key in ARRAY_SPECS:
            row[key][offset : offset + n] = seg[key]
        row["segment_ids"][offset : offset + n] = seg_id
        for key in ROW_INDEX_KEYS:
            part = row[key][offset : offset + n]
            part[part >= 0] += offset
        offset += n
    return row


def first_fit(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Assigns items (in order) to the first bin with room. Returns the bins' item indices, in bin order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"item {i} has length {n} > max_length {max_length}")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    return bins


def pack_episodes(episodes: Sequence[dict[str, np.ndarray]], max_length: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """First-fit packing of per-episode arrays into [L] rows."""
    bins = first_fit([len(e["tokens"]) for e in episodes], max_length)
    return [build_row([episodes[i] for i in b], max_length, pad_id) for b in bins]


def pad_episode(episode: dict[str, np.ndarray], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One episode in a [L] row."""
    return build_row([episode], max_length, pad_id)


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """list of [L] rows -> dict of [B, L] arrays."""
    return {key: np.stack([r[key] for r in rows]) for key in ARRAY_SPECS}
