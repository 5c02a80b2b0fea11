"""Helpers for comparing qkv's blocks and models with PyTorch's own Transformer modules.

Imported by test_block.py and test_model.py as a plain module (pytest's default "prepend" import
mode puts tests/ on sys.path). Each copy_* function maps PyTorch's parameter names onto ours.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.nn.attention import MultiHeadAttention
from qkv.nn.block import DecoderBlock, EncoderBlock

TOLERANCE = 1e-5


@torch.no_grad()
def perturb(module: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Add noise to every parameter: norm gains/biases are not 1/0, so a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(scale * torch.randn(param.shape, generator=generator))
    return module


@torch.no_grad()
def copy_linear(dst: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    dst.weight.copy_(weight)
    if bias is not None:
        dst.bias.copy_(bias)


@torch.no_grad()
def copy_norm(src: nn.LayerNorm, dst: nn.Module) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


def copy_attention(src: nn.MultiheadAttention, dst: MultiHeadAttention) -> None:
    """in_proj_weight/bias is [W_q; W_k; W_v] stacked along dim 0; out_proj -> o_proj."""
    weights = src.in_proj_weight.chunk(3, dim=0)
    biases = src.in_proj_bias.chunk(3, dim=0)
    for proj, weight, bias in zip(
        (dst.q_proj, dst.k_proj, dst.v_proj), weights, biases, strict=True
    ):
        copy_linear(proj, weight, bias)
    copy_linear(dst.o_proj, src.out_proj.weight, src.out_proj.bias)


def _copy_feed_forward(src: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer, dst) -> None:
    copy_linear(dst.feed_forward.w1, src.linear1.weight, src.linear1.bias)
    copy_linear(dst.feed_forward.w2, src.linear2.weight, src.linear2.bias)


def copy_encoder_layer(src: nn.TransformerEncoderLayer, dst: EncoderBlock) -> None:
    copy_attention(src.self_attn, dst.self_attention)
    _copy_feed_forward(src, dst)
    copy_norm(src.norm1, dst.attention_norm)
    copy_norm(src.norm2, dst.feed_forward_norm)


def copy_decoder_layer(src: nn.TransformerDecoderLayer, dst: DecoderBlock) -> None:
    copy_attention(src.self_attn, dst.self_attention)
    copy_attention(src.multihead_attn, dst.cross_attention)
    _copy_feed_forward(src, dst)
    copy_norm(src.norm1, dst.attention_norm)
    copy_norm(src.norm2, dst.cross_attention_norm)
    copy_norm(src.norm3, dst.feed_forward_norm)


def key_padding_mask(attention_mask: Tensor) -> Tensor:
    """qkv's attention_mask (1 = real token) -> PyTorch's key_padding_mask (True = ignore)."""
    return attention_mask == 0


def right_padding_mask(lengths: list[int], seq_len: int) -> Tensor:
    """(batch, seq_len) attention_mask, 1 for the first lengths[b] positions and 0 after."""
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()
