"""Fine-tuning data: prompt/response pairs and chats as token ids, with the loss on responses only.

The chat template wraps each turn in special tokens added to the tokenizer:
    <|system|>{text}<|user|>{text}<|assistant|>{text}<|endoftext|> ...
loss = sum_t mask_t * -log p(x_{t+1} | x_<=t) / sum_t mask_t, where mask_t = 1 exactly when
x_{t+1} belongs to an assistant's reply or the <|endoftext|> that closes it: the model learns to
answer, not to predict the prompts it is given.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.chat import ROLE_TOKENS, ROLES, add_chat_tokens, grow_vocabulary
from qkv.data import read_text_file, stdlib_docs
from qkv.errors import QkvError
from qkv.model import DecoderLM
from qkv.nn.lora import DEFAULT_TARGETS, add_lora, merge_lora
from qkv.tokenizer import Tokenizer
from qkv.train import EvalResult, TrainConfig, Trainer, next_token_loss

IGNORE = -100  # a target the loss skips (cross_entropy's ignore_index)


@dataclass(frozen=True)
class Example:
    """One conversation: (role, text) turns; a prompt/response pair is a user and an assistant."""

    turns: tuple[tuple[str, str], ...]


def parse_example(record: object) -> Example:
    """{"prompt", "response"} or {"messages": [{"role", "content"}, ...]} -> Example."""
    if isinstance(record, dict) and {"prompt", "response"} <= record.keys():
        prompt, response = record["prompt"], record["response"]
        if not (isinstance(prompt, str) and isinstance(response, str)):
            raise ValueError('"prompt" and "response" must be strings')
        return Example((("user", prompt), ("assistant", response)))
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        turns = []
        for message in record["messages"]:
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(
                    'each message needs a "role" (system, user or assistant) and a "content" string'
                )
            turns.append((role, message["content"]))
        if not any(role == "assistant" for role, _ in turns):
            raise ValueError("the messages have no assistant reply to learn from")
        return Example(tuple(turns))
    raise ValueError('expected {"prompt": ..., "response": ...} or {"messages": [...]}')


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a JSON Lines file; a malformed line is an error naming the file and line."""
    path = Path(path)
    lines = read_text_file(path).removeprefix("\ufeff").splitlines()
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            examples.append(parse_example(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as err:
            message = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            raise QkvError(f"{path}, line {number}: {message}") from None
    if not examples:
        raise QkvError(f"{path} holds no examples")
    return examples


def stdlib_qa(
    val_fraction: float = 0.05, progress: Callable[[str], None] | None = None
) -> tuple[list[Example], list[Example]]:
    """builtin:stdlib-qa: "What does json.dumps do?" answered by the first paragraph of its
    docstring, for the standard library's documented modules, classes and functions (from
    builtin:stdlib-docs). Split by top-level package: the validation split holds every question
    about the val_fraction of packages whose names hash lowest, so none of them is trained on."""
    pairs = []
    for document in stdlib_docs(progress):
        answer = " ".join(re.split(r"\n\s*\n", document.text.strip())[0].split())
        if len(answer) >= 20:
            pairs.append((document.source, answer))
    packages = sorted({source.split(".")[0] for source, _ in pairs})
    ranked = sorted(packages, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    held_out = set(ranked[: max(1, round(len(ranked) * val_fraction))])
    train: list[Example] = []
    val: list[Example] = []
    for source, answer in pairs:
        example = Example((("user", f"What does {source} do?"), ("assistant", answer)))
        (val if source.split(".")[0] in held_out else train).append(example)
    return train, val


def encode_example(example: Example, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and, per position t, whether token t is a target
    of the loss (part of an assistant reply or its closing <|endoftext|>)."""
    ids: list[int] = []
    target: list[int] = []
    for role, text in example.turns:
        role_id = tokenizer.backend.token_to_id(ROLE_TOKENS[role])
        if role_id is None:
            raise QkvError("the tokenizer has no chat tokens; call add_chat_tokens first")
        body = tokenizer.encode(text)
        if role == "assistant":
            body = [*body, tokenizer.end_of_text_id]
        ids += [role_id, *body]
        target += [0] + [int(role == "assistant")] * len(body)
    return ids, target


def response_loss(logits: Tensor, ids: Tensor, target: Tensor) -> Tensor:
    """Mean -log p over the positions whose next token is a target: logits (batch, seq, V) for
    ids (batch, seq); target (batch, seq) 1 where token t counts (its prediction at t - 1)."""
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        ids[:, 1:].reshape(-1),
        reduction="none",
    )
    weights = target[:, 1:].reshape(-1).float()
    return (losses * weights).sum() / weights.sum().clamp(min=1)


@dataclass
class EncodedExamples:
    """Examples as (token ids, target flags) that fit the context, the bytes of their targets'
    text (for bits per byte), and how many longer ones were left out."""

    rows: list[tuple[list[int], list[int]]]
    target_bytes: int
    skipped: int


def prepare_examples(
    examples: list[Example], tokenizer: Tokenizer, context: int
) -> EncodedExamples:
    """Encode with the chat template; an example longer than context + 1 tokens is skipped."""
    rows, target_bytes, skipped = [], 0, 0
    for example in examples:
        ids, target = encode_example(example, tokenizer)
        if len(ids) > context + 1:
            skipped += 1
            continue
        rows.append((ids, target))
        targets = [i for i, t in zip(ids, target, strict=True) if t]
        target_bytes += len(tokenizer.decode(targets).encode("utf-8"))
    return EncodedExamples(rows, target_bytes, skipped)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs (batch, longest - 1), right-padded (causal attention never looks right, so pads
    need no mask), and targets: the next token where it is a target, else IGNORE."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, target) in enumerate(rows):
        ids_t, target_t = torch.tensor(ids), torch.tensor(target, dtype=torch.bool)
        x[i, : len(ids) - 1] = ids_t[:-1]
        y[i, : len(ids) - 1] = torch.where(target_t[1:], ids_t[1:], IGNORE)
    return x, y


class ExampleBatches:
    """Random batches of examples (drawn with `generator`, so a resumed run draws the same)."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int) -> None:  # fmt: skip
        if not rows:
            raise QkvError("no fine-tuning example fits the context; raise --context")
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        picks = torch.randint(0, len(self.rows), (self.batch_size,), generator=self.generator)
        return collate([self.rows[i] for i in picks.tolist()], self.pad_id)


@torch.no_grad()
def evaluate_responses(
    model: DecoderLM, data: EncodedExamples, pad_id: int, batch_size: int = 16
) -> EvalResult:
    """Mean -log p over every response token of `data`, in order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(data.rows), batch_size):
        x, y = collate(data.rows[first : first + batch_size], pad_id)
        total += next_token_loss(model(x.to(device)), y.to(device), reduction="sum").item()
        count += int((y != IGNORE).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    bits_per_byte = total / (math.log(2) * max(data.target_bytes, 1))
    return EvalResult(loss, math.exp(min(loss, 80.0)), bits_per_byte, count)


@dataclass
class FinetuneTrainer(Trainer):
    """The Trainer on prompt/response examples: batches of whole examples, loss and evaluation
    on the response tokens only (train_data / val_data are unused)."""

    kind: ClassVar[str] = "finetune"
    train_examples: EncodedExamples = field(default_factory=lambda: EncodedExamples([], 0, 0))
    val_examples: EncodedExamples = field(default_factory=lambda: EncodedExamples([], 0, 0))

    def make_batches(self) -> ExampleBatches:  # type: ignore[override]
        pad_id = self.tokenizer.pad_id
        return ExampleBatches(self.train_examples.rows, self.cfg.batch_size, pad_id, self.cfg.seed)

    def evaluate(self) -> EvalResult:
        return evaluate_responses(self.model, self.val_examples, self.tokenizer.pad_id)


def load_examples(
    spec: str, val_fraction: float = 0.05, progress: Callable[[str], None] | None = None
) -> tuple[list[Example], list[Example]]:
    """builtin:stdlib-qa, or a JSONL file split by example: validation = the val_fraction of
    examples whose text hashes lowest (at least one), the same on every run."""
    if spec == "builtin:stdlib-qa":
        return stdlib_qa(val_fraction, progress)
    if spec.startswith("builtin:"):
        raise QkvError(f"unknown builtin data {spec!r}; available: builtin:stdlib-qa")
    examples = read_examples(spec)
    if len(examples) < 2:
        raise QkvError(f"{spec} holds one example; a validation split needs at least two")
    digests = [hashlib.sha256(repr(e.turns).encode()).hexdigest() + str(i)
               for i, e in enumerate(examples)]  # fmt: skip
    held_out = set(sorted(range(len(examples)), key=digests.__getitem__)[
        : max(1, round(len(examples) * val_fraction))
    ])  # fmt: skip
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


@dataclass(frozen=True)
class LoRASettings:
    """What `qkv finetune --lora-rank` adapts: rank r, alpha (scale alpha / r), dropout, and the
    linear layers by name (q_proj, k_proj, v_proj, o_proj, w1, w2, gate, up, down)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS


def prepare_finetune(
    model_dir: str | Path | None,
    spec: str,
    cfg: TrainConfig,
    out: Path,
    progress: Callable[[str], None] | None = None,
    lora: LoRASettings | None = None,
    resume: Path | None = None,
) -> tuple[FinetuneTrainer, list[Example]]:
    """A trainer that fine-tunes the decoder in `model_dir` on `spec` (the chat tokens added to
    its tokenizer and embedding, examples longer than the context skipped), fully or through a
    LoRA adapter, or one that continues the fine-tuning run checkpointed at `resume`; and the
    held-out examples."""
    from qkv.checkpoint import (
        ADAPTER_CONFIG,
        LATEST,
        WEIGHTS,
        load_adapter_model,
        load_model,
        read_adapter_config,
        resolve,
        weights_digest,
    )

    adapter = None
    if resume is not None:
        folder = resolve(resume)
        if (folder / ADAPTER_CONFIG).is_file():
            adapter = read_adapter_config(folder)
            model, tokenizer = load_adapter_model(folder)
        else:
            model, tokenizer = load_model(folder)
    else:
        if (out / LATEST).exists():
            raise QkvError(
                f"{out} already holds a run; continue it with --resume {out}, or choose "
                "another --out"
            )
        base = resolve(model_dir)
        if lora is not None and not (base / WEIGHTS).is_file():
            raise QkvError(f"{base} is itself a LoRA adapter: merge it first (qkv merge)")
        model, tokenizer = load_model(base, "cpu")
        if lora is None and merge_lora(model):  # an adapter: fine-tune its merged weights
            model.requires_grad_(True)
        if lora is not None:
            adapter = {
                "base": str(base.resolve()),
                "base_sha256": weights_digest(base),
                **asdict(lora),
            }
    if not isinstance(model, DecoderLM):
        raise QkvError(
            f"{model_dir} holds an {model.config.arch} model; fine-tuning needs a decoder"
        )
    add_chat_tokens(tokenizer)
    grow_vocabulary(model, tokenizer)
    if lora is not None and resume is None:
        add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
    cfg.context = min(cfg.context, model.config.max_seq_len)
    train, val = load_examples(spec, cfg.val_fraction, progress)
    train_data = prepare_examples(train, tokenizer, cfg.context)
    val_data = prepare_examples(val, tokenizer, cfg.context)
    if not val_data.rows:
        raise QkvError("no validation example fits the context; raise --context or add data")
    torch.manual_seed(cfg.seed)
    trainer = FinetuneTrainer(
        model,
        tokenizer,
        None,
        None,
        cfg,
        out,
        adapter=adapter,
        train_examples=train_data,
        val_examples=val_data,
    )
    if resume is not None:
        trainer.resume(folder)
    out.mkdir(parents=True, exist_ok=True)
    return trainer, val
