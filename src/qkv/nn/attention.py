"""Attention: softmax(Q K^T / sqrt(d_k)) V, the masks it uses, and multi-head attention.

Shapes: queries (batch, n_heads, q_len, d_k); keys and values (batch, n_kv_heads, k_len, d_k),
where n_kv_heads divides n_heads (grouped-query attention; 1 is multi-query attention).
Masks are either boolean (True = may attend) or float (added to the scores), and broadcast to
(batch, n_heads, q_len, k_len). Two implementations compute the same thing: `explicit_attention`
spells the formula out and can return the attention weights, `fused_attention` calls PyTorch's
fused kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.nn.kv_cache import KVCache
from qkv.nn.linear import Linear
from qkv.nn.position import apply_rotary


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Bool (q_len, k_len), True = may attend: query i sees keys j <= i + (k_len - q_len).

    The queries are the last q_len of k_len positions (bottom-right aligned), as when decoding
    with a cache.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def padding_mask(attention_mask: Tensor) -> Tensor:
    """(batch, k_len) with 1 for real tokens, 0 for padding -> bool (batch, 1, 1, k_len)."""
    return attention_mask.bool()[:, None, None, :]


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask -> float mask: 0 where allowed, the dtype's lowest value elsewhere.

    A finite fill keeps rows with no allowed key (left padding under a causal mask) free of NaN.
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _with_causal(mask: Tensor | None, q_len: int, k_len: int, device: torch.device) -> Tensor:
    causal = causal_mask(q_len, k_len, device)
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, torch.finfo(mask.dtype).min)


def _repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    """(b, n_kv_heads, s, d) -> (b, n_heads, s, d): each key/value head serves a query group."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """A = softmax(Q K^T / sqrt(d_k) + mask), out = dropout(A) V; returns (out, A)."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        mask = _with_causal(mask, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """The same softmax(Q K^T / sqrt(d_k) + mask) V through F.scaled_dot_product_attention."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    if is_causal and q_len == 1:
        is_causal = False  # the newest token's query may see every key: nothing to mask
    if mask is not None and mask.dtype == torch.bool:
        # As in explicit_attention: a row with no allowed key averages V instead of giving 0.
        mask = additive_mask(mask, q.dtype)
    batch, n_heads, _, d_k = q.shape
    groups = n_heads // k.shape[1]
    if q_len == 1 and groups > 1 and (mask is None or mask.dim() < 3 or mask.shape[-3] == 1):
        # Decoding with grouped-query attention: a group's queries become rows against their
        # shared key/value head, instead of copying K and V once per query head.
        grouped = q.reshape(batch, k.shape[1], groups, d_k)
        out = F.scaled_dot_product_attention(grouped, k, v, mask, dropout_p=dropout_p)
        return out.reshape(batch, n_heads, 1, d_k)
    k, v = _repeat_kv(k, n_heads), _repeat_kv(v, n_heads)
    if is_causal and (mask is not None or q_len != k_len):
        # SDPA's own causal flag aligns the mask top-left; decoding with a cache needs bottom-right.
        mask, is_causal = _with_causal(mask, q_len, k_len, q.device), False
    return F.scaled_dot_product_attention(q, k, v, mask, dropout_p=dropout_p, is_causal=is_causal)


class MultiHeadAttention(nn.Module):
    """head_h = Attention(X W_Q^h, S W_K^h, S W_V^h); MHA = concat(head_1..head_H) W_O.

    S = X for self-attention, S = the encoder's output (memory) for cross-attention.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        implementation: str = "fused",
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"d_model={d_model} must divide into n_heads={n_heads}, "
                f"and n_heads into n_kv_heads={n_kv_heads}"
            )
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.implementation = implementation
        self.recorded: list[Tensor] | None = None  # a list: each call appends its weights
        self.q_proj = Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(n_heads * self.head_dim, d_model, bias=bias)

    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        """(batch, seq, n_heads * d_k) -> (batch, n_heads, seq, d_k)."""
        return x.unflatten(-1, (n_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x (batch, q_len, d_model) -> (out (batch, q_len, d_model), weights if need_weights).

        `rotary` is RotaryEmbedding's (cos, sin) for x's positions; `cache` receives this call's
        keys and values and returns all of them, for incremental decoding. While `recorded` is a
        list, every call appends its attention weights (batch, n_heads, q_len, k_len) to it.
        """
        source = x if memory is None else memory
        q = self.split_heads(self.q_proj(x), self.n_heads)
        k = self.split_heads(self.k_proj(source), self.n_kv_heads)
        v = self.split_heads(self.v_proj(source), self.n_kv_heads)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights or self.implementation == "explicit" or self.recorded is not None:
            out, weights = explicit_attention(q, k, v, mask, is_causal, dropout_p)
            if self.recorded is not None:
                self.recorded.append(weights.detach())
        else:
            out = fused_attention(q, k, v, mask, is_causal, dropout_p)
        return self.o_proj(out.transpose(1, 2).flatten(-2)), weights if need_weights else None
