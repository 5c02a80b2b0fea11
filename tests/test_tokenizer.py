"""Tokenizers are lossless on every Unicode string, keep their specials, and round-trip as JSON."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import QkvError
from qkv.tokenizer import END_OF_TEXT, PAD, Tokenizer

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.\n",
    "def tokenize(text):\n    return text.split()\n",
    "Ünïcödé, 中文, emoji 🙂 and\ttabs.\n",
] * 20


@pytest.fixture(scope="module", params=["bpe", "char"])
def tokenizer(request) -> Tokenizer:
    return Tokenizer.train(request.param, TRAINING_TEXT, vocab_size=300)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_decode_encode_is_identity_for_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(text=st.text(alphabet=st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF)))
@settings(max_examples=100, deadline=None)
def test_unseen_astral_characters_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_have_ids_and_decode_back(tokenizer):
    assert tokenizer.end_of_text_id != tokenizer.pad_id
    ids = tokenizer.encode(f"a{END_OF_TEXT}b")
    assert tokenizer.end_of_text_id in ids
    assert tokenizer.decode(ids) == f"a{END_OF_TEXT}b"
    assert tokenizer.backend.token_to_id(PAD) == tokenizer.pad_id


def test_saved_tokenizer_json_loads_identically(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)
    text = "The lazy dog 🙂 jumps."
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.vocab_size == tokenizer.vocab_size


def test_char_tokenizer_gives_one_token_per_seen_character():
    char = Tokenizer.train_char(["abc cab"])
    assert len(char.encode("abcabc ")) == 7
    assert len(char.encode("é")) == 2  # unseen: its two UTF-8 bytes


def test_bpe_compresses_and_respects_vocab_size():
    bpe = Tokenizer.train_bpe(TRAINING_TEXT, vocab_size=320)
    assert bpe.vocab_size <= 320
    text = "".join(TRAINING_TEXT[:3])
    assert len(bpe.encode(text)) < len(text.encode()) / 2


def test_bad_tokenizer_requests_are_clear(tmp_path):
    with pytest.raises(QkvError, match="unknown tokenizer"):
        Tokenizer.train("wordpiece", ["x"])
    with pytest.raises(QkvError, match="more than"):
        Tokenizer.train_bpe(["x"], vocab_size=100)
    with pytest.raises(QkvError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(QkvError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)
