"""Token-level MDP arrays: hand-computed small episodes, truncation, packing, and a brute-force reference
built from the definitions (per token, no shared code) on random episodes; reward transforms."""
import numpy as np
import pytest

from qsft_jax.data import DataConfig, RewardTransform, episodes_to_batch
from qsft_jax.data.episodes import parse_episode
from qsft_jax.data.loading import EpisodeProcessor
from qsft_jax.data.mdp import ARRAY_SPECS, first_fit, pack_episodes
from qsft_jax.data.rewards import transform_rewards
from qsft_jax.tokenizers import CharTokenizer

TOK = CharTokenizer("abcxyz\n")  # pad 0, bos 1, eos 2, unk 3, a=4 b=5 c=6 x=7 y=8 z=9 \n=10
G, GT = 0.9, 0.8  # gamma across turns, gamma_token inside an utterance


def obs(text):
    return {"text": text, "action": False}


def act(text, reward=0.0):
    return {"text": text, "action": True, "reward": reward}


# x | ab (0.25) | yz | c (0.5), done: two-token and one-token actions with an observation between.
EP_DONE = {"turns": [obs("x"), act("ab", 0.25), obs("yz"), act("c", 0.5)], "done": True}
EXPECTED_DONE = {
    "tokens": [1, 7, 4, 5, 8, 9, 6],
    "positions": [0, 1, 2, 3, 4, 5, 6],
    "segment_ids": [1] * 7,
    "action_mask": [0, 0, 1, 1, 0, 0, 1],
    "rewards": [0, 0, 0, 0.25, 0, 0, 0.5],
    "next_action_row": [-1, -1, 2, 5, -1, -1, -1],  # a -> b inside (row 2); b -> c across (row 5); c: done
    "discounts": [0, 0, GT, G, 0, 0, 0],
    "next_turn_row": [-1, -1, 5, 5, -1, -1, -1],
    "turn_discounts": [0, 0, GT * G, G, 0, 0, 0],
    "done": [1] * 7,
    "turn_index": [-1, -1, 0, 0, -1, -1, 1],
    "returns_to_go": [0, 0, GT * (0.25 + G * 0.5), 0.25 + G * 0.5, 0, 0, 0.5],
}
# a (0) | x | bc (1) | y, done = false: starts with an action, ends on an observation (bootstraps from row 5).
EP_CUT = {"turns": [act("a"), obs("x"), act("bc", 1.0), obs("y")], "done": False}
EXPECTED_CUT = {
    "tokens": [1, 4, 7, 5, 6, 8],
    "positions": [0, 1, 2, 3, 4, 5],
    "segment_ids": [1] * 6,
    "action_mask": [0, 1, 0, 1, 1, 0],
    "rewards": [0, 0, 0, 0, 1.0, 0],
    "next_action_row": [-1, 2, -1, 3, 5, -1],
    "discounts": [0, G, 0, GT, G, 0],
    "next_turn_row": [-1, 2, -1, 5, 5, -1],
    "turn_discounts": [0, G, 0, GT * G, G, 0],
    "done": [0] * 6,
    "turn_index": [-1, 0, -1, 1, 1, -1],
    "returns_to_go": [0, G * GT * 1.0, 0, GT * 1.0, 1.0, 0],
}


def config(**kw):
    return DataConfig(**{"max_length": 16, "gamma": G, "gamma_token": GT, **kw})


def assert_row(batch, row, start, expected, offset=0, seg=1):
    n = len(expected["tokens"])
    for key, values in expected.items():
        want = np.asarray(values, dtype=ARRAY_SPECS[key][0])
        if key in ("next_action_row", "next_turn_row"):
            want = np.where(want >= 0, want + offset, want)
        if key == "segment_ids":
            want = want * seg
        got = batch[key][row, start : start + n]
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=key)


def test_padded_rows_hand_computed():
    batch = episodes_to_batch([EP_DONE, EP_CUT], config(pack=False), TOK)
    assert batch["tokens"].shape == (2, 16)
    assert_row(batch, 0, 0, EXPECTED_DONE)
    assert_row(batch, 1, 0, EXPECTED_CUT)
    for key, (dtype, pad) in ARRAY_SPECS.items():
        assert batch[key].dtype == dtype, key
        assert (batch[key][0, 7:] == pad).all() and (batch[key][1, 6:] == pad).all(), key


def test_packed_row_hand_computed():
    third = {"turns": [obs("xx"), act("c", 1.0)], "done": True}  # 4 tokens: 7 + 6 + 4 > 16, goes to row 2
    batch = episodes_to_batch([EP_DONE, EP_CUT, third], config(pack=True), TOK)
    assert batch["tokens"].shape == (2, 16)
    assert_row(batch, 0, 0, EXPECTED_DONE)
    # Second segment: positions restart, segment id 2, row indices shifted by 7.
    assert_row(batch, 0, 7, EXPECTED_CUT, offset=7, seg=2)
    np.testing.assert_array_equal(batch["next_action_row"][0, 7:13], [-1, 9, -1, 10, 12, -1])
    np.testing.assert_array_equal(batch["tokens"][1, :4], [1, 7, 7, 6])
    np.testing.assert_array_equal(batch["next_action_row"][1, :4], [-1, -1, -1, -1])
    assert (batch["segment_ids"][0, 13:] == 0).all() and (batch["segment_ids"][1, 4:] == 0).all()


def test_first_fit_fills_earlier_rows():
    assert first_fit([10, 10, 5, 1, 2], 16) == [[0, 2, 3], [1, 4]]
    with pytest.raises(ValueError, match="length 17"):
        first_fit([17], 16)


def test_truncation_keeps_whole_turns_ending_on_an_observation():
    ep = {"turns": [obs("x"), act("a", 0.0), obs("y"), act("b", 1.0), obs("z")], "done": True}  # 6 tokens
    processor = EpisodeProcessor(config(max_length=5), TOK)
    outcome = processor(ep)
    assert outcome.status == "truncated"
    a = outcome.arrays
    np.testing.assert_array_equal(a["tokens"], [1, 7, 4, 8])
    np.testing.assert_array_equal(a["next_action_row"], [-1, -1, 3, -1])  # bootstraps from the last row
    np.testing.assert_allclose(a["discounts"], [0, 0, G, 0])
    np.testing.assert_array_equal(a["done"], [0, 0, 0, 0])
    np.testing.assert_allclose(a["returns_to_go"], [0, 0, 0, 0])  # the reward lay beyond the cut
    assert EpisodeProcessor(config(max_length=5, overlong="drop"), TOK)(ep).status == "dropped"
    dropped = EpisodeProcessor(config(max_length=3), TOK)(ep)  # "x" fits but holds no action
    assert dropped.status == "dropped" and "no prefix" in dropped.reason
    assert EpisodeProcessor(config(max_length=6), TOK)(ep).status == "kept"


def test_consecutive_action_turns_cross_with_gamma():
    ep = {"turns": [obs("x"), act("ab", 0.0), act("c", 1.0)], "done": True}
    batch = episodes_to_batch([ep], config(pack=False), TOK)
    np.testing.assert_array_equal(batch["next_action_row"][0, :5], [-1, -1, 2, 3, -1])
    np.testing.assert_allclose(batch["discounts"][0, :5], [0, 0, GT, G, 0])
    np.testing.assert_array_equal(batch["turn_index"][0, :5], [-1, -1, 0, 0, 1])


# ---- brute-force reference from the definitions -------------------------------------------------------


def reference_arrays(turns, turn_rewards, done, gamma, gamma_token):
    """Per-token loops straight from docs/algorithm.md section 1 / docs/architecture.md."""
    tokens, turn_of = [TOK.bos_id], [-1]
    for j, t in enumerate(turns):
        for ch in t["text"]:
            tokens.append(TOK.encode(ch)[0])
            turn_of.append(j)
    n = len(tokens)
    is_action = [turn_of[i] >= 0 and turns[turn_of[i]]["action"] for i in range(n)]
    action_turn_ids = sorted({turn_of[i] for i in range(n) if is_action[i]})
    out = {k: [] for k in ARRAY_SPECS}
    for i in range(n):
        nxt = next((k for k in range(i + 1, n) if is_action[k]), None)
        last_of_turn = is_action[i] and (i + 1 == n or turn_of[i + 1] != turn_of[i])
        if not is_action[i]:
            row, disc = -1, 0.0
        elif nxt is not None:
            row, disc = nxt - 1, (gamma_token if turn_of[nxt] == turn_of[i] else gamma)
        else:
            row, disc = (-1, 0.0) if done else (n - 1, gamma)
        out["next_action_row"].append(row)
        out["discounts"].append(disc)
        out["rewards"].append(turn_rewards[turn_of[i]] if last_of_turn else 0.0)
        out["action_mask"].append(is_action[i])
        out["turn_index"].append(action_turn_ids.index(turn_of[i]) if is_action[i] else -1)
        if is_action[i]:
            nxt_turn = next((k for k in range(i + 1, n) if is_action[k] and turn_of[k] != turn_of[i]), None)
            if nxt_turn is not None:
                out["next_turn_row"].append(nxt_turn - 1)
            else:
                out["next_turn_row"].append(-1 if done else n - 1)
        else:
            out["next_turn_row"].append(-1)
    for i in range(n):  # product of per-token discounts to the next turn
        if out["next_turn_row"][i] < 0:
            out["turn_discounts"].append(0.0)
            continue
        prod, k = 1.0, i
        while True:
            prod *= out["discounts"][k]
            if k + 1 >= n or turn_of[k + 1] != turn_of[i]:
                break
            k += 1
        out["turn_discounts"].append(prod)
    rtg = [0.0] * n
    for i in range(n - 1, -1, -1):
        if is_action[i]:
            nxt = next((k for k in range(i + 1, n) if is_action[k]), None)
            rtg[i] = out["rewards"][i] + (out["discounts"][i] * rtg[nxt] if nxt is not None else 0.0)
    out["returns_to_go"] = rtg
    out["tokens"], out["positions"], out["segment_ids"] = tokens, list(range(n)), [1] * n
    out["done"] = [done] * n
    return out


def random_episode(rng):
    turns = [obs("".join(rng.choice(list("xyz\n"), rng.integers(0, 4))))] if rng.random() < 0.8 else []
    for _ in range(rng.integers(1, 5)):
        turns.append(act("".join(rng.choice(list("abc"), rng.integers(1, 4))), float(rng.integers(0, 2)) * 0.25))
        if rng.random() < 0.7:
            turns.append(obs("".join(rng.choice(list("xyz"), rng.integers(0, 3)))))
    done = bool(rng.random() < 0.5) or turns[-1]["action"]
    return {"turns": turns, "done": done}


@pytest.mark.parametrize("gamma,gamma_token", [(1.0, 1.0), (0.9, 0.8), (0.5, 1.0)])
def test_arrays_match_brute_force_reference(gamma, gamma_token):
    rng = np.random.default_rng(0)
    cfg = DataConfig(max_length=64, gamma=gamma, gamma_token=gamma_token)
    processor = EpisodeProcessor(cfg, TOK)
    for _ in range(60):
        ep = random_episode(rng)
        parsed, problems = parse_episode(ep)
        assert not problems, problems
        rewards, problems = transform_rewards(parsed, cfg.reward_transform, gamma)
        if problems:  # returns above 1: rejected, nothing to compare
            continue
        outcome = processor(ep)
        assert outcome.status == "kept", outcome
        ref = reference_arrays(ep["turns"], rewards, ep["done"], gamma, gamma_token)
        for key, (dtype, _) in ARRAY_SPECS.items():
            np.testing.assert_allclose(outcome.arrays[key], np.asarray(ref[key], dtype=dtype), rtol=1e-6, err_msg=key)


def test_packing_invariants_on_random_episodes():
    rng = np.random.default_rng(1)
    cfg = DataConfig(max_length=32, gamma=0.9, reward_transform="terminal_return:0,4")
    processor = EpisodeProcessor(cfg, TOK)
    per_episode = [processor(random_episode(rng)).arrays for _ in range(80)]
    rows = pack_episodes(per_episode, 32, TOK.pad_id)
    assert len(rows) < len(per_episode)  # packing actually packs
    total = 0
    for row in rows:
        seg = row["segment_ids"]
        used = seg > 0
        assert used[: used.sum()].all()  # segments first, padding after
        for key in ("next_action_row", "next_turn_row"):
            idx = np.flatnonzero(row[key] >= 0)
            target = row[key][idx]
            assert (seg[target] == seg[idx]).all(), key  # never into another segment
            assert (target >= idx).all(), key  # the next state is at or after the action
        starts = np.flatnonzero((np.diff(np.concatenate([[0], seg])) != 0) & used)
        assert (row["positions"][starts] == 0).all() and (row["tokens"][starts] == TOK.bos_id).all()
        assert not row["action_mask"][starts].any()
        total += used.sum()
    assert total == sum(len(a["tokens"]) for a in per_episode)


# ---- reward transforms ----------------------------------------------------------------------------------


def _episode(rewards, done=True):
    turns = [obs("x")]
    for r in rewards:
        turns += [act("a", r), obs("y")]
    return parse_episode({"turns": turns, "done": done})[0]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_affine_keeps_returns_in_unit_interval_and_inverts(gamma):
    spec = RewardTransform.from_config("affine:-1,2,5")
    rng = np.random.default_rng(2)
    for n in range(1, 6):
        for rewards in (np.full(n, -1.0), np.full(n, 2.0), rng.uniform(-1, 2, n)):
            out, problems = transform_rewards(_episode(rewards), spec, gamma)
            assert not problems
            action_out = out[1::2]
            g0 = sum(gamma**k * r for k, r in enumerate(action_out))
            assert -1e-12 <= g0 <= 1 + 1e-12
            original = sum(gamma**k * r for k, r in enumerate(rewards))
            assert spec.original_return(g0, n, gamma) == pytest.approx(original)
            np.testing.assert_allclose(spec.original_step_reward(action_out, gamma), rewards)
    # The extremes reach the ends: all max rewards for max_turns turns -> exactly 1, all min -> 0.
    out, _ = transform_rewards(_episode([2.0] * 5), spec, gamma)
    assert sum(gamma**k * r for k, r in enumerate(out[1::2])) == pytest.approx(1.0)
    _, problems = transform_rewards(_episode([2.5]), spec, gamma)
    assert "reward 2.5 outside the declared bounds [-1, 2]" in problems[0].message
    _, problems = transform_rewards(_episode([0.0] * 6), spec, gamma)
    assert "6 action turns exceed reward_transform.max_turns=5" in problems[0].message


def test_terminal_return_on_last_action_and_inverse():
    spec = RewardTransform(kind="terminal_return", low=-3.0, high=5.0)
    out, problems = transform_rewards(_episode([1.0, -2.0, 4.0]), spec, 1.0)
    assert not problems
    np.testing.assert_allclose(out, [0, 0, 0, 0, 0, (3.0 + 3.0) / 8.0, 0])
    assert spec.original_return(out[5]) == pytest.approx(3.0)
    _, problems = transform_rewards(_episode([4.0, 4.0]), spec, 1.0)
    assert "episode return 8 outside the declared [R_min, R_max] = [-3, 5]" in problems[0].message


def test_transform_spec_parsing_and_errors():
    assert RewardTransform.from_config({"kind": "affine", "low": 0, "high": 1, "max_turns": 3}).max_turns == 3
    assert RewardTransform.from_config("none") == RewardTransform()
    with pytest.raises(ValueError, match="unknown kind"):
        RewardTransform.from_config("scale")
    with pytest.raises(ValueError, match="needs declared low and high"):
        RewardTransform.from_config("affine")
    with pytest.raises(ValueError, match="needs max_turns"):
        RewardTransform.from_config("affine:0,1").horizon(1.0)
    with pytest.raises(ValueError, match="unknown fields"):
        DataConfig.from_config({"max_length": 8, "gama": 0.9})
    import ml_collections

    cfg = ml_collections.ConfigDict({"path": ["a.jsonl", "b.jsonl"], "max_length": 64, "gamma": 0.95,
                                     "reward_transform": {"kind": "terminal_return", "low": -20.0, "high": 0.0}})
    data = DataConfig.from_config(cfg, shuffle_seed=3)
    assert data.path == ("a.jsonl", "b.jsonl") and data.shuffle_seed == 3 and data.mdp.gamma == 0.95
    assert data.reward_transform == RewardTransform("terminal_return", -20.0, 0.0)
    with pytest.raises(ValueError, match="overlong"):
        DataConfig(overlong="cut")


def test_token_level_return_check_with_gamma_token():
    # Turn-level returns (gamma_token ignored) are -0.5 + 1 = 0.5, fine; with gamma_token = 0.1 the first
    # turn's token-level return is -0.5 + 0.1 * 1 < 0, which the token-level check must catch.
    ep = {"turns": [obs("x"), act("a", -0.5), obs("y"), act("bb", 1.0)], "done": True}
    outcome = EpisodeProcessor(DataConfig(max_length=16, gamma_token=0.1), TOK)(ep, "f", 3)
    assert outcome.status == "invalid"
    assert "token-level return-to-go -0.4 at token 2" in str(outcome.problems[0])


def test_turn_templates_wrap_each_turn():
    cfg = config(pack=False, observation_template="{text}\n", action_template="z{text}")
    batch = episodes_to_batch([{"turns": [obs("x"), act("ab", 1.0)], "done": True}], cfg, TOK)
    np.testing.assert_array_equal(batch["tokens"][0, :6], [1, 7, 10, 9, 4, 5])  # BOS x \n | z a b
    np.testing.assert_array_equal(batch["action_mask"][0, :6], [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(batch["rewards"][0, :6], [0, 0, 0, 0, 0, 1.0])
    with pytest.raises(ValueError, match="must contain"):
        config(action_template="no text")
