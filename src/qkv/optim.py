"""The optimizer's parts: AdamW's parameter groups (which weights decay) and the learning-rate
schedule (linear warmup, then cosine decay to a floor)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from qkv.config import TrainConfig
from qkv.nn.embedding import TokenEmbedding
from qkv.nn.position import LearnedPositionalEmbedding


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps (at most a tenth of `steps`), then cosine decay to
    lr * min_lr_ratio at `steps`."""
    warmup = min(cfg.warmup_steps, cfg.steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lookup_tables(model: nn.Module) -> list[nn.Parameter]:
    """The embedding tables: token embeddings and learned positions (lookups, not matmuls)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, (TokenEmbedding, LearnedPositionalEmbedding))
        for p in m.parameters(recurse=False)
    ]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; no decay on norms, biases and embedding tables."""
    no_decay_ids = {id(p) for p in lookup_tables(model)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or id(param) in no_decay_ids else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
