"""A run's record beside its checkpoints: metrics.jsonl (one JSON object per training step and
per evaluation) and loss.png (the training and validation loss curves), each written atomically.

A record that cannot be written (a full or read-only disk) is a warning, not an error: both files
are drawn whole from the history at every record, and each checkpoint's trainer_state.json keeps
that history too, so the run goes on and the next record makes up for it. (An error here would
also replace the checkpoint's own error when the trainer records after a failed save.)"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qkv.errors import describe_os_error

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def record(history: list[dict[str, Any]], run_dir: Path) -> None:
    """Write RUN/metrics.jsonl and, once there is a loss to draw, RUN/loss.png; a failed write
    is a warning naming the file and the errno's meaning, with no temporary file left."""
    path = run_dir / METRICS
    try:
        write_metrics(history, path)
        if history:
            path = run_dir / PLOT
            plot_loss(history, path)
    except OSError as err:
        warnings.warn(
            f"cannot write {path}: {describe_os_error(err)}; not stopping the run for "
            "it: the next evaluation or checkpoint writes it whole again, and each checkpoint's "
            "trainer_state.json holds the same history",
            stacklevel=2,
        )


def write_metrics(history: Iterable[dict[str, Any]], path: Path) -> None:
    """One JSON object per line: training steps and evaluations."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in history), encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
