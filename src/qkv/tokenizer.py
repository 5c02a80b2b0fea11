"""Tokenizers: text -> token ids -> text, both kinds stored as a standard `tokenizer.json`.

- "bpe": byte-level BPE trained on the corpus with Hugging Face `tokenizers` (GPT-2's scheme):
  every string maps to bytes, so nothing is ever unknown.
- "char": one token per character seen in the corpus, and UTF-8 byte tokens (<0x00>..<0xFF>) as
  the fallback for characters it has not seen (the byte-fallback scheme of Llama's tokenizer).
Both are lossless: decode(encode(s)) == s for every Unicode string s. encode() reads a special
token written in the text (<|endoftext|>) as that token; encode_plain() reads it as the characters
it is spelled with, for text that must not make its own special tokens (chat messages).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from qkv.config import TOKENIZERS
from qkv.errors import QkvError
from qkv.text import check_unicode, model_file, read_model_json, read_model_text

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, PAD]
SPECIALS = (
    "tokenizer_config.json"  # a model tokenizer's eos / pad tokens, as Hugging Face names them
)


class Tokenizer:
    """A `tokenizers.Tokenizer` with qkv's specials: <|endoftext|> between documents, <|pad|>."""

    def __init__(
        self, backend: tokenizers.Tokenizer, end_of_text: str | None = None, pad: str | None = None
    ) -> None:
        """qkv's own tokenizers get <|endoftext|> and <|pad|> (kept where already present); a
        model's own tokenizer (Hugging Face) names its end-of-text token and its padding (default:
        the end-of-text token), gets nothing added, and wraps model inputs in the special tokens
        its template adds (BERT's [CLS] ... [SEP], Llama's <s>)."""
        self.backend = backend
        self.model_template = end_of_text is not None
        if end_of_text is None:
            backend.add_special_tokens(SPECIAL_TOKENS)  # keeps the ids of those already there
            end_of_text, pad = END_OF_TEXT, PAD
        backend.no_padding()  # batches are padded by the code that makes them
        backend.no_truncation()
        self.end_of_text, self.pad = end_of_text, pad or end_of_text
        # A model's own chat template (Jinja, from tokenizer_config.json), the special tokens
        # it names, and the ids that end a reply besides end-of-text (generation_config.json).
        self.chat_template: str | None = None
        self.template_tokens: dict[str, str] = {}
        self.extra_stop_ids: tuple[int, ...] = ()
        self._plain: tokenizers.Tokenizer | None = None  # see encode_plain
        self._vocab_size: int | None = None  # see vocab_size
        self._texts: list[str] | None = None  # see token_texts

    @classmethod
    def train(cls, kind: str, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
        """Train a `kind` ("bpe" or "char") tokenizer on `texts`; vocab_size applies to BPE."""
        if kind == "bpe":
            return cls.train_bpe(texts, vocab_size)
        if kind == "char":
            return cls.train_char(texts)
        raise QkvError(f"unknown tokenizer {kind!r}; choose one of {list(TOKENIZERS)}")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
        """Byte-level BPE: from the 256 bytes, merge the most frequent pair until vocab_size."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size <= minimum:
            raise QkvError(f"BPE vocab_size must be more than {minimum} (256 bytes + specials)")
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """Specials, then the 256 byte-fallback tokens, then each distinct character, sorted."""
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for byte in range(256):
            vocab[f"<0x{byte:02X}>"] = len(vocab)
        characters: set[str] = set()
        for text in texts:
            characters.update(text)
        for character in sorted(characters):
            vocab.setdefault(character, len(vocab))
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer.json (or the one inside a checkpoint directory) through the model
        directory reader (qkv.text.read_model_text); a model's own tokenizer has its
        end-of-text and padding tokens in tokenizer_config.json beside it."""
        path = Path(path)
        folder, name = (path, "tokenizer.json") if path.is_dir() else (path.parent, path.name)
        if model_file(folder, name) is None:
            raise QkvError(
                f"no tokenizer at {folder / name}; a checkpoint needs its tokenizer.json"
            )
        backend = cls.read_backend(folder, name)
        names = read_model_json(folder, SPECIALS, missing_ok=True)
        if not names:
            return cls(backend)
        eos, pad = names.get("eos_token"), names.get("pad_token")
        if not isinstance(eos, str) or not isinstance(pad, str | None):
            raise QkvError(
                f"{folder / SPECIALS} names no eos_token (and pad_token) as strings; put back "
                "the file qkv wrote"
            )
        return cls(backend, eos, pad)

    @staticmethod
    def read_backend(folder: Path, name: str = "tokenizer.json") -> tokenizers.Tokenizer:
        """The `tokenizers` tokenizer of FOLDER/NAME, read by qkv.text.read_model_text."""
        text = read_model_text(folder, name)
        try:
            return tokenizers.Tokenizer.from_str(text)
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise QkvError(f"{folder / name} is not a valid tokenizer.json ({reason})") from None

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Add tokens (ids after the vocabulary; those already there keep theirs) that encode()
        matches in text and encode_plain() does not."""
        self.backend.add_special_tokens(tokens)
        self._plain = None
        self._vocab_size = None
        self._texts = None

    def to_str(self) -> str:
        return self.backend.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json at `path` (and, for a model's own tokenizer, its special
        tokens in tokenizer_config.json beside it)."""
        path = Path(path)
        path.write_text(self.to_str(), encoding="utf-8")
        if self.model_template:
            names = {"eos_token": self.end_of_text, "pad_token": self.pad}
            path.with_name(SPECIALS).write_text(json.dumps(names, indent=2), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Ids 0 .. vocab_size - 1, added tokens included (kept: the backend counts them anew
        each time, milliseconds for a large vocabulary)."""
        if self._vocab_size is None:
            self._vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        return self._vocab_size

    @property
    def end_of_text_id(self) -> int:
        return self.backend.token_to_id(self.end_of_text)

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a continuation: end-of-text and any other eos id the model names."""
        return frozenset((self.end_of_text_id, *self.extra_stop_ids))

    @property
    def pad_id(self) -> int:
        return self.backend.token_to_id(self.pad)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, a special token spelled in it read as that token. Every encode
        method refuses text with a lone surrogate (qkv.text.check_unicode): one QkvError."""
        return self.backend.encode(check_unicode(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self.backend.encode_batch(_checked(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with every special token in it spelled out as ordinary text, so
        that no id of a special token comes from the text; decode(encode_plain(s)) == s."""
        return self._plain_backend().encode(check_unicode(text), add_special_tokens=False).ids

    def encode_plain_batch(self, texts: list[str]) -> list[list[int]]:
        """encode_plain of each text, in one call."""
        encodings = self._plain_backend().encode_batch(_checked(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def _plain_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend with encode_special_tokens set: the flag is the backend's own
        state, so setting it on the shared one would change encode() for other threads. Made
        on first use, again after add_special_tokens (two threads may both make one: same)."""
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def encode_inputs(self, texts: list[str]) -> list[list[int]]:
        """Token ids of whole model inputs: with the template's special tokens for a model's
        own tokenizer, plain encode_batch for qkv's."""
        encodings = self.backend.encode_batch(
            _checked(texts), add_special_tokens=self.model_template
        )
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_texts(self) -> list[str]:
        """texts[i] = decode([i]) for every id (kept: 50,000 decodes take a tenth of a second)."""
        if self._texts is None:
            self._texts = [self.decode([i]) for i in range(self.vocab_size)]
        return self._texts


def _checked(texts: list[str]) -> list[str]:
    """`texts`, each checked by qkv.text.check_unicode."""
    for text in texts:
        check_unicode(text)
    return texts
