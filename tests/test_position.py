"""Positional encodings: sinusoids equal the formula, RoPE rotates by relative angle."""

import math

import pytest
import torch

from qkv.nn.position import (
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)


@pytest.mark.parametrize("d_model", [4, 6, 7, 64])
def test_sinusoidal_table_equals_formula_in_float64(d_model):
    table = sinusoidal_table(50, d_model, dtype=torch.float64)
    float32 = sinusoidal_table(50, d_model)
    for pos in range(50):
        for j in range(d_model):
            i = j // 2
            angle = pos / 10000 ** (2 * i / d_model)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(table[pos, j].item() - expected) <= 1e-12
            assert abs(float32[pos, j].item() - expected) <= 1e-6


def test_sinusoidal_module_looks_up_positions():
    pe = SinusoidalPositionalEncoding(32, 8)
    positions = torch.tensor([[3, 0, 31]])
    torch.testing.assert_close(pe(positions)[0], sinusoidal_table(32, 8)[[3, 0, 31]])


def test_rotary_preserves_norm_and_scores_depend_only_on_offset():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8, max_seq_len=64, base=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def rotated(x, pos):
        return apply_rotary(x, *rope(torch.tensor([[pos]])))

    torch.testing.assert_close(rotated(q, 17).norm(), q.norm())
    near = (rotated(q, 5) * rotated(k, 3)).sum()
    far = (rotated(q, 40) * rotated(k, 38)).sum()
    torch.testing.assert_close(near, far, atol=1e-5, rtol=0)


def test_rotary_angle_follows_base():
    rope = RotaryEmbedding(head_dim=4, max_seq_len=8, base=500.0)
    cos, sin = rope(torch.tensor([[3]]))
    angle = torch.atan2(sin, cos)[0, 0, 0]
    expected = torch.tensor([3.0, 3.0 / 500**0.5, 3.0, 3.0 / 500**0.5])
    torch.testing.assert_close(angle, expected)


def test_rotary_pairs_dimension_i_with_i_plus_half():
    torch.manual_seed(0)
    d, pos, base = 8, 5, 10000.0
    rope = RotaryEmbedding(head_dim=d, max_seq_len=16, base=base)
    x = torch.randn(1, 1, 1, d)
    out = apply_rotary(x, *rope(torch.tensor([[pos]])))[0, 0, 0]
    x = x[0, 0, 0]
    for i in range(d // 2):
        theta = pos * base ** (-2 * i / d)
        c, s = math.cos(theta), math.sin(theta)
        first, second = x[i].item(), x[i + d // 2].item()
        assert abs(out[i].item() - (first * c - second * s)) < 1e-5
        assert abs(out[i + d // 2].item() - (second * c + first * s)) < 1e-5


def test_rotary_angles_are_not_wrapped():
    rope = RotaryEmbedding(head_dim=4, max_seq_len=64)
    angles = rope.angles(torch.arange(40))
    torch.testing.assert_close(angles[:, 0], torch.arange(40, dtype=torch.float32))
