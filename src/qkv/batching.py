"""Continuous batching: many requests decode together, one token per running row per step; a
request joins the running batch at the next step and leaves it as soon as it ends.

The rows share one KV cache per layer, left-padded to a common length L: a row holding n real
tokens has L - n masked positions in front, and its positions are its own (0 .. n-1), so it
computes what it would alone. The requests joining at a step are prefilled together (left-padded
in the same way); then the shorter side (the running rows or the joining ones) is shifted right
to the other's length and the two are stacked. Rows that end are dropped, and padding every
row has is trimmed; a row that fills the context window ends with finish reason "length". A row
whose logits hold NaN or inf (a broken model) ends with an `error`; the others go on.

    batcher = Batcher(model, tokenizer, max_batch=8)
    sequence = batcher.add(prompt_ids, GenerationConfig(max_new_tokens=64, seed=1))
    while batcher.busy:
        for sequence in batcher.step():   # the sequences that changed this step
            print(sequence.error or sequence.continuation.new_text(), end="")
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qkv.data import pad_rows
from qkv.generate import Continuation, GenerationConfig, broken_logits, positions_of
from qkv.model import DecoderLM
from qkv.nn.kv_cache import KVCache
from qkv.sampling import finite_rows, select
from qkv.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """log p(token) under the model (softmax of its logits, before any sampling rule), and the
    `top` likeliest tokens with theirs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(eq=False)
class Sequence:
    """One request in the batcher: its prompt, sampling, generator and text so far; `error` is
    set (and the continuation's stop_reason is "error") when it could not go on."""

    prompt_ids: list[int]
    config: GenerationConfig
    continuation: Continuation
    generator: torch.Generator
    seen: Tensor | None  # (1, vocab) tokens the repetition penalty applies to
    length: int = 0  # real tokens held in the cache
    pending: int | None = None  # the token chosen last, not yet fed to the model
    cancelled: bool = False
    top_logprobs: int | None = None  # record log p of each chosen token and this many others
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.cancelled or self.continuation.stop_reason is not None


@dataclass
class Batcher:
    """Decodes up to `max_batch` sequences at a time; more wait in order and join as rows
    free up. Not thread-safe: one thread calls add, cancel and step (the server's loop)."""

    model: DecoderLM
    tokenizer: Tokenizer
    max_batch: int = 8
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model.eval()
        self.device = self.model.head.matrix.device
        self.window = self.model.config.max_seq_len
        self.caches: list[KVCache] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.joining: list[Sequence] = []  # taken from `waiting`, being prefilled

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        prompt: str = "",
        top_logprobs: int | None = None,
    ) -> Sequence:
        """Queue a request (1 to max_seq_len token ids); it joins at the next step. With
        `top_logprobs` (0 or more) each chosen token's TokenLogprob is recorded."""
        if not 0 < len(prompt_ids) <= self.window:
            raise ValueError(f"a prompt needs 1 to {self.window} (max_seq_len) token ids")
        seen = None
        if config.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool)
            seen[0, prompt_ids] = True
        sequence = Sequence(
            list(prompt_ids),
            config,
            Continuation(prompt, list(prompt_ids), 0, config.stop),
            torch.Generator(self.device).manual_seed(config.seed),
            None if seen is None else seen.to(self.device),
            top_logprobs=top_logprobs,
        )
        self.waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Drop a sequence (its client went away): it leaves the batch at the next step."""
        sequence.cancelled = True

    def end_all(self) -> list[Sequence]:
        """End every running and waiting sequence now, with finish reason "length" (a server
        shutting down); returns them."""
        ended = [s for s in [*self.running, *self.waiting] if not s.finished]
        for sequence in ended:
            sequence.continuation.finish("length", self.tokenizer)
        self.waiting.clear()
        self._drop(list(self.running))
        return ended

    def abort_all(self, message: str) -> list[Sequence]:
        """After a step raised (leaving the batch in no known state): end every sequence not
        ended yet with `error` = message, and empty the batch, ready for new sequences. Returns
        every sequence it held, ended ones too (the failed step may have ended some)."""
        held = [*self.running, *self.joining, *self.waiting]
        for sequence in held:
            if not sequence.finished:
                self._fail(sequence, message)
        self.waiting.clear()
        self.running, self.joining, self.caches = [], [], []
        self.mask = self.mask.new_zeros(0, 0)
        return held

    def _fail(self, sequence: Sequence, message: str) -> None:
        sequence.error = message
        sequence.continuation.finish("error", self.tokenizer)

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One decoding step: every running row gets its next token, then waiting requests
        join (prefilled, with their first token). Returns the sequences that changed."""
        self._drop([s for s in self.running if s.finished or s.length >= self.window])
        changed = list(self.running)
        if self.running:
            ids = torch.tensor([[s.pending] for s in self.running], device=self.device)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            positions = torch.tensor([[s.length] for s in self.running], device=self.device)
            hidden = self.model.hidden_states(ids, self.mask, positions, self.caches)
            for sequence in self.running:
                sequence.length += 1
            self._choose(self.running, self.model.head(hidden[:, -1]))
        while self.waiting and len(self.running) + len(self.joining) < self.max_batch:
            sequence = self.waiting.popleft()
            if not sequence.cancelled:
                self.joining.append(sequence)
        if self.joining:
            self._join(self.joining)
            changed += self.joining
            self.joining = []
        for sequence in changed:
            if sequence.length >= self.window and not sequence.finished:
                sequence.continuation.finish("length", self.tokenizer)
        return changed

    def _choose(self, sequences: list[Sequence], logits: Tensor) -> None:
        """Select each sequence's next token from its row of logits (rows, vocab) by its own
        sampling: rows that sample alike are selected together, each with its own generator. A
        row of NaN or inf logits ends its sequence with an error."""
        logits[:, self.tokenizer.vocab_size :] = -math.inf  # padding rows past the tokenizer
        alike: dict[tuple[float, int | None, float, float], list[int]] = {}
        for row, sequence in enumerate(sequences):
            c = sequence.config
            alike.setdefault((c.temperature, c.top_k, c.top_p, c.repetition_penalty), []).append(
                row
            )
        tokens = torch.empty(len(sequences), dtype=torch.long, device=self.device)
        for rows in alike.values():
            group = [sequences[row] for row in rows]
            seen = None if group[0].seen is None else torch.cat([s.seen for s in group])
            index = torch.tensor(rows, device=self.device)
            tokens[index] = select(
                logits[index], group[0].config, seen, [s.generator for s in group]
            )
        tokens = torch.where(finite_rows(logits), tokens, -1)  # fetched with the tokens
        for row, (sequence, token) in enumerate(zip(sequences, tokens.tolist(), strict=True)):
            if token < 0:
                self._fail(sequence, broken_logits(len(sequence.continuation.token_ids) + 1))
                continue
            if sequence.top_logprobs is not None:
                self._record(sequence, logits[row], token)
            if sequence.seen is not None:
                sequence.seen[0, token] = True
            sequence.pending = token
            sequence.continuation.add(token, self.tokenizer)
            if len(sequence.continuation.token_ids) >= sequence.config.max_new_tokens:
                sequence.continuation.finish("length", self.tokenizer)

    @staticmethod
    def _record(sequence: Sequence, logits: Tensor, token: int) -> None:
        """log p of the chosen token and of the top_logprobs likeliest, from logits (vocab,)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, min(sequence.top_logprobs or 0, logprobs.numel()))
        alternatives = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        sequence.logprobs.append(TokenLogprob(token, float(logprobs[token]), tuple(alternatives)))

    def _join(self, group: list[Sequence]) -> None:
        """Prefill the group together (left-padded, each row at its own positions), then stack
        it with the running rows. A row whose first token was its last leaves at the next step."""
        caches = self.model.new_caches(len(group), self.window)
        prompts = [s.prompt_ids for s in group]
        ids, mask = (t.to(self.device) for t in pad_rows(prompts, self.tokenizer.pad_id, left=True))
        padded = mask if bool((mask == 0).any()) else None
        hidden = self.model.hidden_states(ids, padded, positions_of(mask), caches)
        for sequence in group:
            sequence.length = len(sequence.prompt_ids)
        self._choose(group, self.model.head(hidden[:, -1]))
        if not self.running:
            self.caches, self.mask, self.running = caches, mask, list(group)
            return
        extra = mask.shape[1] - self.mask.shape[1]
        for mine, theirs in zip(self.caches, caches, strict=True):
            (mine if extra > 0 else theirs).shift(abs(extra))
            mine.stack(theirs)
        if extra > 0:
            self.mask = _pad_left(self.mask, extra)
        else:
            mask = _pad_left(mask, -extra)
        self.mask = torch.cat([self.mask, mask])
        self.running += group

    def _drop(self, leaving: list[Sequence]) -> None:
        """Remove rows from the batch, then the left padding every remaining row has."""
        if not leaving:
            return
        keep = [i for i, s in enumerate(self.running) if s not in leaving]
        self.running = [self.running[i] for i in keep]
        if not self.running:
            self.caches, self.mask = [], self.mask[:0, :0]
            return
        rows = torch.tensor(keep, device=self.device)
        self.mask = self.mask[rows]
        padding = int(self.mask.argmax(dim=1).min())  # the first real position of the longest
        self.mask = self.mask[:, padding:]
        for cache in self.caches:
            cache.keep(rows)
            cache.shift(-padding)


def _pad_left(mask: Tensor, n: int) -> Tensor:
    """n masked positions in front of every row of a (rows, length) 1/0 mask."""
    return torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)
