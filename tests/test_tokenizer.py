"""The APT tokenizer: byte-level BPE trained locally (nothing downloaded), exact round trips,
explicit special tokens that text cannot inject, and files that load back identically."""

import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apt_hal.models.tokenizer import MIN_VOCAB_SIZE, Tokenizer

TEXT = (pathlib.Path(__file__).resolve().parents[1] / "examples" / "tiny.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=400)


TRICKY = ["", " ", "  two  spaces ", "tabs\tand\nnewlines\r\n\n", "ünïcödé, 中文, العربية, emoji 🙂🚀",
          "<|eos|> <|bos|><|pad|> spelled out", "\x00\x7f control", "The river runs past the old mill."]


@pytest.mark.parametrize("text", TRICKY)
def test_decode_of_encode_is_the_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, derandomize=True, deadline=None)
@given(text=st.text())
def test_decode_of_encode_is_the_text_for_any_string(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_explicit_and_text_cannot_inject_them(tok):
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    ids = tok.encode("The mill", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and not specials & set(ids[1:-1])
    spelled = tok.encode("<|bos|><|eos|><|pad|>")
    assert not specials & set(spelled), "text spelling a special token must encode as ordinary bytes"
    assert tok.decode([tok.bos_id, *tok.encode("x"), tok.eos_id, tok.pad_id]) == "x"


def test_training_is_deterministic_within_the_vocab_size_and_merges(tok):
    again = Tokenizer.train([TEXT], vocab_size=400)
    assert again.to_files() == tok.to_files()
    assert MIN_VOCAB_SIZE < tok.vocab_size <= 400
    sample = TEXT[:500]
    assert len(tok.encode(sample)) < len(sample.encode("utf-8")) / 2, "BPE merges should shorten the text"


def test_files_load_back_to_the_same_tokenizer(tok, tmp_path):
    for name, content in tok.to_files().items():
        (tmp_path / name).write_bytes(content)
    for loaded in (Tokenizer.load(tmp_path), Tokenizer.load(tmp_path / "tokenizer.json")):
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == \
               (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
        assert loaded.encode(TEXT) == tok.encode(TEXT)
        assert loaded.encode("<|eos|>") == tok.encode("<|eos|>")  # the no-injection rule survives loading


def test_a_tokenizer_json_with_other_special_token_names(tmp_path):
    """tokenizer_config.json names the special tokens, as Hugging Face folders do; pad may be absent."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (backend.token_to_id("<s>"), backend.token_to_id("</s>"))
    assert tok.pad_id == tok.eos_id  # no pad token: padding uses eos


def test_errors_name_what_is_wrong(tok, tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        Tokenizer.train([TEXT], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing")
    for name, content in tok.to_files().items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match=r"bos_token '<s>' is not in the vocabulary"):
        Tokenizer.load(tmp_path)
