"""Linear layers: y = x W^T + b, with a faster path for a few rows at a time on a multi-core CPU.

Decoding feeds one token per sequence: each weight matrix meets a handful of rows, two FLOPs
per weight read, so its speed is the memory bandwidth. One BLAS call on so few rows reads the
matrix at about one core's bandwidth (measured on 2 cores: 12 GB/s of 22); splitting W's rows into
one block per thread, computed by one batched call, reads the blocks in parallel (19 GB/s).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Up to this many rows (tokens) a product counts as decoding; more is a prefill or training.
FEW_ROWS = 16


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) -> x W^T + b (..., out) for W (out, in)."""
    threads = torch.get_num_threads()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if (
        rows > FEW_ROWS
        or threads < 2
        or out_features < 2 * threads
        or x.device.type != "cpu"
        or torch.is_grad_enabled()
    ):
        return F.linear(x, weight, bias)
    split = out_features - out_features % threads  # rows of W shared out evenly; the rest after
    blocks = weight[:split].view(threads, split // threads, in_features).transpose(1, 2)
    flat = x.reshape(rows, in_features)
    parts = flat.expand(threads, rows, in_features)
    if bias is None:
        y = torch.bmm(parts, blocks)
    else:
        y = torch.baddbmm(bias[:split].view(threads, 1, -1), parts, blocks)
    # (threads, rows, out / threads) -> (rows, out): block t holds W's t-th share of outputs.
    y = y.transpose(0, 1).reshape(rows, split)
    if split < out_features:
        rest = F.linear(flat, weight[split:], None if bias is None else bias[split:])
        y = torch.cat([y, rest], dim=-1)
    return y.view(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """nn.Linear computed by `linear`: the same parameters, faster when decoding on a CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
