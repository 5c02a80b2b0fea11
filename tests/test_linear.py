"""The matrix-vector path of qkv.nn.linear equals torch.nn.functional.linear."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from qkv.nn.linear import FEW_ROWS, Linear, linear


@pytest.fixture
def two_threads():
    """Two threads for the test: the row-block path needs more than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("out_features", [64, 97, 2053])  # 97, 2053: blocks of W plus a rest
@pytest.mark.parametrize("bias", [True, False])
@torch.inference_mode()
def test_linear_matches_torch_for_few_and_many_rows(
    rows: int, out_features: int, bias: bool, two_threads: None
) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 48, generator=generator)
    weight = torch.randn(out_features, 48, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    torch.testing.assert_close(linear(x, weight, b), F.linear(x, weight, b))


@pytest.mark.parametrize("rows", [1, 5, FEW_ROWS])
def test_row_blocks_follow_changes_to_the_weight(rows: int, two_threads: None) -> None:
    """A few rows use blocks of W kept between calls: they give F.linear's result, and F.linear's
    again after W changes in place or is replaced."""
    generator = torch.Generator().manual_seed(rows)
    layer = Linear(48, 300)
    x = torch.randn(rows, 48, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.mul_(-2.0)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight = torch.nn.Parameter(torch.randn(300, 48, generator=generator))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_linear_module_keeps_nn_linear_parameters_and_gradients() -> None:
    layer = Linear(8, 6)
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 8, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0, keepdim=True))


@torch.inference_mode()
def test_linear_takes_a_transposed_weight_as_it_is() -> None:
    weight = torch.randn(48, 64).t()  # (64, 48), not contiguous
    x = torch.randn(1, 48)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
