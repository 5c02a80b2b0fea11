"""The walkthrough as text: what `qkv explain` prints, stage by stage, as tables."""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.explain.capture import VOCABULARY_WIDE, Stage, Walkthrough

MAX_HEADS_SHOWN = 4  # render_text prints every head up to this many, else head 0 unless asked


def render_text(
    walkthrough: Walkthrough,
    layer: int | None = None,
    head: int | None = None,
    max_columns: int = 10,
) -> str:
    """The walkthrough as text: per stage a title, its formula and a table, one row per token.

    `layer` keeps one block's stages (and those outside the blocks); `head` shows one head's
    matrices and columns. By default every layer, and every head up to MAX_HEADS_SHOWN heads,
    else head 0; at most `max_columns` columns per table, vocabulary-wide tables as top 5.
    """
    config = walkthrough.config
    check_choices(config, layer, head)
    labels = [_label(t) for t in walkthrough.tokens]
    if head is not None:
        heads, which = [head], f"head {head} of {config.n_heads}"
    elif config.n_heads <= MAX_HEADS_SHOWN:
        heads, which = list(range(config.n_heads)), f"all {config.n_heads} heads"
    else:
        heads, which = [0], f"head 0 of {config.n_heads} (choose another with the head option)"
    layers = "every layer" if layer is None else f"layer {layer} of {config.n_layers}"
    lines = [
        f"qkv explain: {len(labels)} tokens: {' | '.join(labels)}",
        *(
            [f"source (the encoder's rows): {' | '.join(map(_label, walkthrough.source))}"]
            if walkthrough.source is not None
            else []
        ),
        f"model: {describe(config)}",
        "weights: " + ("freshly initialised, untrained" if walkthrough.untrained else "as loaded"),
    ]
    if config.n_kv_heads < config.n_heads:
        group = config.n_heads // config.n_kv_heads
        lines.append(
            f"grouped-query attention: {config.n_kv_heads} key/value heads, each shared by "
            f"{group} query heads (query head h reads key/value head h // {group})"
        )
    lines.append(f"showing {layers}, {which}, at most {max_columns} columns per table")
    for number, stage in enumerate(walkthrough.stages, start=1):
        if layer is not None and stage.layer not in (None, layer):
            continue
        where = "" if stage.layer is None else f"  [{stage.stack or 'layer'} {stage.layer}"
        where = f"  [{stage.stack}" if stage.layer is None and stage.stack else where
        where += f", {stage.sublayer}]" if stage.sublayer else ("]" if where else "")
        lines += ["", f"{number:2d}. {stage.name}{where}  shape {list(stage.values.shape)}"]
        lines.append(f"    {stage.formula}")
        rows = labels if stage.rows is None else [_label(t) for t in stage.rows]
        lines += _stage_tables(stage, rows, heads, config.n_heads, max_columns)
    prediction = _prediction(walkthrough)
    if prediction:
        lines += ["", prediction]
    return "\n".join(lines)


def check_choices(config: ModelConfig, layer: int | None, head: int | None) -> None:
    """A --layer and --head the model has (None: all)."""
    for name, value, count in (("layer", layer, config.n_layers), ("head", head, config.n_heads)):
        if value is not None and not 0 <= value < count:
            raise QkvError(
                f"--{name} must be in 0..{count - 1} (the model has {count} {name}s); got {value}"
            )


def _label(token: str) -> str:
    """A token as printed: escapes shown (\\n), a space as ·, an empty one as ∅."""
    return repr(token)[1:-1].replace(" ", "·") or "∅"


def describe(config: ModelConfig) -> str:
    local = "" if config.rope_local_base is None else f", sliding layers {config.rope_local_base:g}"
    base = {"sinusoidal": " (base 10000)", "rope": f" (base {config.rope_base:g}{local})"}
    kv = f", kv_heads={config.n_kv_heads}" if config.n_kv_heads < config.n_heads else ""
    placement = "pre- and post" if config.post_norms else "pre" if config.norm_first else "post"
    window = ""
    if config.sliding_window is not None:
        layers = (
            "every layer" if config.sliding_layers is None else f"layers {config.sliding_layers}"
        )
        window = f"; a window of {config.sliding_window} keys on {layers}"
    capped = "" if config.attention_softcap is None else "; scores soft-capped"
    return (
        f"{config.arch}, d_model={config.d_model}, heads={config.n_heads}{kv} "
        f"(d_k={config.head_dim}), layers={config.n_layers}, d_ff={config.d_ff}, "
        f"vocabulary={config.vocab_size} tokens, {placement}-norm {config.norm}, "
        f"{config.position} positions{base.get(config.position, '')}, "
        f"{config.feed_forward} feed-forward"
        + (
            f", causal attention (token i sees j <= i{window}{capped})"
            if config.arch == "decoder"
            else ""
        )
    )


def _stage_tables(
    stage: Stage, labels: list[str], heads: list[int], n_heads: int, max_columns: int
) -> list[str]:
    """The stage's tables: one per shown head for (heads, tokens, tokens) stages; the shown
    heads' columns of a per-head stage; the top 5 per token of a vocabulary-wide one."""
    values, columns = stage.values, stage.columns
    if values.dim() == 3:
        lines = []
        for h in heads:
            lines.append(f"    head {h}:")
            lines += _table(values[h], labels, [_label(c) for c in columns], max_columns)
        return lines
    if stage.heads is not None and len(heads) < n_heads:
        width = values.shape[-1] // stage.heads
        own = sorted({h * stage.heads // n_heads for h in heads})  # a key/value head per group
        keep = [h * width + i for h in own for i in range(width)]
        values, columns = values[:, keep], [columns[c] for c in keep]
    if stage.name in VOCABULARY_WIDE and len(columns) > max_columns:
        return _top_table(values, labels, columns)
    return _table(values, labels, columns, max_columns)


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


def _top_table(values: Tensor, rows: list[str], vocabulary: list[str], k: int = 5) -> list[str]:
    """Per token, the k largest entries of a vocabulary-wide row, as token value pairs."""
    label_width = max(len(r) for r in rows)
    lines = [f"    (the {k} largest of {len(vocabulary)} per token)"]
    top = torch.topk(values, min(k, values.shape[-1]))
    for label, scores, ids in zip(rows, top.values.tolist(), top.indices.tolist(), strict=True):
        cells = "  ".join(
            f"{_label(vocabulary[i])} {s:.3f}" for s, i in zip(scores, ids, strict=True)
        )
        lines.append(f"    {label:<{label_width}}  {cells}")
    return lines


def _prediction(walkthrough: Walkthrough, k: int = 5) -> str:
    """A decoder's likeliest next tokens after the text ("" for an encoder)."""
    if walkthrough.config.arch == "encoder":
        return ""
    last = walkthrough.stage("probabilities").values[-1]
    top = torch.topk(last, min(k, last.numel()))
    pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
    if walkthrough.untrained:
        best = ", ".join(f"{walkthrough.vocabulary[i]} {p:.3f}" for p, i in pairs)
        return (
            f"next word after {walkthrough.tokens[-1]!r} (random weights, so a random guess): "
            f"{best}"
        )
    best = ", ".join(f"{walkthrough.vocabulary[i]!r} {p:.3f}" for p, i in pairs)
    return f"next token after {walkthrough.tokens[-1]!r}: {best}"
