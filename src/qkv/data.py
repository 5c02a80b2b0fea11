"""Corpora: text files, folders, globs or `builtin:stdlib-docs`, split into documents, divided
into train / validation by document, tokenized once into cached memory-mapped token files, and
served as random context windows.

A document is a file, or a piece of a large file cut at a blank line, so a single file still
yields a validation split. Documents are joined with <|endoftext|> between them. The split is
deterministic: a document goes to validation when the hash of its text is among the lowest
`val_fraction` of all documents' hashes.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qkv.errors import QkvError, describe_os_error
from qkv.text import read_text_file
from qkv.tokenizer import Tokenizer

BUILTIN_PREFIX = "builtin:"


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token lists -> ids (batch, longest) and mask (1 real, 0 padding), padded on the right
    (or on the left, so that every row's newest token is in the last column)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where] = torch.tensor(row, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


@dataclass(frozen=True)
class Document:
    source: str
    text: str


def cache_dir() -> Path:
    """$QKV_CACHE_DIR, else ~/.cache/qkv: tokenized corpora and trained tokenizers."""
    return Path(os.environ.get("QKV_CACHE_DIR", Path.home() / ".cache" / "qkv"))


def absolute_specs(specs: list[str]) -> list[str]:
    """Data specs with paths made absolute (builtin:NAME and task:NAME as they are), so that a
    run saved with them finds its files again from any directory."""
    return [s if s.startswith((BUILTIN_PREFIX, "task:")) else os.path.abspath(s) for s in specs]


def expand_paths(spec: str) -> list[Path]:
    """A file, a folder (every non-hidden file under it, sorted) or a glob pattern."""
    path = Path(spec)
    if path.is_dir():
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise QkvError(f"folder {path} has no files; put text files in it")
        return files
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        if not files:
            raise QkvError(f"no files match {spec!r}; check the pattern")
        return files
    return [path]


def split_into_documents(source: str, text: str, target_chars: int) -> list[Document]:
    """Cut text after the first blank line (else newline) past each `target_chars`; lossless."""
    pieces, start = [], 0
    while len(text) - start > 2 * target_chars:
        cut = text.find("\n\n", start + target_chars)
        if cut < 0:
            cut = text.find("\n", start + target_chars)
        if cut < 0:
            break
        end = cut + (2 if text.startswith("\n\n", cut) else 1)
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    if len(pieces) == 1:
        return [Document(source, text)]
    return [Document(f"{source}#{i}", piece) for i, piece in enumerate(pieces)]


def read_corpus(
    specs: list[str], progress: Callable[[str], None] | None = None, whole_files: bool = False
) -> list[Document]:
    """Documents of every spec: builtin:NAME, a file, a folder or a glob; a file is cut into
    documents of about 1/64 of the text (so a share can be held out) unless `whole_files`."""
    if not specs:
        raise QkvError("no data given; pass files, folders, globs or builtin:stdlib-docs")
    files: list[tuple[str, str]] = []
    documents: list[Document] = []
    for spec in specs:
        if spec.startswith(BUILTIN_PREFIX):
            documents += builtin_corpus(spec[len(BUILTIN_PREFIX) :], progress)
            continue
        files += [(str(p), read_text_file(p)) for p in expand_paths(spec)]
    total = sum(len(text) for _, text in files)
    target = min(65536, max(1024, total // 64))
    for source, text in files:
        documents += (
            [Document(source, text)] if whole_files else split_into_documents(source, text, target)
        )
    return documents


def builtin_corpus(name: str, progress: Callable[[str], None] | None = None) -> list[Document]:
    if name != "stdlib-docs":
        raise QkvError(f"unknown builtin corpus {name!r}; available: builtin:stdlib-docs")
    return stdlib_docs(progress)


def stdlib_docs(progress: Callable[[str], None] | None = None) -> list[Document]:
    """Docstrings of the running Python's standard library (modules, classes, functions), read
    with `ast` (nothing imported, tests excluded); cached as JSON per interpreter."""
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{sys.version}|{root}".encode()).hexdigest()[:16]
    cached = cache_dir() / "builtin" / f"stdlib-docs-{key}.json"
    if cached.is_file():
        return [Document(s, t) for s, t in json.loads(cached.read_text(encoding="utf-8"))]
    if progress:
        progress(f"building builtin:stdlib-docs from {root} (once; cached in {cached.parent})")
    documents = list(_stdlib_docstrings(root))
    _atomic_write_text(cached, json.dumps([[d.source, d.text] for d in documents]))
    return documents


def _stdlib_docstrings(root: Path) -> Iterator[Document]:
    skip = {"site-packages", "test", "tests"}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skip & set(relative.parts[:-1]):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for qualname, node in _documented_nodes(tree, module):
            docstring = ast.get_docstring(node)
            if docstring:
                yield Document(qualname, docstring)


def _documented_nodes(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
    yield prefix, node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _documented_nodes(child, f"{prefix}.{child.name}")


def held_out_indices(keys: list[str], fraction: float) -> set[int]:
    """The indices of the `fraction` of items (at least one) whose keys sort lowest: with keys
    that hash the items' text, a held-out split that is the same on every run."""
    ranked = sorted(range(len(keys)), key=keys.__getitem__)
    return set(ranked[: max(1, round(len(keys) * fraction))])


def split_train_val(
    documents: list[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """Validation = the documents whose text hashes lowest, at least one; order kept."""
    if not 0 < val_fraction < 1:
        raise QkvError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(documents) < 2:
        raise QkvError(
            "the corpus is one short document: a validation split needs at least two; "
            "give more text (a few KB) or more files"
        )
    val_ids = held_out_indices([_digest(d.text) + str(i) for i, d in enumerate(documents)],
                               val_fraction)  # fmt: skip
    train = [d for i, d in enumerate(documents) if i not in val_ids]
    val = [d for i, d in enumerate(documents) if i in val_ids]
    return train, val


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def corpus_digest(documents: list[Document]) -> str:
    h = hashlib.sha256()
    for d in documents:
        h.update(_digest(d.source).encode())
        h.update(_digest(d.text).encode())
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    with _cache_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def _cache_write(path: Path) -> Iterator[Path]:
    """A temporary file to write `path`'s content into, renamed into place after the block; a
    write that fails (full or read-only cache) is one QkvError, the temporary file removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:  # Ctrl-C too: no temporary file is left in the cache
        tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        raise QkvError(
            f"cannot write the cache file {path}: {describe_os_error(err)}; free space, or set "
            "QKV_CACHE_DIR to a directory you can write to"
        ) from None


@dataclass
class TokenFile:
    """A split's tokens, memory-mapped, and the UTF-8 bytes of the text they encode."""

    tokens: np.ndarray
    n_bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, len(self.tokens))


def tokenize_split(documents: list[Document], tokenizer: Tokenizer, name: str) -> TokenFile:
    """Documents -> one memory-mapped token file, <|endoftext|> after each document.

    Cached under cache_dir()/tokens by (documents, tokenizer), so a second run starts at once.
    """
    key = hashlib.sha256(
        (corpus_digest(documents) + _digest(tokenizer.to_str())).encode()
    ).hexdigest()[:24]
    folder = cache_dir() / "tokens" / key
    meta_path = folder / f"{name}.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        tokens = np.memmap(folder / f"{name}.bin", dtype=meta["dtype"], mode="r")
        return TokenFile(tokens, meta["n_bytes"])
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    eot = tokenizer.end_of_text_id
    chunks = []
    for start in range(0, len(documents), 1024):
        texts = [d.text for d in documents[start : start + 1024]]
        for ids in tokenizer.encode_batch(texts):
            chunks.append(np.asarray([*ids, eot], dtype=dtype))
    tokens = np.concatenate(chunks)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
    with _cache_write(folder / f"{name}.bin") as tmp:
        tokens.tofile(tmp)
    _atomic_write_text(meta_path, json.dumps({"dtype": np.dtype(dtype).name, "n_bytes": n_bytes}))
    return TokenFile(np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r"), n_bytes)


class Batches:
    """Random (inputs, targets) windows of `context` tokens; targets are inputs shifted by one.

    Each optimizer step draws the start of all `batch_size * accum * world` windows of its global
    batch at once (the same draw in every process); process `rank` reads only its contiguous
    share, as `accum` micro-batches of `batch_size`. So a step trains on the same windows
    whatever the number of processes and the micro-batch size."""

    def __init__(
        self,
        data: TokenFile,
        batch_size: int,
        context: int,
        seed: int,
        accum: int = 1,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if len(data.tokens) < context + 1:
            raise QkvError(
                f"the split has {len(data.tokens)} tokens, fewer than one context window of "
                f"{context + 1}; give more text or a smaller --context"
            )
        self.tokens = data.tokens
        self.batch_size, self.context = batch_size, context
        self.accum, self.rank, self.world = accum, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        # This process's window starts for the step, a tensor (8 bytes each, so a huge
        # --grad-accum costs memory linearly, not 5x that as Python ints), and how many are used.
        self.pending = torch.empty(0, dtype=torch.int64)
        self.used = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, context) inputs and targets: this process's next micro-batch."""
        if self.used >= len(self.pending):
            high = len(self.tokens) - self.context - 1
            share = self.batch_size * self.accum
            starts = torch.randint(0, high + 1, (share * self.world,), generator=self.generator)
            self.pending, self.used = starts[self.rank * share : (self.rank + 1) * share], 0
        starts = self.pending[self.used : self.used + self.batch_size].tolist()
        self.used += self.batch_size
        span = self.context + 1
        window = torch.from_numpy(
            np.stack([self.tokens[s : s + span] for s in starts]).astype(np.int64)
        )
        return window[:, :-1], window[:, 1:]


def eval_windows(
    data: TokenFile, context: int, batch_size: int, max_windows: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows covering the split from its start, in batches."""
    tokens = data.tokens
    n = (len(tokens) - 1) // context
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise QkvError(
            f"the validation split has {len(tokens)} tokens, fewer than one window of "
            f"{context + 1}; give more text or a smaller --context"
        )
    for first in range(0, n, batch_size):
        last = min(n, first + batch_size)
        block = np.asarray(tokens[first * context : last * context + 1], dtype=np.int64)
        block = torch.from_numpy(block)
        yield block[:-1].view(-1, context), block[1:].view(-1, context)


@dataclass
class Corpus:
    """A tokenizer and the corpus' train / validation token files."""

    tokenizer: Tokenizer
    train: TokenFile
    val: TokenFile
    documents: int


def prepare_corpus(
    specs: list[str],
    tokenizer: Tokenizer | str,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    progress: Callable[[str], None] | None = None,
    val_specs: list[str] | None = None,
) -> Corpus:
    """Read, split and tokenize a corpus; `tokenizer` is a Tokenizer or a kind to train
    ("bpe", "char"), cached by (corpus, kind, vocab_size). With `val_specs` the validation text
    is those files and the training text all of `specs`, each file one document (as a
    benchmark's own split is read); else validation is `val_fraction` of the documents."""
    if val_specs:
        train = read_corpus(specs, progress, whole_files=True)
        val = read_corpus(val_specs, progress, whole_files=True)
        documents = train + val
    else:
        documents = read_corpus(specs, progress)
        train, val = split_train_val(documents, val_fraction)
    if isinstance(tokenizer, str):
        kind = tokenizer
        suffix = f"-{vocab_size}" if kind == "bpe" else ""
        cached = cache_dir() / "tokenizers" / f"{kind}{suffix}-{corpus_digest(train)[:24]}.json"
        if cached.is_file():
            tokenizer = Tokenizer.load(cached)
        else:
            if progress:
                progress(f"training a {kind} tokenizer on {len(train)} documents")
            tokenizer = Tokenizer.train(kind, (d.text for d in train), vocab_size)
            _atomic_write_text(cached, tokenizer.to_str())
    if progress:
        progress(f"tokenizing {len(documents)} documents (cached after the first run)")
    return Corpus(
        tokenizer,
        tokenize_split(train, tokenizer, "train"),
        tokenize_split(val, tokenizer, "val"),
        len(documents),
    )


def prepare_eval_data(
    specs: list[str] | None,
    tokenizer: Tokenizer,
    training: tuple[list[str], float, list[str] | None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TokenFile:
    """All of the given corpus; without specs, the validation split of the model's own training
    data (`training` = its data specs, val_fraction and val_data: those files, whole, where it
    had them), else of builtin:stdlib-docs."""
    if specs:
        return tokenize_split(read_corpus(specs, progress), tokenizer, "all")
    data, val_fraction, val_data = training or (["builtin:stdlib-docs"], 0.05, None)
    if val_data:
        return tokenize_split(read_corpus(val_data, progress, whole_files=True), tokenizer, "val")
    _, val = split_train_val(read_corpus(data, progress), val_fraction)
    return tokenize_split(val, tokenizer, "val")
