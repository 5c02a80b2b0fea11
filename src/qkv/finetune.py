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
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.data import stdlib_docs
from qkv.errors import QkvError
from qkv.model import DecoderLM
from qkv.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}


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
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise QkvError(f"fine-tuning data {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise QkvError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
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


def add_chat_tokens(tokenizer: Tokenizer) -> int:
    """Give the tokenizer the role tokens (ids after its vocabulary); its new vocabulary size."""
    tokenizer.backend.add_special_tokens(list(ROLE_TOKENS.values()))
    return tokenizer.vocab_size


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


def grow_vocabulary(model: DecoderLM, vocab_size: int) -> None:
    """Add rows to the token embedding (and an untied head) for new tokens, each the mean of the
    existing rows, so new tokens start as an average token; the config follows."""
    old = model.config.vocab_size
    if vocab_size <= old:
        return
    embedding = model.embedder.token_embedding
    with torch.no_grad():
        grown = torch.cat([embedding.weight, embedding.weight.mean(0).expand(vocab_size - old, -1)])
        embedding.weight = torch.nn.Parameter(grown)
        if model.head.weight is not None:
            head = model.head.weight
            rows = head.mean(0).expand(vocab_size - old, -1)
            model.head.weight = torch.nn.Parameter(torch.cat([head, rows]))
    model.config = model.config.replace(vocab_size=vocab_size)


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
