"""Chat format: episodes rendered as a conversation by a chat template (``data.format = "chat"``).

Messages. Observation turns are user messages, action turns assistant messages, after a system message
when ``data.system_prompt`` is non-empty. A turn's message content is its text without one trailing
newline (the environments end every observation and action with "\\n"; in chat format the template's
own separators end a message instead). The environment receives an action's content cut before its
first env stop string, plus that stop (``action_text``), so it sees the same action text as in plain
format.

Template. ``data.chat_template``: "" = the tokenizer's own (a Hugging Face tokenizer's
``chat_template``), a Jinja template string, or "file:PATH" to read one. It must end each assistant
message's content with one special token, the end-of-turn token (``<|im_end|>`` in ChatML,
``<|eot_id|>`` in Llama 3), found by rendering a probe conversation.

Tokens. The whole conversation is rendered once (with the generation prompt when the episode ends on
an observation: its last row is the state in which the agent acts next), its text cut at the start and
the end of each assistant message's content, and the pieces encoded separately in one batched call:
every content boundary is a token boundary, whatever the tokenizer would merge across it (SmolLM2's
tokenizer encodes a prompt ending in "\n\n" as one token, but "\n\ncrane" as "\n", "\n", "crane"), the
rule plain format applies at turn boundaries. Each assistant message's prompt, the rendering of the
messages before it with the generation prompt, is what the policy conditions on when it acts
(``prompt_tokens``, cut and encoded the same way, so it is the conversation's tokens up to that
message); it must render as a prefix of the conversation's text, or the template is refused (one that
re-renders earlier turns differently, e.g. drops past reasoning). The action span of a message is its
content's tokens plus the end-of-turn token, which must be the first token after them; the reward sits
on that token; every other token (template text, role headers, the generation prompt) is observation.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from qsft_jax.data import mdp
from qsft_jax.data.episodes import Episode, Problem
from qsft_jax.errors import ConfigError

PROBE_CONTENT = "probe"


def message_content(text: str) -> str:
    """A turn's text as message content: without one trailing newline."""
    return text[:-1] if text.endswith("\n") else text


def chat_messages(turns: Sequence[tuple[str, bool]], system_prompt: str = "") -> list[dict[str, str]]:
    """[(text, is_action)] -> chat messages (a system message first when system_prompt is non-empty)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "assistant" if action else "user", "content": message_content(text)}
                 for text, action in turns]
    return messages


def action_text(content: str, env_stop: str) -> str:
    """What the environment receives for a generated message content: cut before the first env_stop, plus
    env_stop (the action an action turn's text holds in plain format)."""
    if env_stop and env_stop in content:
        content = content[:content.index(env_stop)]
    return content + env_stop


def template_name(chat_template: str) -> str:
    """How messages name the template: the data.chat_template value, or the tokenizer's own."""
    if not chat_template:
        return "the tokenizer's chat template (data.chat_template='')"
    if chat_template.startswith("file:"):
        return f"data.chat_template={chat_template!r}"
    return "the template of data.chat_template"


def resolve_template(tokenizer, chat_template: str) -> str:
    """The Jinja template text: data.chat_template, the file it names, or the tokenizer's own."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        raise ConfigError(
            f"data.format='chat': tokenizer {tokenizer!r} has no chat template support (a character "
            "tokenizer); use a Hugging Face tokenizer (tokenizer=smollm2, hf:PATH or gguf:PATH) or "
            "data.format='plain'")
    if chat_template.startswith("file:"):
        from qsft_jax import storage

        path = chat_template[len("file:"):]
        try:
            return storage.path(path).read_text()
        except OSError as e:
            raise ConfigError(f"data.chat_template: cannot read {path}: {e.strerror or e}") from None
    if chat_template:
        return chat_template
    own = getattr(hf, "chat_template", None)
    if not own or not isinstance(own, str):
        raise ConfigError(
            f"data.chat_template: tokenizer {getattr(tokenizer, 'name', '') or tokenizer!r} has no chat "
            "template of its own; set data.chat_template to a Jinja template (or file:PATH)")
    return own


class ChatRenderer:
    """Renders and encodes conversations with one template; finds its end-of-turn token at construction."""

    def __init__(self, tokenizer, chat_template: str = "", system_prompt: str = ""):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.name = template_name(chat_template)
        self.template = resolve_template(tokenizer, chat_template)
        self.eot_id = self._find_end_of_turn()

    def render(self, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.hf.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False,
                add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2 errors: a template that cannot render these messages
            raise ConfigError(f"{self.name}: cannot render a conversation: {type(e).__name__}: {e}") from None

    def encode_all(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text encoded on its own, special tokens written in the text recognised: int32 [n_j] each."""
        ids, lengths = _encode_pieces(self.tokenizer, texts)
        return np.split(ids, np.cumsum(lengths)[:-1])

    def _find_end_of_turn(self) -> int:
        messages = chat_messages([("hello\n", False), (PROBE_CONTENT + "\n", True)], self.system_prompt)
        prompt_text = self.render(messages[:-1], True)
        full_text = self.render(messages, False)
        if not full_text.startswith(prompt_text + PROBE_CONTENT):
            raise ConfigError(
                f"{self.name}: the rendering of [user, assistant] does not start with the rendering of "
                "[user] with the generation prompt followed by the assistant's content; chat format needs a "
                "template that renders earlier messages the same way whatever follows them")
        after = full_text[len(prompt_text) + len(PROBE_CONTENT):]
        ids = self.encode_all([after])[0]
        if len(ids) and self._is_special(int(ids[0])):
            return int(ids[0])
        after = after[:20]
        raise ConfigError(
            f"{self.name}: an assistant message's content is not followed by one special end-of-turn token "
            f"(it is followed by {after!r}); chat format needs one to stop generation and hold the reward")

    def _is_special(self, token: int) -> bool:
        hf = self.tokenizer.hf
        special = set(getattr(hf, "all_special_ids", ()) or ())
        added = getattr(hf, "added_tokens_decoder", None) or {}
        return token in special or token in added


def _encode_pieces(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encode_pieces = getattr(tokenizer, "encode_pieces", None)
    if encode_pieces is not None:
        ids, lengths = encode_pieces(list(texts))
        return np.asarray(ids, np.int32), np.asarray(lengths, np.int64)
    pieces = [np.asarray(tokenizer.encode(t), np.int32) for t in texts]
    return np.concatenate(pieces), np.array([len(p) for p in pieces], np.int64)


_RENDERERS: dict[tuple[int, str, str], ChatRenderer] = {}


def renderer(tokenizer, chat_template: str = "", system_prompt: str = "") -> ChatRenderer:
    """The ChatRenderer of (tokenizer, template, system prompt), built once per tokenizer object."""
    key = (id(tokenizer), chat_template, system_prompt)
    found = _RENDERERS.get(key)
    if found is None or found.tokenizer is not tokenizer:
        found = _RENDERERS[key] = ChatRenderer(tokenizer, chat_template, system_prompt)
    return found


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """A rendered conversation. n tokens, m action turns; spans in token indices, end exclusive."""

    tokens: np.ndarray  # int32 [n]
    action_starts: np.ndarray  # int64 [m]: first content token (or the end-of-turn token when empty)
    action_ends: np.ndarray  # int64 [m]: one past the end-of-turn token


def render_episode(turns: Sequence[tuple[str, bool]], r: ChatRenderer) -> ChatTokens:
    """Renders a whole conversation once, cuts its text at each assistant content's start and end and
    encodes the pieces separately (one batched call), so every content boundary is a token boundary
    whatever the tokenizer merges; acting's prompts are cut and encoded the same way (``prompt_tokens``).

    Raises ConfigError when a message's prompt (the messages before it with the generation prompt) does
    not render as a prefix of the conversation, or its content does not follow verbatim, or the
    end-of-turn token does not follow the content.
    """
    messages = chat_messages(turns, r.system_prompt)
    offset = len(messages) - len(turns)  # the system message
    action_turns = [j for j, (_, action) in enumerate(turns) if action]
    ends_on_observation = bool(turns) and not turns[-1][1]
    full_text = r.render(messages, ends_on_observation)
    cuts = [0]
    for j in action_turns:
        prompt = r.render(messages[:offset + j], True)
        if not full_text.startswith(prompt):
            raise ConfigError(
                f"{r.name}: the prompt of turn {j} (the messages before it with the generation prompt) does "
                "not render as a prefix of the whole conversation: the template renders earlier messages "
                "differently once later ones follow (e.g. it drops past reasoning), so the tokens trained on "
                "would not be the tokens the policy conditions on; use another template (data.chat_template)")
        content = messages[offset + j]["content"]
        if len(prompt) < cuts[-1] or not full_text.startswith(content, len(prompt)):
            raise ConfigError(
                f"{r.name}: turn {j}'s assistant content {content[:40]!r} is not rendered verbatim after its "
                "prompt (the template rewrites, strips or drops it once the conversation goes on); chat format "
                "trains on the content the policy generates; use another template (data.chat_template)")
        cuts += [len(prompt), len(prompt) + len(content)]
    cuts.append(len(full_text))
    pieces = r.encode_all([full_text[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    lengths = np.array([len(p) for p in pieces], np.int64)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.concatenate(pieces).astype(np.int32)
    starts = bounds[1:-1:2]  # piece 2k + 1 is the k-th content
    for k, j in enumerate(action_turns):
        after = pieces[2 * k + 2]
        if len(after) == 0 or after[0] != r.eot_id:
            raise ConfigError(
                f"{r.name}: turn {j}'s assistant content is not followed by the end-of-turn token "
                f"{r.tokenizer.decode([r.eot_id])!r}; chat format needs it to stop generation and hold the reward")
    if action_turns and starts[0] == 0:
        raise ConfigError(f"{r.name}: renders nothing before the first assistant message; chat format needs "
                          "the conversation to start with template tokens (an observation)")
    ends = bounds[2:-1:2] + 1  # one past the end-of-turn token after each content
    return ChatTokens(tokens, starts.astype(np.int64), ends.astype(np.int64))


def prompt_tokens(turns: Sequence[tuple[str, bool]], r: ChatRenderer) -> list[int]:
    """The tokens the policy conditions on after a history (ending with an observation): its rendering
    with the generation prompt, cut and encoded as ``render_episode`` does, which makes it the training
    conversation's tokens up to the next action."""
    return render_episode(turns, r).tokens.tolist()


def turn_structure(chat: ChatTokens) -> tuple[np.ndarray, np.ndarray]:
    """The conversation as the token-level MDP's turns behind token 0 (which is observation):
    (lengths int64 [T'], is_action bool [T']). Observation turns are the tokens between action spans
    (template text, headers, the generation prompt); empty ones are left out."""
    lengths, is_action = [], []
    pos = 1
    for s, e in zip(chat.action_starts, chat.action_ends):
        if s > pos:
            lengths.append(s - pos)
            is_action.append(False)
        lengths.append(e - s)
        is_action.append(True)
        pos = e
    if len(chat.tokens) > pos:
        lengths.append(len(chat.tokens) - pos)
        is_action.append(False)
    return np.array(lengths, np.int64), np.array(is_action, bool)


def tokenize_chat_episode(
    episode: Episode, turn_rewards: np.ndarray, tokenizer, config: mdp.MDPConfig
) -> tuple[mdp.TokenizedEpisode | None, list[Problem]]:
    """``mdp.tokenize_episode`` in chat format. turn_rewards: float [T] (transformed) of the episode's turns;
    the result's turns are ``turn_structure``'s, each action turn carrying its message's reward."""
    r = renderer(tokenizer, config.chat_template, config.system_prompt)
    turns = [(t.text, t.action) for t in episode.turns]
    try:
        chat = render_episode(turns, r)
    except ConfigError as e:
        raise ConfigError(f"{episode.file}:{episode.line}: {e}") from None
    lengths, is_action = turn_structure(chat)
    rewards = np.zeros(len(lengths), np.float64)
    rewards[is_action] = np.asarray(turn_rewards, np.float64)[[t.action for t in episode.turns]]
    return mdp.TokenizedEpisode(chat.tokens, lengths, is_action, rewards, episode.done), []
