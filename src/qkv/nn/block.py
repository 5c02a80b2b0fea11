"""Transformer blocks: sublayers (attention, feed-forward) wrapped in residual connections + norms.

Post-norm (the original paper, the notes' order): x = Norm(x + Sublayer(x)).
Pre-norm (GPT-2, Llama; trains deeper stacks stably): x = x + Sublayer(Norm(x)).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from qkv.config import ModelConfig
from qkv.nn.attention import MultiHeadAttention
from qkv.nn.feedforward import build_feed_forward
from qkv.nn.kv_cache import KVCache
from qkv.nn.norm import build_norm


def _attention(config: ModelConfig, n_kv_heads: int | None) -> MultiHeadAttention:
    return MultiHeadAttention(
        config.d_model, config.n_heads, n_kv_heads, config.bias, config.dropout, config.kernels
    )


class _ResidualBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.residual_dropout = nn.Dropout(config.dropout)
        self.feed_forward = build_feed_forward(
            config.feed_forward, config.d_model, config.d_ff, config.bias, config.dropout
        )
        self.feed_forward_norm = self.make_norm(config)

    @staticmethod
    def make_norm(config: ModelConfig) -> nn.Module:
        return build_norm(config)

    def residual(self, x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """Pre-norm: x + Sublayer(Norm(x)); post-norm: Norm(x + Sublayer(x))."""
        if self.norm_first:
            return x + self.residual_dropout(sublayer(norm(x)))
        return norm(x + self.residual_dropout(sublayer(x)))


class EncoderBlock(_ResidualBlock):
    """Self-attention over the whole sequence, then the feed-forward network."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.self_attention = _attention(config, config.n_kv_heads)
        self.attention_norm = self.make_norm(config)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (batch, seq, d_model) -> (batch, seq, d_model)."""

        def attend(h: Tensor) -> Tensor:
            return self.self_attention(h, mask=mask, rotary=rotary)[0]

        x = self.residual(x, self.attention_norm, attend)
        return self.residual(x, self.feed_forward_norm, self.feed_forward)


class DecoderBlock(_ResidualBlock):
    """Masked self-attention, optional cross-attention to the encoder's memory, feed-forward."""

    def __init__(self, config: ModelConfig, cross_attention: bool = False) -> None:
        super().__init__(config)
        self.self_attention = _attention(config, config.n_kv_heads)
        self.attention_norm = self.make_norm(config)
        self.cross_attention = _attention(config, None) if cross_attention else None
        self.cross_attention_norm = self.make_norm(config) if cross_attention else None

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        is_causal: bool = True,
        memory_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x (batch, seq, d_model), memory (batch, src_seq, d_model) -> (batch, seq, d_model)."""

        def attend(h: Tensor) -> Tensor:
            out = self.self_attention(h, mask=mask, is_causal=is_causal, rotary=rotary, cache=cache)
            return out[0]

        x = self.residual(x, self.attention_norm, attend)
        if self.cross_attention is not None:
            if memory is None:
                raise ValueError("this decoder block has cross-attention: pass the encoder memory")

            def attend_memory(h: Tensor) -> Tensor:
                return self.cross_attention(h, memory, mask=memory_mask)[0]

            x = self.residual(x, self.cross_attention_norm, attend_memory)
        return self.residual(x, self.feed_forward_norm, self.feed_forward)
