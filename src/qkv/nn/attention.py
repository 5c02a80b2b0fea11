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
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.nn.kv_cache import KVCache
from qkv.nn.linear import Linear
from qkv.nn.norm import HeadNorm
from qkv.nn.position import apply_rotary
from qkv.nn.recording import Recordable


def causal_mask(
    q_len: int, k_len: int, device: torch.device | None = None, window: int | None = None
) -> Tensor:
    """Bool (q_len, k_len), True = may attend: query i sees keys j <= i + (k_len - q_len), and
    with a sliding `window` w only the last w of them: j > i + (k_len - q_len) - w.

    The queries are the last q_len of k_len positions (bottom-right aligned), as when decoding
    with a cache.
    """
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    return allowed if window is None else allowed.triu(k_len - q_len - window + 1)


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
    record: Callable[[str, Tensor], None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """A = softmax(Q K^T / sqrt(d_k) + mask), out = dropout(A) V; returns (out, A).

    `scale` replaces 1 / sqrt(d_k); with a `softcap` c the scores become c tanh(scores / c)
    before the mask (Gemma 2). `record`, when given, receives these "scores" (batch, n_heads,
    q_len, k_len), before the mask.
    """
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if record is not None:
        record("scores", scores)
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
    scale: float | None = None,
) -> Tensor:
    """The same softmax(Q K^T / sqrt(d_k) + mask) V through F.scaled_dot_product_attention
    (`scale` in place of 1 / sqrt(d_k))."""
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
        out = F.scaled_dot_product_attention(grouped, k, v, mask, dropout_p, scale=scale)
        return out.reshape(batch, n_heads, 1, d_k)
    k, v = _repeat_kv(k, n_heads), _repeat_kv(v, n_heads)
    if is_causal and (mask is not None or q_len != k_len):
        # SDPA's own causal flag aligns the mask top-left; decoding with a cache needs bottom-right.
        mask, is_causal = _with_causal(mask, q_len, k_len, q.device), False
    return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale=scale)


class MultiHeadAttention(Recordable, nn.Module):
    """head_h = Attention(X W_Q^h, S W_K^h, S W_V^h); MHA = concat(head_1..head_H) W_O.

    S = X for self-attention, S = the encoder's output (memory) for cross-attention.
    """

    FORMULAS: ClassVar[dict[str, str]] = {
        "query": "Q = X W_Q + b_Q, split into {n_heads} heads of d_k = {head_dim}",
        "key": "K = S W_K + b_K (S = X; the encoder's output in cross-attention), split into "
        "{n_kv_heads} key heads for {n_heads} query heads: query head h reads key head "
        "h // (n_heads / n_kv_heads)",
        "value": "V = S W_V + b_V, split into {n_kv_heads} heads, shared like the keys",
        "normed_query": "Q_h = RMSNorm(Q_h) over its d_k values (QK-norm: scores stay in range "
        "however large the weights grow)",
        "normed_key": "K_h = RMSNorm(K_h) over its d_k values (QK-norm)",
        "rotated_query": "RoPE: Q' = Q cos(theta) + rotate_half(Q) sin(theta), each pair "
        "(i, i + d_k/2) turned by its position's angle",
        "rotated_key": "RoPE: K' = K cos(theta) + rotate_half(K) sin(theta); Q' K'^T then depends "
        "on how far apart two positions are",
        "scores": "S_h = {scaled} (Q and K rotated by RoPE where used): how well query i fits "
        "key j{capped}",
        "attention_weights": "A_h = softmax(S_h + mask): row i sums to 1 over the keys query i "
        "may see (j <= i under a causal mask)",
        "weighted_values": "head_h = A_h V_h: each token's mix of the values, heads side by side",
        "attention_output": "MultiHead(X) = concat(head_1, ..., head_H) W_O + b_O",
    }

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        implementation: str = "fused",
        qk_norm_eps: float | None = None,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        unit_offset: bool = False,
    ) -> None:
        """`qk_norm_eps`: normalise each head's queries and keys (QK-norm) with this eps (and the
        gain 1 + gamma with `unit_offset`); `head_dim`: d_k (default d_model / n_heads);
        `qkv_bias`: biases on W_Q, W_K, W_V (default `bias`, which W_O always follows);
        `scale`: the scores' factor (default 1 / sqrt(d_k)); `softcap`: scores = c tanh(S / c)."""
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if (head_dim is None and d_model % n_heads) or n_heads % n_kv_heads:
            raise ValueError(
                f"d_model={d_model} must divide into n_heads={n_heads}, "
                f"and n_heads into n_kv_heads={n_kv_heads}"
            )
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.dropout = dropout
        self.implementation = implementation
        self.scale, self.softcap = scale, softcap
        self.scaled = (
            f"Q_h K_h^T / sqrt(d_k), d_k = {self.head_dim}"
            if scale is None
            else f"Q_h K_h^T * {scale:.4g} (d_k = {self.head_dim})"
        )
        self.capped = "" if softcap is None else f"; capped: c tanh(S / c), c = {softcap:g}"
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = HeadNorm(self.head_dim, qk_norm_eps, unit_offset)
            self.k_norm = HeadNorm(self.head_dim, qk_norm_eps, unit_offset)

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
        keys and values and returns all of them, for incremental decoding. While recording, the
        per-head tensors are recorded as (batch, heads, seq, d_k), this call's positions only.
        """
        record = self.recorder
        source = x if memory is None else memory
        q = self.split_heads(self.q_proj(x), self.n_heads)
        k = self.split_heads(self.k_proj(source), self.n_kv_heads)
        v = self.split_heads(self.v_proj(source), self.n_kv_heads)
        if record is not None:
            record("query", q)
            record("key", k)
            record("value", v)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
            if record is not None:
                record("normed_query", q)
                record("normed_key", k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if record is not None:
                record("rotated_query", q)
                record("rotated_key", k)
        if cache is not None:
            k, v = cache.update(k, v)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        explicit = self.implementation == "explicit" or self.softcap is not None  # SDPA can't cap
        if need_weights or explicit or record is not None:
            out, weights = explicit_attention(
                q, k, v, mask, is_causal, dropout_p, record, self.scale, self.softcap
            )
        else:
            out = fused_attention(q, k, v, mask, is_causal, dropout_p, self.scale)
        projected = self.o_proj(out.transpose(1, 2).flatten(-2))
        if record is not None:
            record("attention_weights", weights)
            record("weighted_values", out)
            record("attention_output", projected)
        return projected, weights if need_weights else None
