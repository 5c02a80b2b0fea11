"""Normalization, written out: LayerNorm and RMSNorm over the last (d_model) dimension.

The notes write "(x - mu)/sigma * (gamma/beta)"; the standard form, which qkv computes, scales by
gamma and then shifts by beta, with eps inside the square root for stability.
Each module computes its formula as written (`fused=False`) or through PyTorch's fused kernel
(`fused=True`, one op instead of eight, the default for training); tests hold the two equal.
Half-precision inputs (float16, bfloat16) are normalized in float32 and cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.config import ModelConfig


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class LayerNorm(nn.Module):
    """LayerNorm(x) = gamma * (x - mean) / sqrt(var + eps) + beta, var biased, over d_model."""

    def __init__(
        self, d_model: int, eps: float = 1e-5, bias: bool = True, fused: bool = False
    ) -> None:
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and x.dtype == self.weight.dtype:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        h = _upcast(x)
        mean = h.mean(dim=-1, keepdim=True)
        var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
        y = (h - mean) * torch.rsqrt(var + self.eps) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm(x) = gamma * x / sqrt(mean(x^2) + eps): LayerNorm without centring or beta."""

    def __init__(self, d_model: int, eps: float = 1e-5, fused: bool = False) -> None:
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and x.dtype == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = _upcast(x)
        y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight
        return y.to(x.dtype)


def build_norm(config: ModelConfig) -> LayerNorm | RMSNorm:
    """The norm ModelConfig.norm names, fused when config.kernels is "fused"."""
    fused = config.kernels == "fused"
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps, fused)
    return LayerNorm(config.d_model, config.norm_eps, config.bias, fused)
