"""Transformer blocks: sublayers (attention, feed-forward) wrapped in residual connections + norms.

Post-norm (the original paper, the notes' order): x = Norm(x + Sublayer(x)).
Pre-norm (GPT-2, Llama; trains deeper stacks stably): x = x + Sublayer(Norm(x)).
Pre- and post-norm ("sandwich", Gemma 2 and 3): x = x + Norm'(Sublayer(Norm(x))).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from qkv.nn.attention import MultiHeadAttention
from qkv.nn.feedforward import build_feed_forward
from qkv.nn.kv_cache import KVCache
from qkv.nn.norm import LayerNorm, RMSNorm, build_norm
from qkv.nn.recording import Recordable


@dataclass(frozen=True)
class BlockConfig:
    """What one block is made of: its widths, which norm and feed-forward, and where the norm sits.

    `n_kv_heads` None means n_heads (no grouped-query attention); `kernels` "fused" runs attention
    and norms through PyTorch's fused kernels, "explicit" through the formulas as written.
    """

    d_model: int
    n_heads: int
    d_ff: int
    n_kv_heads: int | None = None
    feed_forward: str = "gelu"  # relu | relu2 | gelu | gelu_tanh | swiglu | geglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_first: bool = True
    bias: bool = True
    dropout: float = 0.0
    kernels: str = "fused"
    qk_norm: bool = False
    head_dim: int | None = None  # d_k; None: d_model / n_heads
    qkv_bias: bool | None = None  # biases on W_Q, W_K, W_V; None: `bias`
    attention_scale: float | None = None  # the scores' factor; None: 1 / sqrt(d_k)
    attention_softcap: float | None = None  # scores = c tanh(scores / c)
    norm_unit_offset: bool = False  # RMSNorm gains are 1 + gamma (Gemma)
    post_norms: bool = False  # each sublayer's output normed before the residual add


def _attention(config: BlockConfig, n_kv_heads: int | None) -> MultiHeadAttention:
    return MultiHeadAttention(
        config.d_model, config.n_heads, n_kv_heads, config.bias, config.dropout, config.kernels,
        config.norm_eps if config.qk_norm else None, config.head_dim, config.qkv_bias,
        config.attention_scale, config.attention_softcap, config.norm_unit_offset,
    )  # fmt: skip


def _norm(config: BlockConfig) -> LayerNorm | RMSNorm:
    fused = config.kernels == "fused"
    return build_norm(
        config.norm, config.d_model, config.norm_eps, config.bias, fused, config.norm_unit_offset
    )


def _post_norm(config: BlockConfig) -> nn.Module:
    return _norm(config) if config.post_norms else nn.Identity()


class _ResidualBlock(Recordable, nn.Module):
    FORMULAS: ClassVar[dict[str, str]] = {
        "residual": "x + Sublayer(h): the residual connection; h = Norm(x) in a pre-norm block, "
        "h = x in a post-norm one, which normalises the sum next{sandwich}"
    }

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.residual_dropout = nn.Dropout(config.dropout)
        self.feed_forward = build_feed_forward(
            config.feed_forward, config.d_model, config.d_ff, config.bias, config.dropout
        )
        self.feed_forward_norm = _norm(config)
        self.feed_forward_post_norm = _post_norm(config)
        self.sandwich = " (then Norm'(Sublayer(h)) in its place)" if config.post_norms else ""

    @property
    def attention_norms(self) -> tuple[nn.Module, nn.Module]:
        return self.attention_norm, self.attention_post_norm

    @property
    def feed_forward_norms(self) -> tuple[nn.Module, nn.Module]:
        return self.feed_forward_norm, self.feed_forward_post_norm

    def residual(
        self,
        x: Tensor,
        norms: tuple[nn.Module, nn.Module],
        sublayer: Callable[[Tensor], Tensor],
        name: str,
    ) -> Tensor:
        """Pre-norm: x + Post(Sublayer(Norm(x))), Post the identity unless post_norms; post-norm:
        Norm(x + Sublayer(x)).

        `name` (attention, cross_attention, feed_forward) labels the recorded sum."""
        norm, post = norms
        x = x + self.residual_dropout(post(sublayer(norm(x) if self.norm_first else x)))
        if self.recorder is not None:
            self.recorder("residual", x, name)
        return x if self.norm_first else norm(x)


class EncoderBlock(_ResidualBlock):
    """Self-attention over the whole sequence, then the feed-forward network."""

    def __init__(self, config: BlockConfig) -> None:
        super().__init__(config)
        self.self_attention = _attention(config, config.n_kv_heads)
        self.attention_norm = _norm(config)
        self.attention_post_norm = _post_norm(config)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (batch, seq, d_model) -> (batch, seq, d_model)."""

        def attend(h: Tensor) -> Tensor:
            return self.self_attention(h, mask=mask, rotary=rotary)[0]

        x = self.residual(x, self.attention_norms, attend, "attention")
        return self.residual(x, self.feed_forward_norms, self.feed_forward, "feed_forward")


class DecoderBlock(_ResidualBlock):
    """Masked self-attention, optional cross-attention to the encoder's memory, feed-forward."""

    def __init__(self, config: BlockConfig, cross_attention: bool = False) -> None:
        super().__init__(config)
        self.self_attention = _attention(config, config.n_kv_heads)
        self.attention_norm = _norm(config)
        self.attention_post_norm = _post_norm(config)
        self.cross_attention = _attention(config, None) if cross_attention else None
        self.cross_attention_norm = _norm(config) if cross_attention else None
        self.cross_attention_post_norm = _post_norm(config) if cross_attention else None

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

        x = self.residual(x, self.attention_norms, attend, "attention")
        if self.cross_attention is not None:
            if memory is None:
                raise ValueError("this decoder block has cross-attention: pass the encoder memory")

            def attend_memory(h: Tensor) -> Tensor:
                return self.cross_attention(h, memory, mask=memory_mask)[0]

            norms = (self.cross_attention_norm, self.cross_attention_post_norm)
            x = self.residual(x, norms, attend_memory, "cross_attention")
        return self.residual(x, self.feed_forward_norms, self.feed_forward, "feed_forward")
