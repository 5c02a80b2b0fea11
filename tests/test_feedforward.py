"""Feed-forward networks compute their formulas."""

import torch
from torch.nn import functional as F

from qkv.nn.feedforward import FeedForward, GatedFeedForward, build_feed_forward


def test_relu_feed_forward_is_max0_xw1_b1_w2_b2():
    torch.manual_seed(0)
    ffn = FeedForward(8, 32, "relu")
    x = torch.randn(3, 8)
    w1, b1, w2, b2 = ffn.w1.weight.T, ffn.w1.bias, ffn.w2.weight.T, ffn.w2.bias
    expected = torch.clamp(x @ w1 + b1, min=0) @ w2 + b2
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.w1.weight.shape == (32, 8) and ffn.w2.weight.shape == (8, 32)


def test_gated_feed_forward_is_down_of_act_gate_times_up():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    swiglu = build_feed_forward("swiglu", 8, 24, bias=False, dropout=0.0)
    assert isinstance(swiglu, GatedFeedForward)
    expected = swiglu.down(F.silu(swiglu.gate(x)) * swiglu.up(x))
    torch.testing.assert_close(swiglu(x), expected)
    geglu = build_feed_forward("geglu", 8, 24, bias=False, dropout=0.0)
    torch.testing.assert_close(geglu(x), geglu.down(F.gelu(geglu.gate(x)) * geglu.up(x)))


def test_gelu_variants_differ_only_by_approximation():
    torch.manual_seed(0)
    exact = build_feed_forward("gelu", 8, 16, bias=True, dropout=0.0)
    tanh = build_feed_forward("gelu_tanh", 8, 16, bias=True, dropout=0.0)
    tanh.load_state_dict(exact.state_dict())
    x = torch.randn(4, 8)
    assert (exact(x) - tanh(x)).abs().max() < 1e-2
    torch.testing.assert_close(tanh(x), tanh.w2(F.gelu(tanh.w1(x), approximate="tanh")))
