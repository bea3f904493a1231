"""Tokenizers: CharTokenizer round trips and save/load; the SmolLM2 GGUF tokenizer checked against the
GGUF file's own vocabulary read with the ``gguf`` package (an independent reader)."""
import json

import numpy as np
import pytest

from qsft_jax.tokenizers import DEFAULT_ALPHABET, CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer, smollm2_gguf_path


def test_char_tokenizer_layout_and_round_trip():
    tok = CharTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 4 + len(DEFAULT_ALPHABET) == 4 + 97
    assert "\n" in DEFAULT_ALPHABET and "\r" not in DEFAULT_ALPHABET
    text = "Wordle. Guess!\nb y g {}~ 0"
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(4 <= i < tok.vocab_size for i in ids)
    assert ids == [4 + DEFAULT_ALPHABET.index(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text  # specials decode to ""
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_char_tokenizer_unknown_characters_and_explicit_alphabet(tmp_path):
    tok = CharTokenizer("ab\n")
    assert tok.vocab_size == 7
    assert tok.encode("ab\nc\u00e9\U0001F600") == [4, 5, 6, 3, 3, 3]  # one unk per unknown code point
    np.testing.assert_array_equal(tok.encode_array("ba"), np.array([5, 4], dtype=np.int32))
    ids, lengths = tok.encode_pieces(["ab", "", "c\n"])
    assert ids.tolist() == tok.encode("ab") + tok.encode("c\n") and lengths.tolist() == [2, 0, 2]
    assert tok.encode("") == []
    path = str(tmp_path / "tok.json")
    tok.save(path)
    loaded = load_tokenizer(f"char:{path}")
    assert loaded.alphabet == "ab\n" and loaded.encode("ba\n") == tok.encode("ba\n")
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer("abca")
    (tmp_path / "bad.json").write_text(json.dumps({"type": "bpe"}))
    with pytest.raises(ValueError, match="bad.json"):
        CharTokenizer.load(str(tmp_path / "bad.json"))


def test_load_tokenizer_rejects_unknown_spec():
    assert isinstance(load_tokenizer("char"), CharTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        load_tokenizer("bpe:x")
    with pytest.raises(FileNotFoundError):
        load_tokenizer("gguf:/nonexistent/model.gguf")


def _gpt2_byte_decoder():
    """GPT-2's byte <-> printable unicode table (byte-level BPE), written out independently."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@pytest.fixture
def smollm2(smollm2_tokenizer):
    return smollm2_tokenizer


def test_smollm2_gguf_tokenizer_matches_gguf_vocabulary(smollm2):
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_gguf_path())

    def scalar(name):
        field = reader.fields[name]
        return int(field.parts[field.data[0]][0])

    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens_field.parts[i]).decode("utf-8") for i in tokens_field.data]
    assert smollm2.vocab_size == len(vocab)
    assert smollm2.bos_id == scalar("tokenizer.ggml.bos_token_id")
    assert smollm2.eos_id == scalar("tokenizer.ggml.eos_token_id")
    assert smollm2.pad_id == scalar("tokenizer.ggml.padding_token_id")
    byte_of = _gpt2_byte_decoder()
    text = "Wordle. Guess the word.\ncrane\nb y b b g\n"
    ids = smollm2.encode(text)
    assert smollm2.bos_id not in ids  # no special tokens added
    assert bytes(byte_of[c] for i in ids for c in vocab[i]).decode("utf-8") == text
    assert smollm2.decode(ids) == text
    pieces = ["Wordle.\n", "crane\n", "", " b y\n"]
    ids, lengths = smollm2.encode_pieces(pieces)
    assert lengths.tolist() == [len(smollm2.encode(p)) for p in pieces]
    assert ids.tolist() == [i for p in pieces for i in smollm2.encode(p)]


def test_hf_folder_round_trip(smollm2, tmp_path):
    smollm2.hf.save_pretrained(str(tmp_path))
    folder = load_tokenizer(f"hf:{tmp_path}")
    assert isinstance(folder, HFTokenizer)
    text = "slope\nthe cat sat"
    assert folder.encode(text) == smollm2.encode(text)
    assert (folder.vocab_size, folder.bos_id, folder.eos_id) == (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id)


def test_smollm2_action_tokens_decode_to_the_action_texts(smollm2):
    """Turns are encoded separately, so action tokens are exactly the action turns' tokens, with BPE too."""
    from qsft_jax.data import DataConfig, episodes_to_batch

    episode = {"turns": [{"text": "Wordle. Guess the word.\n", "action": False},
                         {"text": "crane\n", "action": True, "reward": 0.0},
                         {"text": "b y b b g\n", "action": False},
                         {"text": "slope\n", "action": True, "reward": 1.0}], "done": True}
    batch = episodes_to_batch([episode], DataConfig(max_length=48, pack=False), smollm2)
    tokens, mask, turn = batch["tokens"][0], batch["action_mask"][0], batch["turn_index"][0]
    assert tokens[0] == smollm2.bos_id
    assert smollm2.decode(tokens[turn == 0]) == "crane\n" and smollm2.decode(tokens[turn == 1]) == "slope\n"
    real = batch["segment_ids"][0] > 0
    assert smollm2.decode(tokens[real & ~mask][1:]) == "Wordle. Guess the word.\nb y b b g\n"
    assert (tokens[~real] == smollm2.pad_id).all()


def test_token_bytes_concatenate_to_what_decode_writes(smollm2):
    pieces = smollm2.token_bytes()
    assert len(pieces) == smollm2.vocab_size
    rng = np.random.default_rng(0)
    for _ in range(200):  # random ids split characters across tokens: only the whole sequence decodes
        ids = rng.integers(0, smollm2.vocab_size, size=rng.integers(1, 8)).tolist()
        assert b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace") == smollm2.decode(ids)
    assert pieces[smollm2.encode(" crane")[0]] == b" crane" and pieces[smollm2.eos_id] == b"<|im_end|>"
