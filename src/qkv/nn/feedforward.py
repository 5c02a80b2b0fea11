"""Position-wise feed-forward networks: the plain two-layer MLP and the gated (GLU) variant.

The notes call W2 "project to high dimensional space"; in the standard FFN that qkv computes, W1
projects up from d_model to the hidden size d_ff and W2 projects back down to d_model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

from qkv.nn.linear import Linear


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, act = max(0, .) or GELU; d_model -> d_ff -> d_model."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.w1 = Linear(d_model, d_ff, bias=bias)
        self.w2 = Linear(d_ff, d_model, bias=bias)
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.activation(self.w1(x))))


class GatedFeedForward(nn.Module):
    """FFN(x) = down(act(gate(x)) * up(x)): SwiGLU with act = SiLU, GeGLU with act = GELU."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str = "silu",
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.gate = Linear(d_model, d_ff, bias=bias)
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.activation(self.gate(x)) * self.up(x)))


def build_feed_forward(
    kind: str, d_model: int, d_ff: int, bias: bool, dropout: float
) -> FeedForward | GatedFeedForward:
    """`kind` is ModelConfig.feed_forward: relu | gelu | gelu_tanh | swiglu | geglu."""
    if kind == "swiglu":
        return GatedFeedForward(d_model, d_ff, "silu", bias, dropout)
    if kind == "geglu":
        return GatedFeedForward(d_model, d_ff, "gelu", bias, dropout)
    return FeedForward(d_model, d_ff, kind, bias, dropout)
