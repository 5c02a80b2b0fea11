"""The walkthrough as a figure: the attention weights and positions, for `qkv explain --plot`."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from qkv.errors import QkvError
from qkv.explain.capture import Walkthrough

MAX_PLOT_WORDS = 60
PLOT_FORMATS = (".png", ".svg", ".pdf")
POSITION_TITLES = {
    "sinusoidal": "positional encoding: sin / cos, base 10000",
    "learned": "learned positional embedding",
    "rope": "RoPE angles (radians) per pair of dimensions",
}


def plot(walkthrough: Walkthrough, path: str | Path) -> Path:
    """Save `figure(walkthrough)` as `path` (.png, .svg or .pdf); returns the path."""
    path = Path(path)
    if str(path) in ("", ".") or path.is_dir():
        raise QkvError(f"--plot needs an image file name such as attention.png, got {str(path)!r}")
    if path.suffix.lower() not in PLOT_FORMATS:
        raise QkvError(
            f"cannot write the plot as {path.name!r}: end the name with one of {PLOT_FORMATS}"
        )
    if not path.parent.exists():
        raise QkvError(
            f"cannot write the plot: folder {path.parent} does not exist; create it first"
        )
    if len(walkthrough.tokens) > MAX_PLOT_WORDS:
        raise QkvError(
            f"--plot draws one row per word: keep the text to {MAX_PLOT_WORDS} words "
            f"(it has {len(walkthrough.tokens)})"
        )
    import matplotlib.pyplot as plt  # kept off the start-up path: only plots need it

    fig = figure(walkthrough)
    try:
        with _missing_glyphs_quiet():
            fig.savefig(path, dpi=110)
    except OSError as err:
        raise QkvError(
            f"cannot write the plot to {path}: {err.strerror}; choose a writable place"
        ) from None
    finally:
        plt.close(fig)
    return path


def figure(walkthrough: Walkthrough) -> Any:
    """A matplotlib Figure: the positional encodings and each head's attention weights as
    heatmaps, rows and columns labelled with the words."""
    import matplotlib  # kept off the start-up path: only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = walkthrough.tokens
    panels: list[tuple[str, Tensor, list[str]]] = []
    position = walkthrough.config.position
    if position in POSITION_TITLES:
        pe = walkthrough.stage("positional_encoding")
        panels.append((POSITION_TITLES[position], pe.values, pe.columns))
    for layer in range(walkthrough.config.n_layers):
        weights = walkthrough.stage("attention_weights", layer).values
        for h, matrix in enumerate(weights):
            panels.append((f"attention weights, layer {layer}, head {h}", matrix, tokens))
    n_cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    side = max(3.5, 0.35 * len(tokens) + 1.5)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(side * n_cols, side * n_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, matrix, columns) in zip(axes.flat, panels, strict=False):
        attention = title.startswith("attention")
        limits = {"vmin": 0, "vmax": 1} if attention else {}
        if position == "sinusoidal" and not attention:
            limits = {"vmin": -1, "vmax": 1}
        image = ax.imshow(
            matrix.numpy(), cmap="viridis" if attention else "RdBu", aspect="auto", **limits
        )
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
        ax.set_xticks(range(len(columns)), columns, fontsize=8, rotation=90 if attention else 0)
        ax.set_xlabel("attended word (key)" if attention else "dimension", fontsize=8)
        ax.set_ylabel("word (query)" if attention else "word (position)", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    with _missing_glyphs_quiet():
        fig.tight_layout()
    return fig


@contextlib.contextmanager
def _missing_glyphs_quiet() -> Iterator[None]:
    """Words in scripts the font lacks are drawn as boxes, without a warning per glyph."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        yield
