"""The optimizer's parts: AdamW's parameter groups (which weights decay), Muon for the blocks'
matrices, and the learning-rate schedule (linear warmup, then cosine decay to a floor, or a
stable phase and a linear decay: warmup-stable-decay)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from qkv.config import TrainConfig
from qkv.nn.embedding import TokenEmbedding
from qkv.nn.position import LearnedPositionalEmbedding

# Newton-Schulz quintic X <- a X + (b A + c A^2) X, A = X X^T: the coefficients Keller Jordan
# chose for Muon, which push every singular value of X into about [0.7, 1.2] in five steps.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """The schedule as a multiple of the peak: linear warmup over warmup_steps (at most a tenth
    of `steps`); then cosine decay to min_lr_ratio at `steps`, or (wsd) 1 until the last
    decay_fraction of the steps and a straight line down to min_lr_ratio at `steps`."""
    warmup = min(cfg.warmup_steps, cfg.steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay = max(1, round(cfg.steps * cfg.decay_fraction))
        left = cfg.steps - step
        return 1.0 if left >= decay else floor + (1 - floor) * left / decay
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The AdamW learning rate at `step`: lr * lr_scale(step)."""
    return cfg.lr * lr_scale(step, cfg)


def lookup_tables(model: nn.Module) -> list[nn.Parameter]:
    """The embedding tables: token embeddings and learned positions (lookups, not matmuls)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, (TokenEmbedding, LearnedPositionalEmbedding))
        for p in m.parameters(recurse=False)
    ]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; no decay on norms, biases and embedding tables."""
    no_decay_ids = {id(p) for p in lookup_tables(model)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or id(param) in no_decay_ids else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """What Muon updates: the blocks' 2-D weights (not the embeddings, the head or any gain)."""
    blocks = [m for name, m in model.named_children() if name.endswith("blocks")]
    return [p for b in blocks for p in b.parameters() if p.dim() == 2 and p.requires_grad]


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """U V^T of G = U S V^T, approximately (singular values into about [0.7, 1.2]), by five
    Newton-Schulz steps in float32, for a matrix or a stack of same-shaped ones (..., rows,
    cols); each step is two batched matmuls with the polynomial folded in (baddbmm)."""
    a, b, c = NEWTON_SCHULZ
    x = g.float().reshape(-1, *g.shape[-2:])
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # every singular value <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return (x.mT if tall else x).reshape(g.shape)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Keller Jordan, 2024), for 2-D weights:
    m = mu m + g; u = g + mu m (Nesterov); W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols))
    orthogonalize(u). Same-shaped matrices are orthogonalised together, in float32."""

    def __init__(
        self, params: Iterable[Tensor], lr: float = 0.02, momentum: float = 0.95,
        weight_decay: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            shapes: dict[tuple[int, ...], list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    shapes.setdefault(tuple(p.shape), []).append(p)
            for (rows, cols), params in shapes.items():
                updates = []
                for p in params:
                    buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buffer.mul_(group["momentum"]).add_(p.grad)
                    updates.append(p.grad.add(buffer, alpha=group["momentum"]))
                orthogonal = orthogonalize(torch.stack(updates))
                scale = group["lr"] * math.sqrt(max(1.0, rows / cols))
                for p, update in zip(params, orthogonal, strict=True):
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=-scale)


class Optimizers:
    """Several optimizers stepping as one (Muon for matrices, AdamW for the rest): their
    param_groups in order, and one state_dict numbering the parameters across all of them, as
    a single optimizer's does (so a checkpoint's optimizer state is plain tensors either way)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for optimizer in self.optimizers:
            own = optimizer.state_dict()
            state.update({offset + i: s for i, s in own["state"].items()})
            groups += [g | {"params": [offset + i for i in g["params"]]}
                       for g in own["param_groups"]]  # fmt: skip
            offset += sum(len(g["params"]) for g in optimizer.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if len(saved["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"{len(saved['param_groups'])} parameter groups saved, "
                f"{len(self.param_groups)} here"
            )
        groups, offset = iter(saved["param_groups"]), 0
        for optimizer in self.optimizers:
            count = sum(len(g["params"]) for g in optimizer.param_groups)
            own = [next(groups) for _ in optimizer.param_groups]
            optimizer.load_state_dict({
                "state": {i - offset: s for i, s in saved["state"].items()
                          if offset <= i < offset + count},
                "param_groups": [g | {"params": [i - offset for i in g["params"]]} for g in own],
            })  # fmt: skip
            offset += count


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> Optimizers:
    """AdamW over every parameter (`cfg.optimizer` adamw); or (muon) Muon over the blocks'
    matrices at muon_lr and AdamW over the embeddings, head, norms and biases. Each group keeps
    its peak learning rate as "peak_lr"; the schedule scales it."""
    muon = {id(p) for p in muon_matrices(model)} if cfg.optimizer == "muon" else set()
    groups = [
        {**g, "params": [p for p in g["params"] if id(p) not in muon], "peak_lr": cfg.lr}
        for g in parameter_groups(model, cfg.weight_decay)
    ]
    adamw = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused
    )
    if not muon:
        return Optimizers(adamw)
    matrices = [p for p in model.parameters() if id(p) in muon]
    group = {"params": matrices, "name": "muon", "peak_lr": cfg.muon_lr}
    return Optimizers(Muon([group], lr=cfg.muon_lr, weight_decay=0.0), adamw)
