"""EncoderBlock / DecoderBlock vs torch.nn.Transformer{Encoder,Decoder}Layer, and their masks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from torch_reference import (
    TOLERANCE,
    copy_decoder_layer,
    copy_encoder_layer,
    key_padding_mask,
    max_abs_diff,
    perturb,
    right_padding_mask,
)

import qkv.nn
from qkv.nn.attention import additive_mask, padding_mask
from qkv.nn.block import BlockConfig, DecoderBlock, EncoderBlock

D_MODEL, N_HEADS, D_FF = 16, 4, 32
BATCH, SEQ, SRC_SEQ = 2, 7, 6
NORM_ORDER = pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])


def _block_mask(attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """The two forms the model hands a block: bool (True = may attend) or additive float."""
    allowed = padding_mask(attention_mask)
    return allowed if kind == "bool" else additive_mask(allowed, torch.float32)


# PyTorch's layers with our blocks' settings: ReLU FFN of width D_FF, no dropout.
TORCH_LAYER = dict(dim_feedforward=D_FF, dropout=0.0, activation="relu", batch_first=True)


def block_config(norm_first: bool) -> BlockConfig:
    """A post-/pre-norm ReLU block as nn.TransformerEncoderLayer builds one by default."""
    return BlockConfig(
        D_MODEL,
        N_HEADS,
        D_FF,
        feed_forward="relu",
        norm="layernorm",
        norm_eps=1e-5,
        norm_first=norm_first,
        dropout=0.0,
    )


def _encoder_pair(norm_first: bool) -> tuple[nn.TransformerEncoderLayer, EncoderBlock]:
    torch.manual_seed(0)
    reference = nn.TransformerEncoderLayer(D_MODEL, N_HEADS, norm_first=norm_first, **TORCH_LAYER)
    perturb(reference, seed=1)
    ours = EncoderBlock(block_config(norm_first))
    copy_encoder_layer(reference, ours)
    return reference.eval(), ours.eval()


def _decoder_pair(norm_first: bool) -> tuple[nn.TransformerDecoderLayer, DecoderBlock]:
    torch.manual_seed(0)
    reference = nn.TransformerDecoderLayer(D_MODEL, N_HEADS, norm_first=norm_first, **TORCH_LAYER)
    perturb(reference, seed=2)
    ours = DecoderBlock(block_config(norm_first), cross_attention=True)
    copy_decoder_layer(reference, ours)
    return reference.eval(), ours.eval()


@NORM_ORDER
@torch.no_grad()
def test_encoder_block_matches_torch_without_mask(norm_first: bool) -> None:
    reference, ours = _encoder_pair(norm_first)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    assert max_abs_diff(ours(x), reference(x)) <= TOLERANCE


@NORM_ORDER
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@torch.no_grad()
def test_encoder_block_matches_torch_with_padding_mask(norm_first: bool, mask_kind: str) -> None:
    reference, ours = _encoder_pair(norm_first)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    attention_mask = right_padding_mask([SEQ, 4], SEQ)
    expected = reference(x, src_key_padding_mask=key_padding_mask(attention_mask))
    actual = ours(x, mask=_block_mask(attention_mask, mask_kind))
    assert max_abs_diff(actual, expected) <= TOLERANCE


@NORM_ORDER
@pytest.mark.parametrize("memory_padded", [False, True], ids=["full_memory", "padded_memory"])
@torch.no_grad()
def test_decoder_block_matches_torch_with_causal_mask(
    norm_first: bool, memory_padded: bool
) -> None:
    reference, ours = _decoder_pair(norm_first)
    x, memory = torch.randn(BATCH, SEQ, D_MODEL), torch.randn(BATCH, SRC_SEQ, D_MODEL)
    source_mask = right_padding_mask([SRC_SEQ, 3] if memory_padded else [SRC_SEQ] * 2, SRC_SEQ)
    expected = reference(
        x,
        memory,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(SEQ),
        tgt_is_causal=True,
        memory_key_padding_mask=key_padding_mask(source_mask) if memory_padded else None,
    )
    memory_mask = additive_mask(padding_mask(source_mask), torch.float32) if memory_padded else None
    actual = ours(x, memory, is_causal=True, memory_mask=memory_mask)
    assert max_abs_diff(actual, expected) <= TOLERANCE


@NORM_ORDER
@pytest.mark.parametrize("cross_attention", [False, True], ids=["self_only", "with_cross"])
@torch.no_grad()
def test_decoder_block_output_never_depends_on_later_tokens(
    norm_first: bool, cross_attention: bool
) -> None:
    torch.manual_seed(0)
    block = DecoderBlock(block_config(norm_first), cross_attention=cross_attention).eval()
    x = torch.randn(BATCH, SEQ, D_MODEL)
    memory = torch.randn(BATCH, SRC_SEQ, D_MODEL) if cross_attention else None
    base = block(x, memory, is_causal=True)
    for t in range(SEQ):
        changed = x.clone()
        changed[:, t] = torch.randn(BATCH, D_MODEL)
        out = block(changed, memory, is_causal=True)
        if t:
            assert max_abs_diff(out[:, :t], base[:, :t]) <= TOLERANCE
        # Not vacuous: position t itself does see the change.
        assert max_abs_diff(out[:, t], base[:, t]) > 1e-3


@NORM_ORDER
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@torch.no_grad()
def test_encoder_block_real_positions_ignore_padded_inputs(
    norm_first: bool, mask_kind: str
) -> None:
    torch.manual_seed(0)
    block = EncoderBlock(block_config(norm_first)).eval()
    lengths = [SEQ, 3]
    attention_mask = right_padding_mask(lengths, SEQ)
    mask = _block_mask(attention_mask, mask_kind)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    changed = x.clone()
    changed[attention_mask == 0] = 100 * torch.randn(int((attention_mask == 0).sum()), D_MODEL)
    base, out = block(x, mask=mask), block(changed, mask=mask)
    real = attention_mask.bool()
    assert max_abs_diff(out[real], base[real]) <= TOLERANCE
    # The short row alone, unpadded, gives the same real-position outputs.
    alone = block(x[1:, : lengths[1]])
    assert max_abs_diff(base[1, : lengths[1]], alone[0]) <= TOLERANCE


def test_nn_imports_nothing_of_qkv_outside_nn() -> None:
    """qkv.nn stands alone: blocks take a BlockConfig, not qkv.config's ModelConfig."""
    for path in Path(qkv.nn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                of_qkv = name == "qkv" or name.startswith("qkv.")
                of_nn = name == "qkv.nn" or name.startswith("qkv.nn.")
                assert of_nn or not of_qkv, f"{path.name} imports {name}"
