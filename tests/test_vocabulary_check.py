"""Pretrained weights and the configured tokenizer: a vocabulary that is not the weights' own is refused
(`main.check_vocabulary`) before anything is written; the weights' own, however it is loaded, is accepted."""
from __future__ import annotations

import os
import re

import ml_collections
import pytest

from qsft_jax import cli
from qsft_jax import config_lib
from qsft_jax import main as main_lib
from qsft_jax.export import hf_tokenizer
from qsft_jax.tokenizers import CharTokenizer, DEFAULT_ALPHABET

import trainer_utils as tu

PROG = "python -m qsft_jax.main"


def _config(init: str, tokenizer: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": {"init": init}, "tokenizer": tokenizer})


def test_smollm2_weights_with_the_default_char_tokenizer_fail_before_any_write(tmp_path, capsys, monkeypatch,
                                                                              smollm2_tokenizer):
  from qsft_jax import tokenizers
  load = tokenizers.load_tokenizer  # the weights' tokenizer: the session's copy, not a second load
  monkeypatch.setattr(tokenizers, "load_tokenizer",
                      lambda spec: smollm2_tokenizer if spec == "smollm2" else load(spec))
  workdir = str(tmp_path / "w")
  with pytest.raises(SystemExit) as exit_:
    cli.run(main_lib.main, [PROG, f"--config={tu.TINY}", f"--workdir={workdir}", "--config.model.init=smollm2"])
  assert exit_.value.code == 1
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0] == (
      f"FATAL: {PROG}: config.tokenizer: 'char' is not the vocabulary of config.model.init='smollm2' "
      f"({CharTokenizer().vocab_size} tokens against 49152, tokenizer 'char' against the weights' 'smollm2'); "
      "set config.tokenizer='smollm2'")
  assert not os.path.exists(workdir)


def test_a_char_tokenizer_matches_its_own_export_and_a_changed_alphabet_is_named(tmp_path):
  folder = tmp_path / "phi"
  hf_tokenizer(CharTokenizer()).save_pretrained(str(folder))
  init = f"hf:{folder}"
  main_lib.check_vocabulary(_config(init, "char"), CharTokenizer())  # accepted: the same vocabulary
  swapped = DEFAULT_ALPHABET.replace("a", "\0").replace("b", "a").replace("\0", "b")
  index = CharTokenizer.NUM_SPECIAL + DEFAULT_ALPHABET.index("a")
  with pytest.raises(config_lib.ConfigError, match=rf"token {index} is 'b' against 'a'.*set config.tokenizer='{re.escape(init)}'"):
    main_lib.check_vocabulary(_config(init, "char:other.json"), CharTokenizer(swapped))


def test_weights_without_a_tokenizer_refuse_a_char_tokenizer_only(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(config_lib.ConfigError, match="carry no tokenizer to compare with"):
    main_lib.check_vocabulary(_config(f"hf:{tmp_path}", "char"), CharTokenizer())
  main_lib.check_vocabulary(_config("random", "char"), CharTokenizer())


def test_smollm2_weights_accept_their_tokenizer_from_the_gguf_or_a_folder(tmp_path, smollm2_tokenizer):
  smollm2 = smollm2_tokenizer
  main_lib.check_vocabulary(_config("smollm2", "smollm2"), smollm2)
  smollm2.hf.save_pretrained(str(tmp_path))  # the same vocabulary, as an HF folder's tokenizer files
  main_lib.check_vocabulary(_config(f"hf:{tmp_path}", "smollm2"), smollm2)
  chars = tmp_path / "char"
  hf_tokenizer(CharTokenizer()).save_pretrained(str(chars))
  with pytest.raises(config_lib.ConfigError, match=rf"49152 tokens against {CharTokenizer().vocab_size}"):
    main_lib.check_vocabulary(_config(f"hf:{chars}", "smollm2"), smollm2)
