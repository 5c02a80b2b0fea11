"""A run's record beside its checkpoints: metrics.jsonl (one JSON object per training step and
per evaluation) and loss.png (the training and validation loss curves), each written atomically."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def record(history: list[dict[str, Any]], run_dir: Path) -> None:
    """Write RUN/metrics.jsonl and, once there is a loss to draw, RUN/loss.png."""
    write_metrics(history, run_dir / METRICS)
    if history:
        plot_loss(history, run_dir / PLOT)


def write_metrics(history: Iterable[dict[str, Any]], path: Path) -> None:
    """One JSON object per line: training steps and evaluations."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in history), encoding="utf-8")
    tmp.replace(path)


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """loss.png: training loss per step and validation loss at each evaluation."""
    import matplotlib  # heavy (half a second): imported only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
