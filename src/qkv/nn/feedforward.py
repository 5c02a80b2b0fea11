"""Position-wise feed-forward networks: the plain two-layer MLP and the gated (GLU) variant.

The notes call W2 "project to high dimensional space"; in the standard FFN that qkv computes, W1
projects up from d_model to the hidden size d_ff and W2 projects back down to d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn
from torch.nn import functional as F

from qkv.nn.linear import Linear
from qkv.nn.recording import Recordable


def relu2(x: Tensor) -> Tensor:
    """ReLU squared: max(0, x)^2 (Primer; modded-nanogpt's MLP)."""
    return F.relu(x).square()


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "relu2": relu2,
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
}


class FeedForward(Recordable, nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, act = max(0, .), max(0, .)^2 or GELU; d_model -> d_ff ->
    d_model."""

    FORMULAS: ClassVar[dict[str, str]] = {
        "feed_forward_hidden": "hidden = {activation_name}(x W1 + b1): W1 projects up from "
        "d_model to d_ff = {d_ff}",
        "feed_forward": "FFN(x) = hidden W2 + b2: W2 projects back down to d_model",
    }

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_ff = d_ff
        self.w1 = Linear(d_model, d_ff, bias=bias)
        self.w2 = Linear(d_ff, d_model, bias=bias)
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.activation(self.w1(x))
        out = self.w2(self.dropout(hidden))
        if self.recorder is not None:
            self.recorder("feed_forward_hidden", hidden)
            self.recorder("feed_forward", out)
        return out


class GatedFeedForward(Recordable, nn.Module):
    """FFN(x) = down(act(gate(x)) * up(x)): SwiGLU with act = SiLU, GeGLU with act = GELU (Gemma:
    its tanh approximation)."""

    FORMULAS: ClassVar[dict[str, str]] = {
        "feed_forward_hidden": "hidden = {activation_name}(x W_gate) * (x W_up): gate and up "
        "project from d_model to d_ff = {d_ff}",
        "feed_forward": "FFN(x) = hidden W_down: W_down projects back down to d_model",
    }

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str = "silu",
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_ff = d_ff
        self.gate = Linear(d_model, d_ff, bias=bias)
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.activation(self.gate(x)) * self.up(x)
        out = self.down(self.dropout(hidden))
        if self.recorder is not None:
            self.recorder("feed_forward_hidden", hidden)
            self.recorder("feed_forward", out)
        return out


def build_feed_forward(
    kind: str, d_model: int, d_ff: int, bias: bool, dropout: float
) -> FeedForward | GatedFeedForward:
    """`kind` is ModelConfig.feed_forward: relu | relu2 | gelu | gelu_tanh | swiglu | geglu |
    geglu_tanh."""
    gated = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
    if kind in gated:
        return GatedFeedForward(d_model, d_ff, gated[kind], bias, dropout)
    return FeedForward(d_model, d_ff, kind, bias, dropout)
