"""Linear layers: y = x W^T + b, with a faster path for a few rows at a time on a multi-core CPU.

Decoding feeds one token per sequence: each weight matrix meets a handful of rows, two FLOPs
per weight read, so its speed is the memory bandwidth. One BLAS call on so few rows reads the
matrix at about one core's bandwidth (measured on 2 cores: 12 GB/s of 22); splitting W's rows into
blocks of about 1,024, shared out over the threads by one batched call, reads them in parallel
(19 GB/s). For 2 to 16 rows (a batch decoding together) MKL's small-M GEMM packs W afresh on
every call and reads it at about a third of the bandwidth; the same blocks read it at twice
that (a 5632 x 2048 matrix, 8 rows: 9.2 GB/s against 5.1). oneDNN's linear on a copy of W
reordered into its blocked layout reads it at 11.1 GB/s, but the copy doubles the weights'
memory (4.4 GB more for a 1.1B model in float32) and a whole 8-row GPT-2-small decode ran no
faster with it (95 against 94 tokens/s): the blocks, views of W, take no memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Up to this many rows (tokens) a product counts as decoding; more is a prefill or training.
FEW_ROWS = 16
BLOCK_ROWS = 1024


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) -> x W^T + b (..., out) for W (out, in)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if rows > FEW_ROWS or torch.is_grad_enabled() or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    threads = torch.get_num_threads()
    if threads < 2 or out_features < 2 * threads or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    blocks, bias_blocks, covered = _row_blocks(weight, bias, threads)
    parts = x.reshape(1, rows, in_features).expand(blocks.shape[0], rows, in_features)
    if bias_blocks is None:
        y = torch.bmm(parts, blocks)
    else:
        y = torch.baddbmm(bias_blocks, parts, blocks)
    # (blocks, rows, out / blocks) -> (rows, out): block b holds W's b-th share of the outputs.
    y = y.view(rows, covered) if rows == 1 else y.transpose(0, 1).reshape(rows, covered)
    if covered < out_features:
        rest = F.linear(
            x.reshape(rows, in_features), weight[covered:], None if bias is None else bias[covered:]
        )
        y = torch.cat([y, rest], dim=-1)
    return y.view(*x.shape[:-1], out_features)


def _row_blocks(
    weight: Tensor, bias: Tensor | None, threads: int
) -> tuple[Tensor, Tensor | None, int]:
    """W's rows as equal blocks (n_blocks, in, rows per block) of views, a multiple of `threads`
    of them, the bias to match, and how many rows they cover (the rest go on their own).
    Kept on the weight, as decoding asks for the same ones every token: being views, they follow
    in-place changes to W (and hold on to its storage, so a new one has a new address)."""
    key = (threads, weight.data_ptr(), None if bias is None else bias.data_ptr())
    cached = getattr(weight, "_qkv_row_blocks", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    out_features, in_features = weight.shape
    n_blocks = threads * max(1, out_features // (threads * BLOCK_ROWS))
    covered = out_features - out_features % n_blocks
    blocks = weight[:covered].view(n_blocks, covered // n_blocks, in_features).transpose(1, 2)
    bias_blocks = None if bias is None else bias[:covered].view(n_blocks, 1, -1)
    weight._qkv_row_blocks = (key, (blocks, bias_blocks, covered))
    return blocks, bias_blocks, covered


class Linear(nn.Linear):
    """nn.Linear computed by `linear`: the same parameters, faster when decoding on a CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
