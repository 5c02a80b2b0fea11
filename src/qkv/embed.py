"""Sentence embeddings from an encoder, as sentence-transformers computes them:

    e = normalize( sum_t m_t h_t / sum_t m_t ),   normalize(v) = v / ||v||_2

h_t are the encoder's final hidden states, m_t is 1 for real tokens (the tokenizer's [CLS] and
[SEP] included) and 0 for padding. Similar texts get a cosine similarity e_a . e_b near 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.checkpoint import load_for_inference
from qkv.data import pad_rows
from qkv.device import resolve_device
from qkv.errors import QkvError
from qkv.model import Encoder
from qkv.tokenizer import Tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(batch, seq, d) states, (batch, seq) 1/0 mask -> (batch, d) mean over real tokens."""
    weights = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def embed(
    model: Encoder,
    tokenizer: Tokenizer,
    texts: list[str],
    max_tokens: int | None = None,
    batch_size: int = 32,
) -> Tensor:
    """(len(texts), d_model) unit vectors; inputs longer than max_tokens (default: the model's
    context) keep their first max_tokens - 1 tokens and the last one (BERT's [SEP])."""
    limit = min(max_tokens or model.config.max_seq_len, model.config.max_seq_len)
    rows = tokenizer.encode_inputs(texts)
    rows = [ids if len(ids) <= limit else [*ids[: limit - 1], ids[-1]] for ids in rows]
    return embed_ids(model, rows, tokenizer.pad_id, batch_size)


@torch.no_grad()
def embed_ids(model: Encoder, rows: list[list[int]], pad_id: int, batch_size: int = 32) -> Tensor:
    """(len(rows), d_model) unit vectors of token id rows (each 1 to max_seq_len ids)."""
    if not isinstance(model, Encoder):
        raise QkvError(
            f"sentence embeddings need an encoder model (such as BERT), not {model.config.arch}"
        )
    device = next(model.parameters()).device
    vectors = []
    for first in range(0, len(rows), batch_size):
        ids, mask = (t.to(device) for t in pad_rows(rows[first : first + batch_size], pad_id))
        hidden = model.hidden_states(ids, mask).float()
        vectors.append(F.normalize(mean_pool(hidden, mask), p=2, dim=-1).cpu())
    return torch.cat(vectors) if vectors else torch.empty(0, model.config.d_model)


def embed_texts(
    path: str | Path,
    texts: list[str],
    max_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Tensor:
    """`qkv embed`: the unit vectors (float32) of `texts` (none may be empty) from the encoder
    at `path`, run in `dtype` (load_for_inference, whose line `progress` gets)."""
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise QkvError(f"text {number} is empty")
    model, tokenizer, summary = load_for_inference(path, resolve_device(device), dtype)
    if progress and isinstance(model, Encoder):  # anything else: embed names the problem
        progress(summary)
    return embed(model, tokenizer, texts, max_tokens)
