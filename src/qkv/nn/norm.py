"""Normalization, written out: LayerNorm and RMSNorm over the last (d_model) dimension.

The notes write "(x - mu)/sigma * (gamma/beta)"; the standard form, which qkv computes, scales by
gamma and then shifts by beta, with eps inside the square root for stability.
Each module computes its formula as written (`fused=False`) or through PyTorch's fused kernel
(`fused=True`, one op instead of eight, the default for training); tests hold the two equal.
Half-precision inputs (float16, bfloat16) are normalized in float32 and cast back.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.nn.recording import Recordable


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class LayerNorm(Recordable, nn.Module):
    """LayerNorm(x) = gamma * (x - mean) / sqrt(var + eps) + beta, var biased, over d_model."""

    FORMULAS: ClassVar[dict[str, str]] = {
        "layer_norm": "LayerNorm(x) = gamma * (x - mean) / sqrt(var + eps) + beta, over each "
        "token's d_model values, eps = {eps:g}"
    }

    def __init__(
        self, d_model: int, eps: float = 1e-5, bias: bool = True, fused: bool = False
    ) -> None:
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and x.dtype == self.weight.dtype:
            y = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        else:
            h = _upcast(x)
            mean = h.mean(dim=-1, keepdim=True)
            var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
            y = (h - mean) * torch.rsqrt(var + self.eps) * self.weight
            if self.bias is not None:
                y = y + self.bias
            y = y.to(x.dtype)
        if self.recorder is not None:
            self.recorder("layer_norm", y)
        return y


class RMSNorm(Recordable, nn.Module):
    """RMSNorm(x) = gamma * x / sqrt(mean(x^2) + eps): LayerNorm without centring or beta.

    With `unit_offset` the gain is (1 + gamma), gamma starting at 0 (Gemma's norms)."""

    FORMULAS: ClassVar[dict[str, str]] = {
        "layer_norm": "RMSNorm(x) = {gain} * x / sqrt(mean(x^2) + eps), over each token's "
        "d_model values, eps = {eps:g}"
    }

    def __init__(
        self, d_model: int, eps: float = 1e-5, fused: bool = False, unit_offset: bool = False
    ) -> None:
        super().__init__()
        self.eps, self.fused, self.unit_offset = eps, fused, unit_offset
        self.gain = "(1 + gamma)" if unit_offset else "gamma"
        self.weight = nn.Parameter(torch.zeros(d_model) if unit_offset else torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        gain = self.weight.float() + 1.0 if self.unit_offset else self.weight
        if self.fused and x.dtype == gain.dtype:
            y = F.rms_norm(x, self.weight.shape, gain, self.eps)
        else:
            h = _upcast(x)
            y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps) * gain
            y = y.to(x.dtype)
        if self.recorder is not None:
            self.recorder("layer_norm", y)
        return y


class HeadNorm(nn.Module):
    """QK-norm: gamma * x / sqrt(mean(x^2) + eps) over each head's d_k values (batch, heads,
    seq, d_k), gamma shared by the heads (as Qwen3, OLMo 2 and modded-nanogpt normalise Q and K;
    Gemma 3 with the gain 1 + gamma, `unit_offset`).
    Not recorded itself: the attention records what it gives."""

    def __init__(self, head_dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(head_dim) if unit_offset else torch.ones(head_dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.unit_offset:  # in float32, as Gemma 3: (x / rms(x)) (1 + gamma), then cast
            y = F.rms_norm(x.float(), self.weight.shape, self.weight.float() + 1.0, self.eps)
            return y.to(x.dtype)
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


def build_norm(
    kind: str,
    d_model: int,
    eps: float,
    bias: bool = True,
    fused: bool = False,
    unit_offset: bool = False,
) -> LayerNorm | RMSNorm:
    """`kind` is layernorm | rmsnorm (RMSNorm has no beta, so `bias` applies to LayerNorm, and
    only RMSNorm takes Gemma's (1 + gamma) gain, `unit_offset`)."""
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps, fused, unit_offset)
    return LayerNorm(d_model, eps, bias, fused)
