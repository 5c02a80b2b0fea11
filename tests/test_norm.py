"""LayerNorm and RMSNorm written out by us equal PyTorch's modules."""

import pytest
import torch
from torch import nn

from qkv.nn.norm import LayerNorm, RMSNorm


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_layer_norm_matches_torch(eps):
    torch.manual_seed(0)
    ours, theirs = LayerNorm(32, eps), nn.LayerNorm(32, eps)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 32) * 4 + 2
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_layer_norm_without_bias_matches_torch():
    ours, theirs = LayerNorm(8, bias=False), nn.LayerNorm(8, bias=False)
    x = torch.randn(4, 8)
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm_matches_torch(eps):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(32, eps), nn.RMSNorm(32, eps)
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 32) * 3
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_layer_norm_output_has_zero_mean_unit_variance_before_affine():
    x = torch.randn(6, 64) * 10 + 5
    y = LayerNorm(64)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_norms_keep_bfloat16_inputs_in_bfloat16():
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert LayerNorm(16)(x).dtype == torch.bfloat16
    assert RMSNorm(16)(x).dtype == torch.bfloat16


def test_norms_keep_float64_precision_and_pass_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    for ours, theirs in ((LayerNorm(8), nn.LayerNorm(8)), (RMSNorm(8), nn.RMSNorm(8, eps=1e-5))):
        ours, theirs = ours.double(), theirs.double()
        assert ours(x).dtype == torch.float64
        assert (ours(x) - theirs(x)).abs().max() <= 1e-12
        assert torch.autograd.gradcheck(ours, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_equal_the_written_out_formula(dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 9, 24) * 3 + 1).to(dtype)
    for explicit, fused in (
        (LayerNorm(24), LayerNorm(24, fused=True)),
        (RMSNorm(24), RMSNorm(24, fused=True)),
    ):
        with torch.no_grad():
            explicit.weight.normal_()
        fused.load_state_dict(explicit.state_dict())
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert (fused(x).float() - explicit(x).float()).abs().max() <= tolerance
