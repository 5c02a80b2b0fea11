"""Scaled dot-product and multi-head attention: explicit == fused == torch, masks, gradients."""

import math

import pytest
import torch
from torch import nn
from torch_reference import copy_attention

from qkv.nn.attention import (
    MultiHeadAttention,
    additive_mask,
    causal_mask,
    explicit_attention,
    fused_attention,
)

B, T, S, D, H = 2, 7, 9, 16, 4


def _qkv(n_kv_heads: int = H, q_len: int = T, k_len: int = T, dtype=torch.float32):
    d_k = D // H
    q = torch.randn(B, H, q_len, d_k, dtype=dtype)
    k = torch.randn(B, n_kv_heads, k_len, d_k, dtype=dtype)
    v = torch.randn(B, n_kv_heads, k_len, d_k, dtype=dtype)
    return q, k, v


def _padding(lengths: list[int], length: int) -> torch.Tensor:
    """(batch, length) bool, True for real tokens: right padding."""
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def test_explicit_attention_is_the_formula():
    q, k, v = _qkv()
    out, weights = explicit_attention(q, k, v)
    expected_weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(out, expected_weights @ v)


@pytest.mark.parametrize("n_kv_heads", [H, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("masking", ["none", "causal", "padding", "causal+padding"])
def test_explicit_and_fused_attention_agree(n_kv_heads, masking):
    torch.manual_seed(0)
    q, k, v = _qkv(n_kv_heads)
    mask = None
    if "padding" in masking:
        mask = _padding([T, 4], T)[:, None, None, :]
    is_causal = "causal" in masking
    explicit, _ = explicit_attention(q, k, v, mask, is_causal)
    fused = fused_attention(q, k, v, mask, is_causal)
    assert (explicit - fused).abs().max() <= 1e-5


def test_float_and_bool_masks_agree():
    q, k, v = _qkv()
    allowed = _padding([T, 3], T)[:, None, None, :] & causal_mask(T, T)
    for attend in (explicit_attention, fused_attention):
        a = attend(q, k, v, allowed)
        b = attend(q, k, v, additive_mask(allowed, q.dtype))
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_causal_mask_aligns_bottom_right_for_cached_queries():
    # Two new queries after five cached keys: query 0 is position 5, query 1 is position 6.
    mask = causal_mask(2, 7)
    assert mask.tolist() == [[True] * 6 + [False], [True] * 7]
    q, k, v = _qkv(q_len=T, k_len=T)
    full, _ = explicit_attention(q, k, v, is_causal=True)
    last_two_explicit, _ = explicit_attention(q[:, :, -2:], k, v, is_causal=True)
    last_two_fused = fused_attention(q[:, :, -2:], k, v, is_causal=True)
    torch.testing.assert_close(last_two_explicit, full[:, :, -2:])
    torch.testing.assert_close(last_two_fused, full[:, :, -2:], atol=1e-6, rtol=0)


def test_attention_weights_rows_sum_to_one_and_respect_causality():
    q, k, v = _qkv()
    _, weights = explicit_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))
    assert (weights.triu(1) == 0).all()


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_row_stays_finite_and_implementations_agree(kind):
    q, k, v = _qkv()
    allowed = torch.zeros(B, 1, T, T, dtype=torch.bool)
    allowed[..., 1:, :] = True
    mask = allowed if kind == "bool" else additive_mask(allowed, q.dtype)
    explicit, _ = explicit_attention(q, k, v, mask)
    fused = fused_attention(q, k, v, mask)
    assert torch.isfinite(explicit).all() and torch.isfinite(fused).all()
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)


def test_attention_dropout_zeroes_weights_only_in_training():
    torch.manual_seed(0)
    q, k, v = _qkv()
    mha = MultiHeadAttention(D, H, dropout=0.5, implementation="explicit")
    x = torch.randn(B, T, D)
    mha.eval()
    first, second = mha(x)[0], mha(x)[0]
    torch.testing.assert_close(first, second)
    mha.train()
    assert not torch.allclose(mha(x)[0], first)
    torch.manual_seed(1)
    out, weights = explicit_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    kept = torch.nn.functional.dropout(torch.ones_like(weights), 0.5) > 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(out, (weights * kept / 0.5) @ v)


def test_attention_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v = (
        t.requires_grad_() for t in _qkv(n_kv_heads=2, q_len=4, k_len=4, dtype=torch.float64)
    )
    assert torch.autograd.gradcheck(lambda *a: explicit_attention(*a, is_causal=True)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: fused_attention(*a, is_causal=True), (q, k, v))


@pytest.mark.parametrize("implementation", ["explicit", "fused"])
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("masking", ["none", "causal", "padding", "causal+padding"])
def test_multi_head_attention_matches_torch(implementation, kind, masking):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(D, H, batch_first=True).eval()
    ours = MultiHeadAttention(D, H, implementation=implementation).eval()
    copy_attention(theirs, ours)
    x = torch.randn(B, T, D)
    memory = x if kind == "self" else torch.randn(B, S, D)
    k_len = memory.shape[1]
    real = _padding([k_len, k_len - 2], k_len)
    causal = causal_mask(T, k_len)
    torch_kwargs, allowed = {}, torch.ones(B, 1, T, k_len, dtype=torch.bool)
    if "causal" in masking:
        torch_kwargs["attn_mask"] = ~causal
        allowed = allowed & causal
    if "padding" in masking:
        torch_kwargs["key_padding_mask"] = ~real
        allowed = allowed & real[:, None, None, :]
    expected, expected_weights = theirs(
        x, memory, memory, average_attn_weights=False, **torch_kwargs
    )
    got, weights = ours(x, None if kind == "self" else memory, mask=allowed, need_weights=True)
    assert (got - expected).abs().max() <= 1e-5
    assert (weights - expected_weights).abs().max() <= 1e-5


def test_grouped_query_attention_equals_mha_with_shared_heads():
    torch.manual_seed(0)
    gqa = MultiHeadAttention(D, H, n_kv_heads=2).eval()
    mha = MultiHeadAttention(D, H).eval()
    d_k = D // H
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.o_proj.load_state_dict(gqa.o_proj.state_dict())
        for small, big in ((gqa.k_proj, mha.k_proj), (gqa.v_proj, mha.v_proj)):
            heads_w = small.weight.unflatten(0, (2, d_k)).repeat_interleave(2, dim=0).flatten(0, 1)
            heads_b = small.bias.unflatten(0, (2, d_k)).repeat_interleave(2, dim=0).flatten(0, 1)
            big.weight.copy_(heads_w)
            big.bias.copy_(heads_b)
    x = torch.randn(B, T, D)
    torch.testing.assert_close(gqa(x, is_causal=True)[0], mha(x, is_causal=True)[0])
    assert gqa.k_proj.weight.shape == (2 * d_k, D)


def test_multi_head_attention_is_causal_flag_matches_torch():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(D, H, batch_first=True).eval()
    ours = MultiHeadAttention(D, H).eval()
    copy_attention(theirs, ours)
    x = torch.randn(B, T, D)
    expected, _ = theirs(x, x, x, attn_mask=~causal_mask(T, T), need_weights=False)
    assert (ours(x, is_causal=True)[0] - expected).abs().max() <= 1e-5


def test_multi_head_attention_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="n_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        MultiHeadAttention(16, 4, n_kv_heads=3)
