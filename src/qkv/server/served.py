"""What a server serves: a decoder with its engine, an encoder, or the notes' example."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from qkv.chat_template import chat_prompt, has_chat_template
from qkv.checkpoint import load_for_inference
from qkv.device import resolve_device
from qkv.explain import MAX_WORDS, NOTES_SENTENCE
from qkv.model import DecoderLM, Encoder, EncoderDecoder
from qkv.server.engine import Engine, Metrics
from qkv.server.schemas import MAX_EXPLAINS, ApiError
from qkv.tokenizer import Tokenizer


@dataclass
class Served:
    """What the app serves: a decoder (with its engine) or an encoder, its tokenizer, the name
    clients use; or, with no model, the notes' example (POST /v1/explain and the page only)."""

    model: DecoderLM | Encoder | EncoderDecoder | None
    tokenizer: Tokenizer | None
    name: str
    engine: Engine | None  # None for an encoder
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    encoding: asyncio.Lock = field(default_factory=asyncio.Lock)  # one embedding batch at a time
    explaining: int = 0  # explain requests waiting for or holding the model (event loop only)
    summary: str = ""  # what runs: family, parameters, dtype, memory
    allowed_hosts: frozenset[str] | None = None  # Host header names answered (None: any)
    special_in_content: bool = False  # a model's own template: content's special tokens count

    @cached_property
    def max_prompt_bytes(self) -> int:
        """The UTF-8 bytes past which a text cannot fit the context: every token spells at
        most the longest token's bytes, so n bytes are at least n / longest tokens."""
        longest = max(len(t.encode("utf-8", "surrogatepass")) for t in self.tokenizer.token_texts())
        return self.window * max(longest, 1)

    def check_bytes(self, text: str, what: str, param: str) -> None:
        """A 400 where `text` has more UTF-8 bytes than the context can hold (max_prompt_bytes)."""
        size = len(text.encode())
        if size > self.max_prompt_bytes:
            raise ApiError(400, f"{what} has {size:,} bytes, more than a context of "
                           f"{self.window} tokens can hold: shorten it", param)  # fmt: skip

    async def encode(self, texts: list[str], param: str = "prompt") -> list[list[int]]:
        """Token ids of `texts`, tokenized on a worker thread (the event loop keeps serving);
        a text too long for the context in bytes alone is refused before tokenizing."""
        for number, text in enumerate(texts):
            self.check_bytes(text, f"{param} {number}", param)
        return await asyncio.to_thread(self.tokenizer.encode_inputs, texts)

    async def chat(self, turns: list[tuple[str, str]]) -> list[int]:
        """The prompt of a conversation in the model's chat template, rendered and tokenized
        on a worker thread (the template's own time and size bounds apply)."""
        self.check_bytes("".join(text for _, text in turns), "the messages", "messages")
        return await asyncio.to_thread(
            chat_prompt, turns, self.tokenizer, special_in_content=self.special_in_content
        )

    @property
    def window(self) -> int:
        return MAX_WORDS if self.model is None else self.model.config.max_seq_len

    def loaded(self) -> tuple[DecoderLM | Encoder | EncoderDecoder, Tokenizer]:
        """The model and its tokenizer, or a 400 when serving the notes' example."""
        if self.model is None or self.tokenizer is None:
            message = ("this server explains the notes' untrained example and has no trained "
                       "model or tokenizer: start it with --model DIR")  # fmt: skip
            raise ApiError(400, message, "model")
        return self.model, self.tokenizer

    async def exclusive(self, work: Callable[[], Any]) -> Any:
        """Run `work` (which may use the model) off the event loop, alone with the model: on the
        engine's thread between steps, under the encoder's lock, or (the notes' example, a
        model of its own per call) on a worker thread. At most MAX_EXPLAINS wait at a time;
        running out of memory is a 503, the server keeps serving."""
        if self.explaining >= MAX_EXPLAINS:
            raise ApiError(503, f"the server is busy ({MAX_EXPLAINS} explain requests are "
                           "waiting); retry shortly")  # fmt: skip
        self.explaining += 1
        try:
            if self.engine is not None:
                return await asyncio.wrap_future(self.engine.call(work))
            async with self.encoding:
                return await asyncio.to_thread(work)
        except (MemoryError, torch.OutOfMemoryError):
            raise ApiError(503, "not enough memory to explain this input; give a shorter text "
                           "or fewer layers") from None  # fmt: skip
        finally:
            self.explaining -= 1

    def settings(self) -> dict[str, Any]:
        """What the explorer page needs to know of this server: its model's name, whether it
        is the notes' example, whether it chats (a decoder with role tokens) and whether its
        next token can be sampled and appended (a decoder, or the notes' example)."""
        decoder = isinstance(self.model, DecoderLM)
        notes = self.model is None
        chat = decoder and self.tokenizer is not None and has_chat_template(self.tokenizer)
        return {"api": True, "model": self.name, "notes": notes, "text": NOTES_SENTENCE,
                "chat": chat, "sample": decoder or notes}  # fmt: skip

    def check_name(self, name: str | None) -> None:
        if name not in (None, self.name):
            raise ApiError(404, f"the model {name!r} does not exist; this server has "
                           f"{self.name!r}", "model", "invalid_request_error")  # fmt: skip

    def check_ids(self, ids: list[int], param: str) -> None:
        size = self.tokenizer.vocab_size
        if any(not 0 <= t < size for t in ids):
            raise ApiError(400, f"{param}: token ids must be 0 to {size - 1}", param)

    def decoding(self) -> Engine:
        """The engine, or a 400 for an encoder."""
        model, _ = self.loaded()
        if isinstance(model, EncoderDecoder):
            raise ApiError(400, f"{self.name} is an encoder-decoder: it serves /v1/explain and "
                           "the page at / only", "model")  # fmt: skip
        if self.engine is None:
            raise ApiError(400, f"{self.name} is an encoder: it serves /v1/embeddings, not "
                           "completions", "model")  # fmt: skip
        return self.engine


def load_served(
    model_dir: str | Path,
    device: str = "auto",
    name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    dtype: str = "float32",
) -> Served:
    """A decoder (from a checkpoint, run, adapter or Hugging Face directory) or an encoder,
    ready to serve, in `dtype` (checkpoint.load_for_inference; `.summary` says what runs)."""
    model, tokenizer, summary = load_for_inference(model_dir, resolve_device(device), dtype)
    torch.set_flush_denormal(True)
    engine = (
        Engine(model, tokenizer, max_batch, max_queue) if isinstance(model, DecoderLM) else None
    )
    served = Served(model.eval(), tokenizer, name or Path(model_dir).name, engine, api_key,
                    summary=summary)  # fmt: skip
    if engine is not None:
        engine.metrics = served.metrics
    return served


def notes_served() -> Served:
    """The notes' example for the explorer: each text's words through a fresh seeded 4-dimensional
    decoder (qkv.explain.explain_text); no completions, chat or embeddings."""
    return Served(None, None, "notes-example", None)
