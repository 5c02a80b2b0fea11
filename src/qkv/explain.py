"""The walkthrough: a sentence through a decoder, stage by stage, every number kept.

`explain_text` builds the notes' worked example (word-level tokens, a freshly initialised seeded
model with d_model = 4) and `walk` records each stage of any DecoderLM's forward pass by calling the
model's own modules in order, so the final logits equal `model(token_ids)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.model import DecoderLM, probabilities
from qkv.nn.attention import causal_mask
from qkv.nn.block import DecoderBlock
from qkv.nn.feedforward import FeedForward
from qkv.nn.position import apply_rotary

NOTES_SENTENCE = "The quick brown fox jumps over the lazy dog"
MAX_WORDS = 512
MAX_PLOT_WORDS = 60
PLOT_FORMATS = (".png", ".svg", ".pdf")
POSITION_TITLES = {
    "sinusoidal": "positional encoding: sin / cos, base 10000",
    "learned": "learned positional embedding",
    "rope": "RoPE angles (radians) per pair of dimensions",
}


@dataclass
class Stage:
    """One step of the forward pass: its formula and tensor, one row per token.

    `values` is (tokens, columns), or (heads, tokens, columns) for per-head stages.
    """

    name: str
    formula: str
    values: Tensor
    columns: list[str]
    layer: int | None = None
    sublayer: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "formula": self.formula,
            "shape": list(self.values.shape),
            "values": self.values.tolist(),
        }
        if self.layer is not None:
            data["layer"] = self.layer
        if self.sublayer is not None:
            data["sublayer"] = self.sublayer
        return data


AddStage = Callable[[Stage], None]


@dataclass
class Walkthrough:
    tokens: list[str]
    token_ids: list[int]
    vocabulary: list[str]
    config: ModelConfig
    stages: list[Stage] = field(default_factory=list)

    def stage(self, name: str, layer: int | None = None) -> Stage:
        """The first stage called `name` (in `layer`, if given)."""
        for s in self.stages:
            if s.name == name and (layer is None or s.layer == layer):
                return s
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "vocabulary": self.vocabulary,
            "config": self.config.to_dict(),
            "stages": [s.to_json() for s in self.stages],
        }


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks, in order: "dog." -> ["dog", "."]."""
    return re.findall(r"\w+|[^\w\s]", text)


def explain_text(
    text: str = NOTES_SENTENCE,
    d_model: int = 4,
    n_heads: int = 2,
    n_layers: int = 1,
    seed: int = 0,
) -> Walkthrough:
    """The notes' example: word tokens through a fresh post-norm decoder (preset notes-demo)."""
    tokens = word_tokens(text)
    if not tokens:
        raise QkvError("the text to explain is empty; give a sentence, e.g. qkv explain 'The fox'")
    if len(tokens) > MAX_WORDS:
        raise QkvError(
            f"the text has {len(tokens)} words; explain prints one row per word, "
            f"so give at most {MAX_WORDS}"
        )
    vocabulary = sorted({t.lower() for t in tokens})
    config = ModelConfig.preset(
        "notes-demo",
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        vocab_size=len(vocabulary),
        max_seq_len=max(64, len(tokens)),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DecoderLM(config).eval()
    token_ids = [vocabulary.index(t.lower()) for t in tokens]
    walkthrough = walk(model, torch.tensor([token_ids]), tokens, vocabulary)
    walkthrough.stages.insert(
        0,
        Stage(
            "token_ids",
            "id_i = index of the lower-cased word i in the vocabulary (sorted unique words)",
            torch.tensor(token_ids)[:, None],
            ["id"],
        ),
    )
    return walkthrough


def _dims(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _head_dims(n_heads: int, head_dim: int) -> list[str]:
    return [f"h{h}.{i}" for h in range(n_heads) for i in range(head_dim)]


@torch.no_grad()
def walk(
    model: DecoderLM, token_ids: Tensor, tokens: list[str], vocabulary: list[str]
) -> Walkthrough:
    """Run `model` on one sequence (1, seq), recording every stage's tensor."""
    config = model.config
    out = Walkthrough(tokens, token_ids[0].tolist(), vocabulary, config)
    add = out.stages.append
    d = _dims("d", config.d_model)
    seq = token_ids.shape[-1]
    positions = torch.arange(seq)[None, :]
    embedder = model.embedder

    x = embedder.token_embedding(token_ids)
    scale = " * sqrt(d_model)" if config.scale_embeddings else ""
    add(Stage("embeddings", f"x_i = E[id_i]{scale}: row id_i of the embedding table", x[0], d))
    rotary = None
    if config.position == "sinusoidal":
        pe = embedder.position(positions)
        formula = "PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(same angle)"
        add(Stage("positional_encoding", formula, pe[0], d))
    elif config.position == "learned":
        pe = embedder.position(positions)
        add(Stage("positional_encoding", "PE(pos) = P[pos]: row pos of a learned table", pe[0], d))
    elif config.position == "rope":
        rotary = embedder.rotary(positions)
        angles = embedder.rotary.angles(positions)[0]
        formula = f"RoPE angle(pos, i) = pos * {config.rope_base:g}^(-2i/d_k), applied to q and k"
        add(Stage("positional_encoding", formula, angles, _dims("θ", angles.shape[-1])))
    if config.position in ("sinusoidal", "learned"):
        x = x + pe
        add(Stage("embeddings_plus_positions", "x_i = E[id_i] + PE(i)", x[0], d))

    for layer, block in enumerate(model.blocks):
        x = _walk_attention(add, block, x, rotary, tokens, layer, config)
        x = _walk_feed_forward(add, block, x, layer, config)

    if config.final_norm:
        x = model.final_norm(x)
        add(Stage("final_norm", _norm_formula(config), x[0], d))
    logits = model.head(x)
    head = "h E^T (tied to the embedding)" if config.tie_embeddings else "h W_out^T"
    add(Stage("logits", f"logits_i = {head}: one score per vocabulary word", logits[0], vocabulary))
    probs = probabilities(logits)
    add(
        Stage(
            "probabilities",
            "p_i(w) = exp(logit_i(w)) / sum_v exp(logit_i(v)): next-token distribution",
            probs[0],
            vocabulary,
        )
    )
    return out


def _norm_formula(config: ModelConfig) -> str:
    if config.norm == "rmsnorm":
        return "RMSNorm(x) = gamma * x / sqrt(mean(x^2) + eps)"
    return "LayerNorm(x) = gamma * (x - mean) / sqrt(var + eps) + beta"


def _residual(
    add: AddStage,
    x: Tensor,
    sub: Tensor,
    norm: nn.Module,
    layer: int,
    name: str,
    config: ModelConfig,
) -> Tensor:
    """Record the residual connection (and the post-norm that follows it)."""
    d = _dims("d", config.d_model)
    what = "Attention(x)" if name == "attention" else "FFN(x)"
    x = x + sub
    add(Stage("residual", f"x + {what}: the residual connection", x[0], d, layer, name))
    if not config.norm_first:
        x = norm(x)
        add(Stage("layer_norm", _norm_formula(config), x[0], d, layer, name))
    return x


def _pre_norm(
    add: AddStage, x: Tensor, norm: nn.Module, layer: int, name: str, config: ModelConfig
) -> Tensor:
    if not config.norm_first:
        return x
    h = norm(x)
    add(Stage("layer_norm", _norm_formula(config), h[0], _dims("d", config.d_model), layer, name))
    return h


def _walk_attention(
    add: AddStage,
    block: DecoderBlock,
    x: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    tokens: list[str],
    layer: int,
    config: ModelConfig,
) -> Tensor:
    attention = block.self_attention
    h = _pre_norm(add, x, block.attention_norm, layer, "attention", config)
    n_heads, n_kv, d_k = attention.n_heads, attention.n_kv_heads, attention.head_dim
    projections = {}
    bias = " + b_" if config.bias else ""
    for name, proj, heads in (
        ("query", attention.q_proj, n_heads),
        ("key", attention.k_proj, n_kv),
        ("value", attention.v_proj, n_kv),
    ):
        projections[name] = proj(h)
        letter = name[0].upper()
        add(
            Stage(
                name,
                f"{letter} = X W_{letter}{bias}{letter}, split into {heads} head(s), d_k = {d_k}",
                projections[name][0],
                _head_dims(heads, d_k),
                layer,
                "attention",
            )
        )
    q = attention.split_heads(projections["query"], n_heads)
    k = attention.split_heads(projections["key"], n_kv)
    v = attention.split_heads(projections["value"], n_kv)
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)
    rope = " (q, k rotated by RoPE)" if rotary is not None else ""
    add(
        Stage(
            "scores",
            f"S_h = Q_h K_h^T / sqrt(d_k){rope}, d_k = {d_k}: how well query i fits key j",
            scores[0],
            tokens,
            layer,
            "attention",
        )
    )
    allowed = causal_mask(scores.shape[-2], scores.shape[-1])
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    add(
        Stage(
            "attention_weights",
            "A_h = softmax(S_h + causal mask): row i sums to 1 over words j <= i",
            weights[0],
            tokens,
            layer,
            "attention",
        )
    )
    heads = (weights @ v).transpose(1, 2).flatten(-2)
    add(
        Stage(
            "weighted_values",
            "head_h = A_h V_h, concat(head_1, ..., head_H): each word's mix of the values",
            heads[0],
            _head_dims(n_heads, d_k),
            layer,
            "attention",
        )
    )
    projected = attention.o_proj(heads)
    add(
        Stage(
            "attention_output",
            "MultiHead(X) = concat(heads) W_O + b_O",
            projected[0],
            _dims("d", config.d_model),
            layer,
            "attention",
        )
    )
    return _residual(add, x, projected, block.attention_norm, layer, "attention", config)


def _walk_feed_forward(
    add: AddStage, block: DecoderBlock, x: Tensor, layer: int, config: ModelConfig
) -> Tensor:
    ffn = block.feed_forward
    h = _pre_norm(add, x, block.feed_forward_norm, layer, "feed_forward", config)
    if isinstance(ffn, FeedForward):
        hidden = ffn.activation(ffn.w1(h))
        act = {"relu": "max(0, ", "gelu": "GELU(", "gelu_tanh": "GELU_tanh("}[config.feed_forward]
        formula = f"{act}x W1 + b1): W1 projects up from d_model to d_ff = {config.d_ff}"
        result = ffn.w2(hidden)
        result_formula = "FFN(x) = hidden W2 + b2: W2 projects back down to d_model"
    else:
        hidden = ffn.activation(ffn.gate(h)) * ffn.up(h)
        act = "SiLU" if config.feed_forward == "swiglu" else "GELU"
        formula = f"{act}(gate(x)) * up(x): gate and up project to d_ff = {config.d_ff}"
        result = ffn.down(hidden)
        result_formula = "FFN(x) = down(hidden): back down to d_model"
    add(
        Stage(
            "feed_forward_hidden",
            formula,
            hidden[0],
            _dims("f", config.d_ff),
            layer,
            "feed_forward",
        )
    )
    add(
        Stage(
            "feed_forward",
            result_formula,
            result[0],
            _dims("d", config.d_model),
            layer,
            "feed_forward",
        )
    )
    return _residual(add, x, result, block.feed_forward_norm, layer, "feed_forward", config)


def render_text(walkthrough: Walkthrough, max_columns: int = 10) -> str:
    """The walkthrough as text: per stage a title, its formula and a table, one row per token."""
    config = walkthrough.config
    lines = [
        f"qkv explain: {' '.join(walkthrough.tokens)}",
        f"model: decoder, d_model={config.d_model}, heads={config.n_heads} "
        f"(d_k={config.head_dim}), layers={config.n_layers}, d_ff={config.d_ff}, "
        f"vocabulary={config.vocab_size} words, {'pre' if config.norm_first else 'post'}-norm "
        f"{config.norm}, {config.position} positions, {config.feed_forward} feed-forward; "
        "freshly initialised, untrained",
    ]
    for number, stage in enumerate(walkthrough.stages, start=1):
        where = "" if stage.layer is None else f"  [layer {stage.layer}"
        where += f", {stage.sublayer}]" if stage.sublayer else ("]" if where else "")
        lines += ["", f"{number:2d}. {stage.name}{where}  shape {list(stage.values.shape)}"]
        lines.append(f"    {stage.formula}")
        if stage.values.dim() == 3:
            for h, matrix in enumerate(stage.values):
                lines.append(f"    head {h}:")
                lines += _table(matrix, walkthrough.tokens, stage.columns, max_columns)
        else:
            lines += _table(stage.values, walkthrough.tokens, stage.columns, max_columns)
    lines += ["", _prediction(walkthrough)]
    return "\n".join(lines)


def _prediction(walkthrough: Walkthrough, k: int = 5) -> str:
    last = walkthrough.stage("probabilities").values[-1]
    top = torch.topk(last, min(k, last.numel()))
    best = ", ".join(
        f"{walkthrough.vocabulary[i]} {p:.3f}"
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=False)
    )
    return f"next word after {walkthrough.tokens[-1]!r} (random weights, so a random guess): {best}"


def _table(values: Tensor, rows: list[str], columns: list[str], max_columns: int) -> list[str]:
    shown = list(range(min(len(columns), max_columns)))
    hidden = len(columns) - len(shown)
    label_width = max(len(r) for r in rows)
    width = max(8, *(len(columns[c]) + 1 for c in shown))
    integer = not values.is_floating_point()
    header = " " * (label_width + 4) + "".join(f"{columns[c]:>{width}}" for c in shown)
    lines = [header + (f"   … +{hidden} more" if hidden else "")]
    for row, label in zip(values.tolist(), rows, strict=False):
        cells = "".join(
            f"{row[c]:>{width}d}" if integer else f"{row[c]:>{width}.3f}" for c in shown
        )
        lines.append(f"    {label:<{label_width}}{cells}")
    return lines


def render_json(walkthrough: Walkthrough) -> str:
    return json.dumps(walkthrough.to_json())


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
    import matplotlib.pyplot as plt

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
    import matplotlib

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


@dataclass
class AttentionMaps:
    """A real model's self-attention on one text: weights[layer] is (heads, tokens, tokens),
    row i = how much token i attends to each token j (each row sums to 1)."""

    tokens: list[str]
    token_ids: list[int]
    config: ModelConfig
    weights: list[Tensor]
    next_tokens: list[tuple[str, float]]  # a decoder's likeliest next tokens, with p

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "config": self.config.to_dict(),
            "attention": [w.tolist() for w in self.weights],
            "next_tokens": self.next_tokens,
        }


@torch.no_grad()
def attention_maps(model: nn.Module, tokenizer: Any, text: str) -> AttentionMaps:
    """Run a decoder or encoder on `text` (its tokenizer's model input) and keep every layer's
    attention weights, computed by the explicit formula softmax(Q K^T / sqrt(d_k) + mask)."""
    if model.config.arch == "encoder-decoder":
        raise QkvError("explain --model shows decoder or encoder attention, not encoder-decoder")
    ids = tokenizer.encode_inputs([text])[0]
    if not text.strip() or not ids:
        raise QkvError("the text to explain is empty")
    if len(ids) > min(MAX_WORDS, model.config.max_seq_len):
        raise QkvError(
            f"the text has {len(ids)} tokens; explain shows at most "
            f"{min(MAX_WORDS, model.config.max_seq_len)}"
        )
    layers = [block.self_attention for block in model.blocks]
    for attention in layers:
        attention.recorded = []
    try:
        logits = model(torch.tensor([ids], device=next(model.parameters()).device))
        weights = [attention.recorded[0][0].float().cpu() for attention in layers]
    finally:
        for attention in layers:
            attention.recorded = None
    next_tokens = []
    if isinstance(model, DecoderLM):
        top = torch.topk(probabilities(logits[0, -1]), 5)
        next_tokens = [(tokenizer.decode([i]), p) for p, i in
                       zip(top.values.tolist(), top.indices.tolist(), strict=True)]  # fmt: skip
    tokens = [tokenizer.decode([i]) for i in ids]
    return AttentionMaps(tokens, ids, model.config, weights, next_tokens)


def render_attention(maps: AttentionMaps, head: int | None = None, max_columns: int = 16) -> str:
    """Per layer, the attention table (rows: tokens attending; columns: tokens attended to) of
    one head, or the mean over heads."""
    config = maps.config
    shown = [repr(t)[1:-1] or "·" for t in maps.tokens]
    lines = [
        f"qkv explain: {len(maps.tokens)} tokens: {' | '.join(shown)}",
        f"model: {config.arch}, d_model={config.d_model}, heads={config.n_heads}, "
        f"layers={config.n_layers}",
        "attention weights A = softmax(Q K^T / sqrt(d_k) + mask): row i sums to 1 over the "
        "tokens it attends to" + (" (j <= i: causal)" if config.arch == "decoder" else ""),
    ]
    for layer, weights in enumerate(maps.weights):
        which = "mean over heads" if head is None else f"head {head}"
        matrix = weights.mean(0) if head is None else weights[head]
        lines += ["", f"layer {layer} ({which}):"]
        lines += _table(matrix, shown, shown, max_columns)
    if maps.next_tokens:
        best = ", ".join(f"{t!r} {p:.3f}" for t, p in maps.next_tokens)
        lines += ["", f"next token after the text: {best}"]
    return "\n".join(lines)
