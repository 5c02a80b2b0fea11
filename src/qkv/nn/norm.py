"""Normalization, written out: LayerNorm and RMSNorm over the last (d_model) dimension.

The notes write "(x - mu)/sigma * (gamma/beta)"; the standard form, which qkv computes, scales by
gamma and then shifts by beta, with eps inside the square root for stability.
Half-precision inputs (float16, bfloat16) are normalized in float32 and cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class LayerNorm(nn.Module):
    """LayerNorm(x) = gamma * (x - mean) / sqrt(var + eps) + beta, var biased, over d_model."""

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        h = _upcast(x)
        mean = h.mean(dim=-1, keepdim=True)
        var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
        y = (h - mean) * torch.rsqrt(var + self.eps) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm(x) = gamma * x / sqrt(mean(x^2) + eps): LayerNorm without centring or beta."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        h = _upcast(x)
        y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight
        return y.to(x.dtype)


def build_norm(kind: str, d_model: int, eps: float, bias: bool = True) -> LayerNorm | RMSNorm:
    """`kind` is "layernorm" or "rmsnorm" (ModelConfig.norm)."""
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps)
    return LayerNorm(d_model, eps, bias)
