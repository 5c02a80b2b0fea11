"""Positional information: sinusoidal and learned absolute encodings (added to the embeddings)
and rotary embeddings (RoPE, applied to queries and keys inside attention).

The notes' section 2 writes the sinusoid's base as 1000; their worked example, the paper and qkv
use 10000. With the "none" choice a model gets no positional signal at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from qkv.nn.recording import Recordable


def sinusoidal_table(
    max_seq_len: int, d_model: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """PE(pos, 2i) = sin(pos / base^(2i/d_model)), PE(pos, 2i+1) = cos(same); (seq, d_model).

    Computed in float64, returned in `dtype`.
    """
    position = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angle = position / base ** (two_i / d_model)
    table = torch.zeros(max_seq_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.to(dtype)


class SinusoidalPositionalEncoding(Recordable, nn.Module):
    """Fixed PE table, looked up by position: (batch, seq) positions -> (batch, seq, d_model)."""

    FORMULAS: ClassVar[dict[str, str]] = {
        "positional_encoding": "PE(pos, 2i) = sin(pos / {base:g}^(2i/d_model)), "
        "PE(pos, 2i+1) = cos(same angle)"
    }

    def __init__(self, max_seq_len: int, d_model: int, base: float = 10000.0) -> None:
        super().__init__()
        self.base, self.shape = base, (max_seq_len, d_model)
        self.register_buffer("table", sinusoidal_table(*self.shape, base), persistent=False)

    def reset_buffers(self) -> None:
        """Compute the table anew (in a model built on the meta device, then loaded)."""
        self.table = sinusoidal_table(*self.shape, self.base)

    def forward(self, positions: Tensor) -> Tensor:
        pe = self.table[positions]
        if self.recorder is not None:
            self.recorder("positional_encoding", pe)
        return pe


class LearnedPositionalEmbedding(Recordable, nn.Module):
    """P[pos], a learned table (GPT-2, BERT): (batch, seq) positions -> (batch, seq, d_model)."""

    FORMULAS: ClassVar[dict[str, str]] = {
        "positional_encoding": "PE(pos) = P[pos]: row pos of a learned table"
    }

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_seq_len, d_model))

    def forward(self, positions: Tensor) -> Tensor:
        pe = nn.functional.embedding(positions, self.weight)
        if self.recorder is not None:
            self.recorder("positional_encoding", pe)
        return pe


class RotaryEmbedding(Recordable, nn.Module):
    """RoPE angles theta_{pos,i} = pos * base^(-2i/d_head), returned as (cos, sin) per position.

    Dimension i is paired with i + d_head/2 (the "rotate half" layout Llama checkpoints use).
    Angles are computed in float32 the way Hugging Face's Llama does, so long contexts match it.
    """

    FORMULAS: ClassVar[dict[str, str]] = {
        "positional_encoding": "RoPE angle theta(pos, i) = pos * {base:g}^(-2i/d_k), in radians: "
        "attention turns each pair (i, i + d_k/2) of q and k by it"
    }

    def __init__(
        self, head_dim: int, max_seq_len: int, base: float = 10000.0,
        scaling: Callable[[Tensor], Tensor] | None = None,
    ) -> None:  # fmt: skip
        """`scaling` maps the frequencies base^(-2i/d_head) to those used (RoPE scaling)."""
        super().__init__()
        self.base, self.head_dim, self.max_seq_len, self.scaling = (
            base,
            head_dim,
            max_seq_len,
            scaling,
        )
        for name in ("inv_freq", "cos", "sin"):
            self.register_buffer(name, None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the frequencies and the cos / sin tables (anew, in a model built on the meta
        device, then loaded)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / self.base**exponents
        self.inv_freq = self.scaling(inv_freq) if self.scaling else inv_freq
        angle = self.angles(torch.arange(self.max_seq_len))
        angle = torch.cat([angle, angle], dim=-1)
        self.cos, self.sin = angle.cos(), angle.sin()

    def angles(self, positions: Tensor) -> Tensor:
        """theta = pos * base^(-2i/d_head): (..., seq) positions -> (..., seq, d_head / 2)."""
        return positions.float()[..., None] * self.inv_freq

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(batch, seq) positions -> cos, sin (batch, 1, seq, d_head), broadcast over heads.

        Records the angles (batch, seq, d_head / 2) whose cos and sin these are."""
        if self.recorder is not None:
            self.recorder("positional_encoding", self.angles(positions))
        return self.cos[positions].unsqueeze(-3), self.sin[positions].unsqueeze(-3)


def llama3_scaling(
    factor: float, low_freq_factor: float, high_freq_factor: float, original_context: int
) -> Callable[[Tensor], Tensor]:
    """Llama 3.1's RoPE scaling of each frequency f, wavelength w = 2 pi / f, L = original_context:
    f / factor where w > L / low_freq_factor (long waves: stretched), f where w < L /
    high_freq_factor (short waves: kept), between them (1 - s) f / factor + s f with
    s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)."""

    def scale(inv_freq: Tensor) -> Tensor:
        wavelength = 2 * math.pi / inv_freq
        smooth = (original_context / wavelength - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelength > original_context / low_freq_factor, inv_freq / factor,
                             blended)  # fmt: skip
        return torch.where(wavelength < original_context / high_freq_factor, inv_freq, scaled)

    return scale


def linear_scaling(factor: float) -> Callable[[Tensor], Tensor]:
    """Position interpolation: theta(pos) = (pos / factor) * f, i.e. every frequency f / factor."""
    return lambda inv_freq: inv_freq / factor


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) by theta: x cos + rotate_half(x) sin; x (b, h, s, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
