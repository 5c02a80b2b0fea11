"""What an explanation costs, known before it is computed: the numbers a walkthrough's JSON holds
and the bytes its recorded forward pass keeps, from the shapes alone.

The model's modules record on the meta device (shapes, no data, no time), so the count is the
model's own, whatever its family: every recorded stage (tokens x columns, or heads x tokens x
tokens), the logit lens (one row of the vocabulary per token and layer), logits and
probabilities. The server refuses a request past MAX_NUMBERS or MAX_BYTES before its forward
pass, naming what shrinks it.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.model import build_model
from qkv.nn.recording import recording

MAX_NUMBERS = 8_000_000  # numbers in one explanation's JSON (about 80 MB)
MAX_BYTES = 1 << 30  # bytes the recorded stages and the logit lens hold while it is made
LAYER = re.compile(r"(?:encoder_|decoder_)?blocks\.(\d+)\b")


def check_selection(config: ModelConfig, layers: list[int] | None, heads: list[int] | None) -> None:
    """Layers and heads the model has (None: all)."""
    for name, chosen, count in (
        ("layer", layers, config.n_layers),
        ("head", heads, config.n_heads),
    ):
        for value in chosen or []:
            if not 0 <= value < count:
                plural = "s" if count != 1 else ""
                raise QkvError(
                    f"{name} {value} does not exist: the model has {count} {name}{plural} "
                    f"(0..{count - 1})"
                )


@lru_cache(maxsize=8)
def _record_sizes(config: ModelConfig, n_target: int) -> list[tuple[str, int, tuple[int, ...]]]:
    """Each record's module, heads (its shape[1] where it has 4 dimensions, else 0) and element
    count as a polynomial a + b n + c n^2 in the tokens n (attention is n x n at most), fitted
    exactly from forward passes of 1, 2 and 3 tokens on the meta device."""
    counts = []
    with torch.device("meta"), torch.no_grad():
        model = build_model(config.replace(init_std=None))
        for n in (1, 2, 3):
            ids = torch.zeros(1, n, dtype=torch.long)
            with recording(model) as records:
                if config.arch == "encoder-decoder":
                    model(ids, torch.zeros(1, max(n_target, 1), dtype=torch.long))
                else:
                    model(ids)
            counts.append([r.value.numel() for r in records])
    sizes = []
    for record, (n1, n2, n3) in zip(records, zip(*counts, strict=True), strict=True):
        c = (n3 - 2 * n2 + n1) // 2
        b = n2 - n1 - 3 * c
        heads = record.value.shape[1] if record.value.dim() == 4 else 0
        sizes.append((record.module, heads, (n1 - b - c, b, c)))
    return sizes


def explain_cost(
    config: ModelConfig,
    n_tokens: int,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    top: int | None = None,
    n_target: int = 0,
) -> tuple[int, int]:
    """(numbers in the JSON, bytes held while making it) for `n_tokens` through a model of
    `config` (an encoder-decoder: `n_tokens` of source, `n_target` of target), keeping `layers`
    and `heads` (None: all) and each vocabulary-wide row's `top` entries (None: all)."""
    numbers, held = n_tokens + n_target, 0  # the token_ids stages: one id per token
    vocab = config.vocab_size
    for module, total, (a, b, c) in _record_sizes(config, n_target):
        count = a + b * n_tokens + c * n_tokens**2
        held += count * 4
        if module == "head":  # logits, (1, rows, vocab); probabilities and the lens follow
            rows = count // vocab
            held += (config.n_layers + 1) * rows * vocab * 4
            numbers += (config.n_layers + 2) * rows * (2 * top if top else vocab)
            continue
        found = LAYER.match(module)
        if layers is not None and found and int(found[1]) not in layers:
            continue
        if heads is not None and total:  # (1, heads, tokens, ...): the heads kept
            count = count * len({h * total // config.n_heads for h in heads}) // total
        numbers += count
    return numbers, held


def check_explain_size(
    config: ModelConfig,
    n_tokens: int,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    top: int | None = None,
    n_target: int = 0,
) -> None:
    """A QkvError, before any work, where the explanation would hold more than MAX_NUMBERS
    numbers or MAX_BYTES bytes, naming what shrinks it."""
    check_selection(config, layers, heads)
    numbers, held = explain_cost(config, n_tokens, layers, heads, top, n_target)
    if held > MAX_BYTES:
        raise QkvError(
            f"explaining {n_tokens} tokens would hold {held / 2**30:.1f} GiB of recorded stages "
            f"(the limit is {MAX_BYTES / 2**30:.0f} GiB): give a shorter text"
        )
    if numbers > MAX_NUMBERS:
        raise QkvError(
            f"explaining {n_tokens} tokens would return {numbers:,} numbers (the limit is "
            f"{MAX_NUMBERS:,}): ask for fewer `layers` (one, as the page does), fewer `heads`, "
            "a smaller `top`, or give a shorter text"
        )
