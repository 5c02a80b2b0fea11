"""The walkthrough as JSON: what `qkv explain --json` prints and POST /v1/explain returns; the
next-token distribution under a sampling rule and the residual stream's size."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from qkv.errors import QkvError
from qkv.explain.budget import check_selection
from qkv.explain.capture import VOCABULARY_WIDE, Stage, Walkthrough
from qkv.explain.render import describe
from qkv.sampling import PLAIN, SamplingConfig, distribution, select

DECIMALS = 6  # places kept in JSON: below what any tolerance or panel shows
# The embedder's stages, in order; the last one present is what enters the first block.
ENTERING = ("embeddings", "embeddings_plus_positions", "embedding_norm")
NEXT_FORMULA = (
    "p = softmax(top-p(top-k(logits / T))) of the last token's logits, after the repetition "
    "penalty: what /v1/completions samples from (T = 0: all on the argmax)"
)
RESIDUAL_FORMULA = (
    "‖x_i‖ = sqrt(sum_d x_id^2); mean and std over token i's d_model values: what the next "
    "LayerNorm subtracts and divides by (RMSNorm divides by sqrt(mean(x^2)))"
)


def render_json(walkthrough: Walkthrough, **limits: Any) -> str:
    return json.dumps(payload(walkthrough, **limits))


def payload(
    walkthrough: Walkthrough,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    top: int | None = None,
    sampling: SamplingConfig = PLAIN,
    seed: int | None = None,
) -> dict[str, Any]:
    """What `qkv explain --json` prints and POST /v1/explain returns: every stage (only those
    of `layers`, and of `heads`, when given; the logit lens always covers every layer), a
    vocabulary-wide stage as each token's `top` entries when `top` is given (else in full, with
    the vocabulary), the residual stream's size after each sublayer and, for a decoder, the
    next-token distribution under `sampling` (with one token drawn when a `seed` is given)."""
    config = walkthrough.config
    check_selection(config, layers, heads)
    shown = [
        s
        for s in walkthrough.stages
        if layers is None or s.layer is None or s.layer in layers or s.name == "logit_lens"
    ]
    data: dict[str, Any] = {
        "tokens": walkthrough.tokens,
        "token_ids": walkthrough.token_ids,
        "config": config.to_dict(),
        "description": describe(config),
        "untrained": walkthrough.untrained,
        "layers": sorted(set(layers)) if layers is not None else list(range(config.n_layers)),
        "heads": sorted(set(heads)) if heads is not None else list(range(config.n_heads)),
        "stages": [_stage_json(s, walkthrough, heads, top) for s in shown],
        "residual_stream": _residual_stream(walkthrough),
    }
    if walkthrough.source is not None:
        data["source"] = walkthrough.source
    if top is None:
        data["vocabulary"] = walkthrough.vocabulary
    if config.arch != "encoder":
        data["next_token"] = next_token(walkthrough, sampling, top or 20, seed)
    return data


def next_token(
    walkthrough: Walkthrough, sampling: SamplingConfig, top: int, seed: int | None = None
) -> dict[str, Any]:
    """The `top` likeliest next tokens under `sampling` (qkv.sampling's own distribution), how
    many tokens can be drawn at all, and, with a `seed`, the token `select` draws."""
    logits = walkthrough.stage("logits").values[-1:]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, walkthrough.token_ids] = True
    probs = distribution(logits, sampling, seen)[0]
    candidates = int((probs > 0).sum())
    best = torch.topk(probs, min(top, candidates))
    sampled = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        token = int(select(logits, sampling, seen, [generator])[0])
        sampled = {"id": token, "text": walkthrough.vocabulary[token]}
    return {
        "formula": NEXT_FORMULA,
        "sampling": {
            "temperature": sampling.temperature,
            "top_k": sampling.top_k or 0,
            "top_p": sampling.top_p,
            "repetition_penalty": sampling.repetition_penalty,
        },
        "ids": best.indices.tolist(),
        "tokens": [walkthrough.vocabulary[i] for i in best.indices.tolist()],
        "probs": _rounded(best.values, "the next-token distribution"),
        "candidates": candidates,
        "sampled": sampled,
    }


def _stage_json(
    stage: Stage, walkthrough: Walkthrough, heads: list[int] | None, top: int | None
) -> dict[str, Any]:
    """One stage as JSON. A per-head stage says which heads it holds (`head_ids`, of
    `heads_total`: key and value stages have the key/value heads, each read by a group of query
    heads); a vocabulary-wide one holds each token's `top` ids, texts and values when asked.
    Numbers are rounded to DECIMALS places."""
    data: dict[str, Any] = {"name": stage.name, "formula": stage.formula}
    for key in ("layer", "sublayer", "stack", "rows"):
        if getattr(stage, key) is not None:
            data[key] = getattr(stage, key)
    values, columns = stage.values, stage.columns
    if values.dim() == 3 or stage.heads is not None:
        total = values.shape[0] if values.dim() == 3 else stage.heads
        n_heads = walkthrough.config.n_heads
        keep = (
            list(range(total)) if heads is None else sorted({h * total // n_heads for h in heads})
        )
        if values.dim() == 3:
            values = values[keep]
        else:
            width = values.shape[-1] // total
            cols = [h * width + i for h in keep for i in range(width)]
            values, columns = values[:, cols], [columns[c] for c in cols]
        data.update(head_ids=keep, heads_total=total)
    if top is not None and stage.name in VOCABULARY_WIDE:
        best = torch.topk(values, min(top, values.shape[-1]))
        vocabulary = walkthrough.vocabulary
        data["shape"] = list(values.shape)
        data["top"] = {
            "ids": best.indices.tolist(),
            "tokens": [[vocabulary[i] for i in row] for row in best.indices.tolist()],
            "values": _rounded(best.values, _where(stage)),
        }
        return data
    data.update(values=_rounded(values, _where(stage)), columns=columns, shape=list(values.shape))
    return data


def _where(stage: Stage) -> str:
    """A stage as a message names it: 'stage scores (decoder layer 1, cross_attention)'."""
    place = [] if stage.layer is None else [f"{stage.stack or 'layer'} {stage.layer}"]
    place = [stage.stack] if stage.layer is None and stage.stack else place
    place += [stage.sublayer] if stage.sublayer else []
    return f"stage {stage.name}" + (f" ({', '.join(place)})" if place else "")


def _rounded(values: Tensor, what: str) -> list[Any]:
    """A tensor as nested lists; floats rounded to DECIMALS places in float64, so that JSON
    spells them short (0.123457, not float32's 0.12345699965953827). Inf and NaN, which JSON
    cannot hold, are refused with `what` they are in."""
    if not values.is_floating_point():
        return values.tolist()
    if not torch.isfinite(values).all():
        raise QkvError(
            f"{what} holds inf or NaN: the model's numbers overflow on this input, so there is "
            "nothing to show; check its weights (a diverged training run gives these)"
        )
    return values.double().round(decimals=DECIMALS).tolist()


def _residual_stream(walkthrough: Walkthrough) -> dict[str, Any]:
    """Each token's ‖x‖, mean and std where the residual stream enters the first block and
    after every sublayer's residual sum."""
    own = [s for s in walkthrough.stages if s.stack != "encoder"]  # rows: the tokens
    entering = [s for s in own if s.name in ENTERING and s.layer is None]
    points = [("embeddings", entering[-1])] if entering else []
    points += [(f"layer {s.layer} {s.sublayer}", s) for s in own if s.name == "residual"]
    rows = [
        {
            "label": label,
            "norm": _rounded(s.values.norm(dim=-1), f"the residual stream after {label}"),
            "mean": _rounded(s.values.mean(dim=-1), f"the residual stream after {label}"),
            "std": _rounded(
                s.values.std(dim=-1, correction=0), f"the residual stream after {label}"
            ),
        }
        for label, s in points
    ]
    return {"formula": RESIDUAL_FORMULA, "rows": rows}
