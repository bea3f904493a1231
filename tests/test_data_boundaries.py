"""The plain format's turn boundary rule: turns are encoded separately; boundaries that byte-level BPE
may join are reported (validate, the trainer's data check) as warnings, and the effect is measured."""
import json

import numpy as np
import pytest

from qsft_jax.data import DataConfig, validate_paths
from qsft_jax.data import mdp
from qsft_jax.data.check import preflight
from qsft_jax.data.episodes import Episode, Turn
from qsft_jax.data.loading import EpisodeProcessor
from qsft_jax.tokenizers import CharTokenizer

ENDS = ["Guess:", "Guess", "Guess.", "Guess:\n", "5", "Guess: ", "Guess\n\n", "Guess\t", "Guess \n", "\n", "ok:)", "\u00e9"]
STARTS = ["crane\n", " crane\n", "  crane", "\ncrane", "\tcrane", ".\n", "6 tries", "!", " 6", " .", "'s", " \n"]


@pytest.fixture
def smollm2(smollm2_tokenizer):
    return smollm2_tokenizer


def _episode(*texts, line=1):
    """Alternating observation / action turns."""
    return Episode(tuple(Turn(t, j % 2 == 1, 0.0) for j, t in enumerate(texts)), done=True, file="f.jsonl", line=line)


def _jsonl(path, episodes):
    path.write_text("".join(json.dumps({"turns": [{"text": t, "action": j % 2 == 1} for j, t in enumerate(texts)],
                                        "done": True}) + "\n" for texts in episodes))
    return str(path)


def test_a_boundary_the_rule_calls_clean_encodes_as_the_whole_text_does(smollm2):
    config = mdp.MDPConfig(max_length=64)
    flagged_and_joined = 0
    for a in ENDS:
        for b in STARTS:
            problems = mdp.boundary_problems(_episode(a, b), config)
            joined = smollm2.encode(a + b) != smollm2.encode(a) + smollm2.encode(b)  # reference: the tokenizer itself
            assert not (joined and not problems), f"{a!r} + {b!r} encode differently together, but were not reported"
            flagged_and_joined += joined
    assert flagged_and_joined >= 20
    # The example of the rule: a lone space token and "cr" "ane" apart, " crane" together.
    [problem] = mdp.boundary_problems(_episode("Guess: ", "crane\n"), config)
    assert str(problem).startswith("f.jsonl:1: turns[0].text: ends in ' ' before turns[1]: byte-level BPE")
    [problem] = mdp.boundary_problems(_episode("Guess:\n", "crane\n", "b", "ad\n"), config)
    assert str(problem).startswith("f.jsonl:1: turns[3].text: starts with 'a' right after turns[2] ends in 'b'")
    [problem] = mdp.boundary_problems(_episode("Guess:", "\ncrane\n"), mdp.MDPConfig(max_length=64, action_template="{text}"))
    assert problem.field == "turns[1].text" and "starts with '\\n'" in problem.message
    assert not mdp.boundary_problems(_episode("Guess:\n", "crane\n", "bybbg\n", " slope\n"), config)


def _apart_by_decoding(texts, actions, tokenizer):
    """Reference for mdp.actions_encoded_apart: the whole text's tokens split where the decoded prefixes
    reach each action's start and end; an action differs when no such split exists or the tokens between
    are not the action's own encoding."""
    whole = tokenizer.encode("".join(texts))
    prefixes = [tokenizer.decode(whole[:k]) for k in range(len(whole) + 1)]
    differ = []
    for j in actions:
        before, through = "".join(texts[:j]), "".join(texts[:j + 1])
        if before not in prefixes or through not in prefixes:
            differ.append(j)
            continue
        k0, k1 = prefixes.index(before), prefixes.index(through)
        if whole[k0:k1] != tokenizer.encode(texts[j]):
            differ.append(j)
    return differ


def test_actions_encoded_apart_match_a_search_over_decoded_prefixes(smollm2):
    config = mdp.MDPConfig(max_length=256)
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(40):
        texts = [ENDS[i] + STARTS[k] for i, k in rng.integers(0, [len(ENDS), len(STARTS)], size=(4, 2))]
        episode = _episode(*texts)
        tokenized, problems = mdp.tokenize_episode(episode, np.zeros(4), smollm2, config)
        assert not problems
        got = mdp.actions_encoded_apart(episode, tokenized, smollm2, config)
        assert got == _apart_by_decoding(texts, [1, 3], smollm2), texts
        seen += len(got)
    assert seen >= 10
    char = CharTokenizer()
    episode = _episode("Guess: ", "crane\n")
    tokenized, _ = mdp.tokenize_episode(episode, np.zeros(2), char, config)
    assert mdp.actions_encoded_apart(episode, tokenized, char, config) == []
    assert mdp.boundary_problems(episode, config)  # the string rule itself knows no tokenizer ...
    outcome = EpisodeProcessor(DataConfig(max_length=64), char, measure_boundaries=True)(episode)
    assert outcome.boundaries == [] and outcome.actions == 0  # ... a char tokenizer is exempt


def test_validate_lists_boundary_warnings_and_counts_actions_per_file(smollm2, tmp_path, monkeypatch, capsys):
    from qsft_jax import tokenizers
    from qsft_jax.data.__main__ import main

    bad = _jsonl(tmp_path / "bad.jsonl", [["Guess: ", "crane\n", "bybbg\n", "slope\n"], ["Guess:\n", "crane\n"]])
    good = _jsonl(tmp_path / "good.jsonl", [["Guess:\n", "crane\n", "bybbg\n", "slope\n"]])
    monkeypatch.setattr(tokenizers, "load_tokenizer", lambda spec: smollm2 if spec == "smollm2" else None)
    assert main(["prog", "validate", bad, good, "--tokenizer", "smollm2"]) == 0  # warnings, not errors
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if ": turns[" in line] == [
        f"{bad}:1: turns[0].text: " + mdp.boundary_problems(_episode("Guess: ", "crane\n"), mdp.MDPConfig(8))[0].message]
    assert "turn boundaries BPE may join (warnings, not errors): 1 in 1 episodes" in out
    assert f"{bad}: 1 of 3 actions encode differently alone than inside their episode's whole text" in out
    assert f"{good}: 0 of 2 actions encode differently alone than inside their episode's whole text" in out
    problems, summary = validate_paths([bad], DataConfig(max_length=64), CharTokenizer())
    assert summary.boundary_warnings == 0 and summary.actions_apart == {} and "BPE" not in summary.format()


def test_the_trainers_data_check_warns_with_a_count(smollm2, tmp_path, capsys):
    path = _jsonl(tmp_path / "train.jsonl", [["Guess: ", "crane\n"], ["Guess:\n", "crane\n"], ["Gue", "ss\n"]])
    summary = preflight(DataConfig(path=path, max_length=64), smollm2)
    assert summary.kept == 3 and summary.boundary_warnings == 2 and summary.scalars()["data/boundary_warnings"] == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith(f"; warning: 2 turn boundaries in 2 episodes may be joined by BPE in the whole text, "
                         f"where each turn is encoded on its own (first: {path}:1: turns[0].text; "
                         "python -m qsft_jax.data validate lists every one)")
