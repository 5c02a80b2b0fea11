"""Corpora: clear errors for bad files, a split by document, a token cache, batches."""

import os

import numpy as np
import pytest
import torch

from qkv.data import (
    Batches,
    Document,
    eval_windows,
    prepare_corpus,
    read_corpus,
    split_into_documents,
    split_train_val,
    stdlib_docs,
)
from qkv.errors import QkvError


def test_missing_file_is_named(tmp_path):
    with pytest.raises(QkvError, match=r"nope\.txt does not exist"):
        read_corpus([str(tmp_path / "nope.txt")])


def test_empty_file_is_named(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(QkvError, match=r"empty\.txt is empty"):
        read_corpus([str(tmp_path / "empty.txt")])


def test_binary_file_is_named(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(QkvError, match=r"blob\.bin looks binary"):
        read_corpus([str(tmp_path / "blob.bin")])


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf" + "é au lait".encode("latin-1"))
    with pytest.raises(QkvError, match=r"latin1\.txt is not UTF-8: byte 0xe9 at offset 3"):
        read_corpus([str(tmp_path / "latin1.txt")])


def test_empty_folder_and_unmatched_glob_are_named(tmp_path):
    with pytest.raises(QkvError, match="has no files"):
        read_corpus([str(tmp_path)])
    with pytest.raises(QkvError, match="no files match"):
        read_corpus([str(tmp_path / "*.md")])
    with pytest.raises(QkvError, match="unknown builtin"):
        read_corpus(["builtin:wikipedia"])


def test_folders_and_globs_read_every_file(corpus_dir):
    by_folder = read_corpus([str(corpus_dir)])
    by_glob = read_corpus([str(corpus_dir / "*.py")])
    assert by_folder == by_glob
    sources = {d.source.split("#")[0] for d in by_folder}
    assert len(sources) == 4


def test_documents_cut_at_blank_lines_rejoin_to_the_file():
    text = "".join(f"paragraph {i}\nline two\n\n" for i in range(200))
    documents = split_into_documents("f.txt", text, 500)
    assert len(documents) > 5
    assert "".join(d.text for d in documents) == text
    assert all(d.text.endswith("\n\n") for d in documents[:-1])


def test_split_is_by_document_deterministic_and_order_free():
    documents = [Document(f"d{i}", f"document number {i}\n" * 3) for i in range(100)]
    train, val = split_train_val(documents, 0.1)
    assert len(val) == 10 and len(train) == 90
    assert not {d.text for d in train} & {d.text for d in val}
    _, val_again = split_train_val(list(reversed(documents)), 0.1)
    assert {d.text for d in val_again} == {d.text for d in val}


def test_single_tiny_document_cannot_be_split():
    with pytest.raises(QkvError, match="at least two"):
        split_train_val([Document("a", "hello")])


@pytest.mark.slow
def test_stdlib_docs_is_english_from_thousands_of_docstrings():
    documents = stdlib_docs()
    assert len(documents) > 5000
    size = sum(len(d.text.encode()) for d in documents)
    assert 1_000_000 < size < 3_000_000
    sources = {d.source for d in documents}
    assert "json.dumps" in sources
    json_dumps = next(d for d in documents if d.source == "json.dumps")
    assert "JSON" in json_dumps.text
    assert not any(".test." in s or s.startswith("test.") for s in sources)


def test_token_cache_is_reused(corpus_dir):
    first = prepare_corpus([str(corpus_dir)], "char", val_fraction=0.2)
    files = first.train.tokens.filename
    modified = os.path.getmtime(files)
    second = prepare_corpus([str(corpus_dir)], "char", val_fraction=0.2)
    assert isinstance(second.train.tokens, np.memmap)
    assert second.train.tokens.filename == files and os.path.getmtime(files) == modified
    np.testing.assert_array_equal(first.train.tokens, second.train.tokens)
    text = first.tokenizer.decode(first.train.tokens[:200].tolist())
    assert text in "".join(d.text for d in read_corpus([str(corpus_dir)]))
    assert first.train.bytes_per_token == pytest.approx(1.0, abs=0.05)


def test_batches_are_windows_with_targets_shifted_by_one(corpus_dir):
    corpus = prepare_corpus([str(corpus_dir)], "char", val_fraction=0.2)
    batches = Batches(corpus.train, batch_size=4, context=16, seed=0)
    x, y = batches.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    same = Batches(corpus.train, batch_size=4, context=16, seed=0).next()
    torch.testing.assert_close(same[0], x)


def test_eval_windows_cover_the_split_in_order(corpus_dir):
    corpus = prepare_corpus([str(corpus_dir)], "char", val_fraction=0.2)
    windows = list(eval_windows(corpus.val, context=32, batch_size=5))
    x = torch.cat([w[0] for w in windows])
    assert x.shape[0] == (len(corpus.val.tokens) - 1) // 32
    np.testing.assert_array_equal(x.flatten().numpy(), corpus.val.tokens[: x.numel()])
    with pytest.raises(QkvError, match="fewer than one"):
        list(eval_windows(corpus.val, context=10**7, batch_size=1))
