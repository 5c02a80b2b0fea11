"""Generation: prompts in, continuations out, one token at a time (the notes' "Output").

prefill   run the prompt through the model once, filling every layer's KV cache; keep the logits
          of its last token only.
decode    feed just the newest token, at position t, attending to the cached keys/values of
          0..t-1: O(t) work per token instead of recomputing all t tokens.
batching  prompts of different lengths are left-padded; pad columns are masked out of attention
          and positions count real tokens only, so each row computes what it would alone.
window    a sequence that outgrows the context window (max_seq_len) keeps its newest half, which is
          re-encoded at positions 0.. (a sliding window that moves in half-window jumps; each row of
          a batch on its own). Decoding without the cache recomputes exactly those windows every
          step, so both give the same logits.
Token selection itself (greedy, temperature, top-k, top-p, repetition penalty) is in qkv.sampling.
A prompt is text (encoded as a model input: a special token written in it is that token) or
token ids, used as they are (chat builds its prompts as ids).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv.checkpoint import load_for_inference
from qkv.config import GENERATION
from qkv.data import pad_rows
from qkv.errors import QkvError
from qkv.memory import check_fits, generation_parts
from qkv.model import DecoderLM, EncoderDecoder
from qkv.sampling import SamplingConfig, finite_rows, select
from qkv.text import parse_json_lines, read_text, text_lines
from qkv.tokenizer import Tokenizer

Prompt = str | list[int]  # text, or token ids used as given

# Stop strings: the server takes 8 from a request, and a chat template adds its own. Real stop
# markers are a few characters; a stop string's length is also text held back from streaming.
MAX_STOPS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class GenerationConfig(SamplingConfig):
    """How to continue a prompt: how each token is chosen (SamplingConfig: temperature 0 is
    greedy), how many to add, where to stop, the seed, and whether to keep a KV cache."""

    max_new_tokens: int = GENERATION["max_new_tokens"]
    stop: tuple[str, ...] = ()
    seed: int = 0
    use_cache: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        stop = () if self.stop is None else self.stop
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop))
        for name in ("max_new_tokens", "seed"):
            if not isinstance(getattr(self, name), int):
                raise QkvError(f"{name.replace('_', '-')} must be a whole number")
        if self.max_new_tokens < 1:
            raise QkvError(f"max-new-tokens must be at least 1; got {self.max_new_tokens!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise QkvError("stop strings must be text")
        if not all(self.stop):
            raise QkvError(f"stop strings must not be empty; got {self.stop!r}")
        if len(self.stop) > MAX_STOPS:
            raise QkvError(f"give at most {MAX_STOPS} stop strings; got {len(self.stop)}")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise QkvError(
                f"a stop string may have at most {MAX_STOP_CHARS} characters; one has "
                f"{longest:,}: shorten it"
            )


@dataclass
class Completion:
    """One prompt's result: `text` is the continuation alone (without a stop string it hit)."""

    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    stop_reason: str  # "eos" (end-of-text token), "stop" (a stop string) or "length"
    truncated_tokens: int = 0  # prompt tokens cut from the left to fit the context window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def positions_of(attention_mask: Tensor) -> Tensor:
    """(batch, seq) 1/0 mask -> position of each real token among its row's real tokens."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def decode(
    model: DecoderLM,
    prompts: list[list[int]],
    config: GenerationConfig,
    pad_id: int,
    vocab: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (next token ids (batch,), the logits they were chosen from (batch, vocab_size))
    step after step, without end. Ids from `vocab` on (rows a model's embedding has past its
    tokenizer's last token, as padding) get logit -inf: they are never chosen.

    Prompts must be non-empty and fit the context window; the caller stops iterating when it
    has enough. Each row keeps its own window (rows slide when they, not the batch, outgrow it),
    so a row computes what it would alone.
    """
    window = model.config.max_seq_len
    keep = max(1, window // 2)
    if any(not 0 < len(p) <= window for p in prompts):
        raise ValueError(f"every prompt needs 1 to {window} (max_seq_len) token ids")
    device = model.head.matrix.device
    rows = [list(p) for p in prompts]
    starts = [0] * len(rows)  # row i's window is rows[i][starts[i]:]
    generators = [torch.Generator(device).manual_seed(config.seed) for _ in prompts]
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            seen[i, row] = True
    # Room for the prompts and the tokens asked for; a cache grows if iterated further.
    capacity = min(window, max(map(len, rows)) + config.max_new_tokens)
    caches = model.new_caches(len(rows), capacity) if config.use_cache else None

    def encode_windows() -> tuple[Tensor, Tensor | None, Tensor]:
        """Every row's window from scratch (resetting the caches): (last logits, attention mask
        or None without padding, next positions)."""
        if caches is not None:
            for cache in caches:
                cache.reset()
        windows = [r[s:] for r, s in zip(rows, starts, strict=True)]
        ids, mask = (t.to(device) for t in pad_rows(windows, pad_id, left=True))
        attention_mask = mask if bool((mask == 0).any()) else None
        hidden = model.hidden_states(ids, attention_mask, positions_of(mask), caches)
        return model.head(hidden[:, -1]), attention_mask, mask.sum(-1, keepdim=True)

    logits, mask, next_position = encode_windows()
    while True:
        if vocab is not None:
            logits[:, vocab:] = -math.inf
        token = select(logits, config, seen, generators)
        yield token, logits
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        for row, new in zip(rows, token.tolist(), strict=True):
            row.append(new)
        outgrown = [len(r) - s > window for r, s in zip(rows, starts, strict=True)]
        if any(outgrown) or caches is None:
            starts = [
                len(r) - keep if out else s
                for r, s, out in zip(rows, starts, outgrown, strict=True)
            ]
            logits, mask, next_position = encode_windows()
        else:
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            hidden = model.hidden_states(token[:, None], mask, next_position, caches)
            logits = model.head(hidden[:, -1])
            next_position = next_position + 1


@dataclass
class Continuation:
    """One prompt's continuation as it grows: its text (append-only, so what was streamed never
    changes), the part not shown yet, and why it ended ("eos", "stop", "length", or "error" when
    the model's logits were broken)."""

    prompt: str
    prompt_ids: list[int]
    truncated: int
    stop: tuple[str, ...]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    shown: int = 0
    read_from: int = 0  # token_ids[read_from:read_to] were decoded last; decoding restarts there
    read_to: int = 0
    stop_reason: str | None = None
    # Per stop string: the length of its longest start that ends the text (Knuth-Morris-Pratt).
    matched: list[int] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.matched = [0] * len(self.stop)

    def add(self, token: int, tokenizer: Tokenizer) -> None:
        if token in tokenizer.stop_ids:
            self.finish("eos", tokenizer)
            return
        self.token_ids.append(token)
        self._read(tokenizer, final=False)

    def finish(self, reason: str, tokenizer: Tokenizer) -> None:
        self._read(tokenizer, final=True)
        self.stop_reason = self.stop_reason or reason

    def _read(self, tokenizer: Tokenizer, final: bool) -> None:
        """Append the text of the tokens not yet read. A byte-level token can end inside a UTF-8
        character, which decodes as U+FFFD until its last byte arrives: such text waits for the
        next token (unless final), decoded together with the last tokens read for context."""
        known = tokenizer.decode(self.token_ids[self.read_from : self.read_to])
        text = tokenizer.decode(self.token_ids[self.read_from :])
        if len(text) > len(known) and (final or not text.endswith("\ufffd")):
            start = len(self.text)
            self.text += text[len(known) :]
            self.read_from, self.read_to = self.read_to, len(self.token_ids)
            hit = self._find_stop(start)
            if hit is not None:
                self.text = self.text[:hit]
                self.stop_reason = "stop"

    def _find_stop(self, start: int) -> int | None:
        """Where the earliest stop string in the text begins, none being in text[:start]. Each
        stop's matched length advances over text[start:] alone (KMP: on a mismatch it falls
        back to the longest start of the stop that still ends the text), so checking costs
        O(new characters) amortized, whatever the lengths of the text and the stops."""
        first = None
        for j, stop in enumerate(self.stop):
            fallback = _fallback(stop)
            k, i = self.matched[j], start
            while i < len(self.text):
                if k == 0:  # jump to the next character that can start this stop
                    i = self.text.find(stop[0], i)
                    if i < 0:
                        break
                char = self.text[i]
                while k and stop[k] != char:
                    k = fallback[k - 1]
                if stop[k] == char:
                    k += 1
                    if k == len(stop):
                        first = i + 1 - k if first is None else min(first, i + 1 - k)
                        break
                i += 1
            self.matched[j] = k
        return first

    def new_text(self) -> str:
        """Text not shown yet that can no longer change (all of it once the row has ended)."""
        end = len(self.text) - (0 if self.stop_reason else self._held_back())
        piece = self.text[self.shown : end]
        self.shown = max(self.shown, end)
        return piece

    def _held_back(self) -> int:
        """Characters at the end that may be the start of a stop string."""
        return max(self.matched, default=0)

    def completion(self) -> Completion:
        return Completion(
            self.prompt,
            self.text,
            self.token_ids,
            len(self.prompt_ids),
            self.stop_reason or "length",
            self.truncated,
        )


@functools.lru_cache(maxsize=64)
def _fallback(stop: str) -> tuple[int, ...]:
    """KMP's failure function: fallback[k - 1] is the length of the longest proper start of
    stop[:k] that also ends it, for k = 1 .. len(stop); O(len(stop))."""
    fallback = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fallback[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fallback[i] = k
    return tuple(fallback)


def broken_logits(token: int) -> str:
    """The error of a sequence whose logits, choosing its `token`-th new token, held NaN or inf."""
    return (
        f"the model produced NaN or infinite logits at generated token {token}: its weights or "
        "its arithmetic are broken (check the checkpoint; in float16 or bfloat16, try --dtype "
        "float32)"
    )


class Generator:
    """A decoder and its tokenizer, ready to continue text.

    generator = Generator.load("runs/quickstart")
    print(generator.generate("Return the", max_new_tokens=40).text)
    for piece in generator.stream("Return the"):
        print(piece, end="", flush=True)
    """

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer) -> None:
        if not isinstance(model, DecoderLM):
            raise QkvError(
                f"generation needs a decoder-only model, not {type(model).__name__} "
                f"(arch={model.config.arch!r})"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.summary = f"model: qkv decoder, {model.num_parameters():,} parameters"
        torch.set_flush_denormal(True)  # denormal activations slow fp32 CPU math

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32"
    ) -> Generator:
        """From a checkpoint, run or Hugging Face directory, in `dtype` (auto, float32,
        bfloat16, float16: checkpoint.load_for_inference); `.summary` says what runs."""
        model, tokenizer, summary = load_for_inference(path, torch.device(device), dtype)
        if not isinstance(model, DecoderLM):
            raise QkvError(
                f"{path} holds an {model.config.arch} model; generation needs a decoder "
                "(arch=decoder), such as one trained by `qkv train`"
            )
        generator = cls(model, tokenizer)
        generator.summary = summary
        return generator

    def check(self, prompts: list[Prompt]) -> None:
        """Refuse empty or non-UTF-8 prompts (or ids outside the vocabulary) and warn about
        those the context window cuts, numbering them 1..n: what generate() would do batch by
        batch, done once up front."""
        self._rows(prompts, GenerationConfig())

    def _rows(self, prompts: list[Prompt], config: GenerationConfig) -> list[Continuation]:
        window, vocab_size = self.model.config.max_seq_len, self.model.config.vocab_size
        texts = [p for p in prompts if isinstance(p, str)]
        for number, prompt in enumerate(prompts, 1):
            if isinstance(prompt, str):
                try:
                    prompt.encode("utf-8")
                except UnicodeEncodeError:
                    raise QkvError(f"prompt {number} is not valid UTF-8 text") from None
            elif not (
                isinstance(prompt, list)
                and all(isinstance(i, int) and 0 <= i < vocab_size for i in prompt)
            ):
                raise QkvError(
                    f"prompt {number} must be text or a list of token ids from 0 to "
                    f"{vocab_size - 1} (the model's vocabulary)"
                )
        encoded = iter(self.tokenizer.encode_inputs(texts))
        rows = []
        for number, prompt in enumerate(prompts, 1):
            ids = next(encoded) if isinstance(prompt, str) else list(prompt)
            if not prompt or not ids:
                raise QkvError(f"prompt {number} is empty: give some text to continue")
            cut = max(0, len(ids) - window)
            if cut:
                warnings.warn(
                    f"prompt {number} has {len(ids)} tokens but the context window is {window}: "
                    f"its first {cut} tokens are left out",
                    stacklevel=4,  # the caller of generate() / stream()
                )
            text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
            rows.append(Continuation(text, ids[cut:], cut, config.stop))
        return rows

    def _run(self, prompts: list[Prompt], config: GenerationConfig) -> Iterator[list[Continuation]]:
        """Decode the prompts as one batch; yield their rows after every step. NaN or inf logits
        (a broken model) raise a QkvError."""
        rows = self._rows(prompts, config)
        check_fits(
            generation_parts(self.model, len(rows), config.use_cache),
            f"generating for {len(rows)} prompts at once",
            "give fewer prompts at a time (--batch-size), or decode without the KV cache "
            "(--no-cache)",
            self.model.head.matrix.device,
        )
        ids = [r.prompt_ids for r in rows]
        tokens = decode(self.model, ids, config, self.tokenizer.pad_id, self.tokenizer.vocab_size)
        for _, (step, logits) in zip(range(config.max_new_tokens), tokens, strict=False):
            step = torch.where(finite_rows(logits), step, -1)  # fetched with the tokens
            for row, token in zip(rows, step.tolist(), strict=True):
                if row.stop_reason is None:
                    if token < 0:
                        raise QkvError(broken_logits(len(row.token_ids) + 1))
                    row.add(token, self.tokenizer)
            if all(row.stop_reason for row in rows):
                break
            yield rows
        for row in rows:
            if row.stop_reason is None:
                row.finish("length", self.tokenizer)
        yield rows

    def stream(
        self, prompt: Prompt, config: GenerationConfig | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece, as it is generated."""
        for rows in self._run([prompt], _config(config, options)):
            piece = rows[0].new_text()
            if piece:
                yield piece

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        config: GenerationConfig | None = None,
        on_text: Callable[[int, str], None] | None = None,
        **options: Any,
    ) -> Completion | list[Completion]:
        """The Completion of a prompt (text, or a list of token ids), or a list of them for a
        list of prompts (decoded as one batch).

        Options are GenerationConfig's fields (max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, stop, seed, use_cache); `on_text(prompt index, new text)` is called
        as text is produced.
        """
        one = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        )
        batch = [prompts] if one else list(prompts)
        if not batch:
            return []
        rows: list[Continuation] = []
        for rows in self._run(batch, _config(config, options)):
            for i, row in enumerate(rows):
                piece = row.new_text()
                if piece and on_text is not None:
                    on_text(i, piece)
        completions = [row.completion() for row in rows]
        return completions[0] if one else completions


def _config(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    return dataclasses.replace(config or GenerationConfig(), **options)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file ('-' is stdin): one per line, or JSON Lines of {"prompt": ...} when
    the file ends in .jsonl or its first line is a JSON object. Blank lines are skipped."""
    name, text = read_text(path, "prompts file")
    lines = text_lines(text)
    if not lines:
        raise QkvError(f"{name} holds no prompts")
    if not (str(path).endswith(".jsonl") or _is_json_object(lines[0][1])):
        return [line for _, line in lines]
    prompts = []
    for number, record in parse_json_lines(name, lines):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise QkvError(f'{name}, line {number}: expected an object with a "prompt" string')
        prompts.append(record["prompt"])
    return prompts


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


@torch.no_grad()
def greedy_decode(
    model: EncoderDecoder, src: Tensor, mask: Tensor, end_id: int, max_len: int
) -> list[list[int]]:
    """Each source's target, one argmax token at a time, until E (or max_len tokens)."""
    memory = model.encode(src, mask)
    out = torch.full((len(src), 1), end_id, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits = model.head(model.decode_hidden_states(out, memory, mask)[:, -1])
        token = logits.argmax(-1).masked_fill(done, end_id)
        out = torch.cat([out, token[:, None]], dim=1)
        done |= token == end_id
        if done.all():
            break
    return [until_end(row[1:].tolist(), end_id) for row in out]


def until_end(ids: list[int], end_id: int) -> list[int]:
    """ids up to (not including) the first end_id."""
    return ids[: ids.index(end_id)] if end_id in ids else ids
