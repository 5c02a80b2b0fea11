"""Token embedding: the notes' "convert words to numbers", a lookup table of learned vectors."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from qkv.nn.recording import Recordable


class TokenEmbedding(Recordable, nn.Module):
    """x_i = E[id_i] (· sqrt(d_model) if `scale`): (batch, seq) ids -> (batch, seq, d_model)."""

    FORMULAS: ClassVar[dict[str, str]] = {
        "embeddings": "x_i = E[id_i]: row id_i of the embedding table E (times sqrt(d_model) "
        "where the model scales it)"
    }

    def __init__(self, vocab_size: int, d_model: int, scale: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model))
        self.multiplier = math.sqrt(d_model) if scale else 1.0

    def forward(self, token_ids: Tensor) -> Tensor:
        x = nn.functional.embedding(token_ids, self.weight)
        x = x * self.multiplier if self.multiplier != 1.0 else x
        if self.recorder is not None:
            self.recorder("embeddings", x)
        return x
