"""Chat format (qsft_jax/data/chat.py): the conversation's tokens and action spans against hand-built
renderings, and, for SmolLM2's ChatML template and a Llama-3-style one, the action tokens of training equal
the tokens acting generates and conditions on, turn after turn, over whole Wordle and Twenty Questions
episodes."""
import copy

import numpy as np
import pytest

from qsft_jax.data import DataConfig, episodes_to_batch, mdp
from qsft_jax.data import chat as chat_lib
from qsft_jax.data.episodes import parse_episode
from qsft_jax.envs.generate import generate_episodes
from qsft_jax.errors import ConfigError
from qsft_jax.tokenizers import CharTokenizer, HFTokenizer, load_tokenizer

# Llama 3's layout (its own template also trims each content); the special tokens are added to a copy of
# SmolLM2's tokenizer (ids 49152..49155), which has none of them.
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def llama3(smollm2):
    hf = copy.deepcopy(smollm2.hf)
    hf.add_special_tokens({"additional_special_tokens": LLAMA3_TOKENS})
    return HFTokenizer(hf, name="smollm2+llama3-special-tokens")


def chatml(messages, generation_prompt):
    """SmolLM2's template written out by hand (its default system message when none is given)."""
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOLLM_DEFAULT_SYSTEM}] + list(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def wordle_episode():
    return parse_episode({"turns": [
        {"text": "Wordle. Guess the 5-letter word.\n", "action": False},
        {"text": "crane\n", "action": True, "reward": -1.0},
        {"text": "b y b b g\n", "action": False},
        {"text": "slate\n", "action": True, "reward": 0.0},
        {"text": "g g g g g\n", "action": False}], "done": True}, "<t>", 1)[0]


def test_chatml_conversation_mask_and_rewards(smollm2):
    config = mdp.MDPConfig(max_length=512, format="chat", system_prompt="Play Wordle.")
    ep = wordle_episode()
    tokenized, problems = mdp.tokenize_episode(ep, np.array([0, -1.0, 0, 0.5, 0]), smollm2, config)
    assert problems == []
    messages = [{"role": "system", "content": "Play Wordle."},
                {"role": "user", "content": "Wordle. Guess the 5-letter word."},
                {"role": "assistant", "content": "crane"}, {"role": "user", "content": "b y b b g"},
                {"role": "assistant", "content": "slate"}, {"role": "user", "content": "g g g g g"}]
    text = chatml(messages, generation_prompt=True)
    assert tokenized.tokens.tolist() == smollm2.encode(text)
    assert text.count("Play Wordle.") == 1 and text.startswith("<|im_start|>system\nPlay Wordle.<|im_end|>")
    arrays = mdp.episode_arrays(tokenized, 1.0, 1.0)
    im_end = smollm2.encode("<|im_end|>")
    assert len(im_end) == 1
    idx = np.flatnonzero(arrays["action_mask"])
    spans = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    assert [smollm2.decode(arrays["tokens"][s]) for s in spans] == ["crane<|im_end|>", "slate<|im_end|>"]
    for s, reward in zip(spans, (-1.0, 0.5)):
        assert arrays["tokens"][s[-1]] == im_end[0]
        assert arrays["rewards"][s].tolist() == [0.0] * (len(s) - 1) + [reward]
    assert np.count_nonzero(arrays["rewards"]) == 2
    # The last row is the generation prompt: the state in which the agent would act next.
    assert smollm2.decode(arrays["tokens"][-4:]) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("task", ["wordle", "twenty_questions"])
def test_training_action_tokens_are_the_tokens_acting_generates(smollm2, llama3, template, task):
    """Acting simulated with the episode's own actions as the generated tokens: each prompt
    (`mdp.prompt_tokens`) is the training conversation up to the action span, the span is content tokens
    + end-of-turn, and the environment receives the plain-format action text."""
    tokenizer, chat_template = (smollm2, "") if template == "chatml" else (llama3, LLAMA3_TEMPLATE)
    config = mdp.MDPConfig(max_length=4096, format="chat", system_prompt="Play the game.",
                           chat_template=chat_template)
    stops = mdp.action_stops(tokenizer, config, "\n")
    eot = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    assert stops == mdp.ActionStops((tokenizer.encode(eot)[0],), ())
    for raw in generate_episodes(task, 3, seed=5):
        episode = parse_episode(raw, "<gen>", 1)[0]
        tokenized, problems = mdp.tokenize_episode(episode, np.zeros(len(episode.turns)), tokenizer, config)
        assert problems == []
        arrays = mdp.episode_arrays(tokenized, 1.0, 1.0)
        tokens, mask = arrays["tokens"].tolist(), arrays["action_mask"]
        history = []
        for turn in raw["turns"]:
            if not turn["action"]:
                history.append({"text": turn["text"], "action": False})
                continue
            prompt = mdp.prompt_tokens(history, tokenizer, config)
            start = len(prompt)
            assert tokens[:start] == prompt
            assert not mask[start - 1] and mask[start]
            end = start + int(np.argmin(mask[start:])) if not mask[start:].all() else len(mask)
            generated = tokens[start:end]
            assert generated[-1] in stops.token_ids and generated.count(generated[-1]) == 1
            content = tokenizer.decode(generated[:-1])
            assert mdp.action_text(content, config, "\n") == turn["text"]
            history.append({"text": mdp.action_text(content, config, "\n"), "action": True})
        assert arrays["turn_index"].max() + 1 == sum(t["action"] for t in raw["turns"])


def test_truncation_ends_on_the_generation_prompt(smollm2):
    """An over-long episode keeps a prefix ending on an observation turn: the prompt of its next action."""
    config = mdp.MDPConfig(max_length=512, format="chat", system_prompt="S")
    ep = wordle_episode()
    tokenized, _ = mdp.tokenize_episode(ep, np.zeros(5), smollm2, config)
    fitted, status = mdp.fit_to_length(tokenized, tokenized.length - 1, "truncate")
    assert status == "truncated"
    history = [{"text": t.text, "action": t.action} for t in ep.turns[:3]]
    assert fitted.tokens.tolist() == mdp.prompt_tokens(history, smollm2, config)


@pytest.mark.parametrize("template,match", [
    # A header that counts the messages: every prompt renders differently inside the whole conversation.
    ("<|im_start|>system\n{{ messages | length }}<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
     "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "the template of data.chat_template: the rendering of \\[user, assistant\\] does not start with"),
    # Assistant content shown only on the last message (as templates that drop past reasoning do).
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' or loop.last %}"
     "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<t>:1: the template of data.chat_template: turn 1.*not rendered verbatim"),
])
def test_template_that_rerenders_earlier_turns_is_refused(smollm2, template, match):
    config = mdp.MDPConfig(max_length=512, format="chat", chat_template=template)
    with pytest.raises(ConfigError, match=match):
        mdp.tokenize_episode(wordle_episode(), np.zeros(5), smollm2, config)


def test_chat_needs_a_template_and_an_hf_tokenizer(smollm2):
    config = DataConfig(max_length=64, format="chat")
    with pytest.raises(ConfigError, match="data.format='chat'.*character"):
        episodes_to_batch([{"turns": [{"text": "a", "action": False}], "done": True}], config, CharTokenizer())
    hf = copy.deepcopy(smollm2.hf)
    hf.chat_template = None
    with pytest.raises(ConfigError, match="data.chat_template"):
        mdp.action_stops(HFTokenizer(hf, name="bare"), config.mdp, "\n")
    with pytest.raises(ValueError, match="system_prompt.*chat format"):
        DataConfig(system_prompt="x")
    with pytest.raises(ValueError, match="format"):
        DataConfig(format="xml")


def test_action_text_rules():
    plain, chat = mdp.MDPConfig(max_length=8), mdp.MDPConfig(max_length=8, format="chat")
    assert mdp.action_text("crane\nmore", plain, "\n") == "crane\n"
    assert mdp.action_text("", plain, "\n") == "\n"
    assert mdp.action_text("crane", chat, "\n") == "crane\n"
    assert mdp.action_text("crane\nmore", chat, "\n") == "crane\n"
    assert mdp.action_text("", chat, "\n") == "\n"
    assert chat_lib.message_content("crane\n") == "crane" and chat_lib.message_content("a\n\n") == "a\n"
