"""LoRA: fine-tune a frozen linear layer through a low-rank update (Hu et al. 2021).

y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A (r, in), B (out, r), r << min(in, out)
W and b stay frozen; only A and B train. B starts at zero, so the adapted model starts as the base
model. Merging folds the update in: W' = W + (alpha / r) B A, after which the layer is a plain
linear layer again and costs nothing extra.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qkv.nn.linear import Linear, linear

# The projections LoRA adapts by default, as in the paper: attention's queries and values.
DEFAULT_TARGETS = ("q_proj", "v_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(
                f"rank must be from 1 to {min(base.in_features, base.out_features)} (the smaller "
                f"side of a {base.out_features} x {base.in_features} layer), got {rank}"
            )
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init
        self.dropout = nn.Dropout(dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        update = self.dropout(x) @ self.lora_a.T @ self.lora_b.T
        return linear(x, self.base.weight, self.base.bias) + self.scale * update

    def merged(self) -> Linear:
        """The plain linear layer computing the same: W + (alpha / r) B A."""
        layer = Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        layer.to(self.base.weight.device, self.base.weight.dtype)
        with torch.no_grad():
            delta = self.scale * (self.lora_b.float() @ self.lora_a.float())
            layer.weight.copy_(self.base.weight.float() + delta)
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer


class UnknownTargets(ValueError):
    """LoRA targets that name no linear layer of the model (`unknown`), and those it has."""

    def __init__(self, unknown: list[str], names: list[str]) -> None:
        super().__init__(
            f"no linear layer is named {', '.join(unknown)}; the model's linear layers are: "
            f"{', '.join(names)}"
        )
        self.unknown, self.names = unknown, names


def linear_layer_names(model: nn.Module) -> list[str]:
    """The names LoRA targets can give: the last part of each linear layer's module name, once
    each, in the model's order (e.g. w1, w2, q_proj, k_proj, v_proj, o_proj)."""
    names = (n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear))
    return list(dict.fromkeys(names))


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
) -> list[str]:
    """Freeze every parameter of `model` and wrap its linear layers named in `targets` (the last
    part of the module name, e.g. q_proj) in LoRALinear; alpha defaults to rank (scale 1).
    Every target must name a linear layer (UnknownTargets otherwise, before anything changes).
    Returns the names of the adapted layers."""
    if not targets:
        raise ValueError("targets name no layer; name at least one, e.g. q_proj")
    names = linear_layer_names(model)
    unknown = [t for t in dict.fromkeys(targets) if t not in names]
    if unknown:
        raise UnknownTargets(unknown, names)
    model.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha or rank, dropout))
                adapted.append(f"{name}.{child_name}" if name else child_name)
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear of `model` into a plain linear layer, in place; how many."""
    merged = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                merged += 1
    return merged


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (names ending in lora_a / lora_b): what a LoRA checkpoint holds."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if name.endswith((".lora_a", ".lora_b"))
    }
