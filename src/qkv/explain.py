"""The walkthrough: a text through a model, stage by stage, every number kept.

The stages are what the model's own modules recorded during one forward pass (qkv.nn.recording),
each with the formula its module states; nothing here computes a stage a second time.
`explain_text` builds the notes' worked example (word tokens, a freshly initialised seeded decoder
with d_model = 4); `explain_model` walks any decoder, encoder or encoder-decoder, such as a
trained checkpoint or a Hugging Face GPT-2, Llama or BERT directory loaded by
qkv.checkpoint.load_model.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv.checkpoint import load_for_inference
from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.explain_budget import check_selection
from qkv.generate import greedy_decode
from qkv.model import PROBABILITIES_FORMULA, DecoderLM, Encoder, EncoderDecoder, probabilities
from qkv.nn.recording import Record, recording
from qkv.sampling import PLAIN, SamplingConfig, distribution, select
from qkv.tokenizer import Tokenizer

NOTES_SENTENCE = "The quick brown fox jumps over the lazy dog"
MAX_WORDS = 512
MAX_PLOT_WORDS = 60
MAX_HEADS_SHOWN = 4  # render_text prints every head up to this many, else head 0 unless asked
PLOT_FORMATS = (".png", ".svg", ".pdf")
POSITION_TITLES = {
    "sinusoidal": "positional encoding: sin / cos, base 10000",
    "learned": "learned positional embedding",
    "rope": "RoPE angles (radians) per pair of dimensions",
}
# Records whose module, rather than what it computes, names the stage.
STAGE_OF_MODULE = {
    "embedder.local_rotary": "local_positional_encoding",  # Gemma 3's sliding layers' RoPE
    "embedder.token_type": "token_type_embeddings",
    "embedder.norm": "embedding_norm",
    "final_norm": "final_norm",
    "encoder_norm": "encoder_norm",
    "decoder_norm": "final_norm",
}
BLOCKS = {"blocks": None, "encoder_blocks": "encoder", "decoder_blocks": "decoder"}
MAX_TARGET = 32  # target tokens an encoder-decoder writes for explain
LENS_ROWS = 512  # token rows per logit-lens matmul: layers batched read the head's weight once
# Per-head records (batch, heads, seq, d_k), shown as (seq, heads * d_k): heads side by side.
SIDE_BY_SIDE = {
    "query", "key", "value", "normed_query", "normed_key", "rotated_query", "rotated_key",
    "weighted_values",
}  # fmt: skip
COLUMN_PREFIX = {"feed_forward_hidden": "f"}
DECIMALS = 6  # places kept in JSON: below what any tolerance or panel shows
# The embedder's stages, in order; the last one present is what enters the first block.
ENTERING = ("embeddings", "embeddings_plus_positions", "embedding_norm")
# Stages with one column per vocabulary token: shown as each token's top entries.
VOCABULARY_WIDE = {"logits", "probabilities", "logit_lens"}
LENS_FORMULA = (
    "lens_l = softmax(head({read})): block l's output h_l read by the model's own {by}, as if "
    "the model ended there (the last block's is the prediction itself)"
)
NEXT_FORMULA = (
    "p = softmax(top-p(top-k(logits / T))) of the last token's logits, after the repetition "
    "penalty: what /v1/completions samples from (T = 0: all on the argmax)"
)
RESIDUAL_FORMULA = (
    "‖x_i‖ = sqrt(sum_d x_id^2); mean and std over token i's d_model values: what the next "
    "LayerNorm subtracts and divides by (RMSNorm divides by sqrt(mean(x^2)))"
)


@dataclass
class Stage:
    """One step of the forward pass: its formula and tensor, one row per token.

    `values` is (tokens, columns), or (heads, tokens, tokens) for scores and attention weights;
    `heads` is how many heads sit side by side in the columns of a per-head stage (query, ...).
    """

    name: str
    formula: str
    values: Tensor
    columns: list[str]
    layer: int | None = None
    sublayer: str | None = None
    heads: int | None = None
    stack: str | None = None  # "encoder" or "decoder" in an encoder-decoder
    rows: list[str] | None = None  # its rows' tokens, where not the walkthrough's (the source)


@dataclass
class Walkthrough:
    """A text through a model: its tokens (as text), their ids, vocabulary[id] = the text of
    token id, the model's config, and one Stage per value the modules computed, in order."""

    tokens: list[str]
    token_ids: list[int]
    vocabulary: list[str]
    config: ModelConfig
    stages: list[Stage] = field(default_factory=list)
    untrained: bool = False
    source: list[str] | None = None  # an encoder-decoder's source tokens (tokens: its target)

    def stage(self, name: str, layer: int | None = None, sublayer: str | None = None) -> Stage:
        """The first stage called `name` (in `layer` and `sublayer`, if given)."""
        for s in self.stages:
            if s.name == name and layer in (None, s.layer) and sublayer in (None, s.sublayer):
                return s
        raise KeyError(name)


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
    """The notes' example: word tokens through a fresh post-norm decoder (preset notes-demo),
    small enough to print every number (d_model <= 256, n_layers <= 12)."""
    if d_model > 256 or n_layers > 12:
        raise QkvError("explain prints every number: keep --d-model <= 256 and --layers <= 12")
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
    walkthrough.untrained = True
    formula = "id_i = index of the lower-cased word i in the vocabulary (sorted unique words)"
    walkthrough.stages.insert(
        0, Stage("token_ids", formula, torch.tensor(token_ids)[:, None], ["id"])
    )
    return walkthrough


def explain_checkpoint(path: str | Path, text: str, dtype: str = "auto") -> Walkthrough:
    """`qkv explain --model`: `text` through the model at `path` (a qkv checkpoint or run, or a
    Hugging Face directory) on the CPU in `dtype` (load_for_inference), every stage recorded."""
    model, tokenizer, _ = load_for_inference(path, torch.device("cpu"), dtype)
    return explain_model(model, tokenizer, text)


def explain_model(
    model: DecoderLM | Encoder | EncoderDecoder,
    tokenizer: Tokenizer,
    text: str | None = None,
    token_ids: list[int] | None = None,
) -> Walkthrough:
    """`text` (or `token_ids`) through a decoder, an encoder or an encoder-decoder (trained, or
    loaded from Hugging Face), as the model's tokenizer encodes whole inputs (with BERT's
    [CLS] ... [SEP] where it adds them); an encoder-decoder reads it as its source."""
    if token_ids is None:
        ids = tokenizer.encode_inputs([text])[0] if text and text.strip() else []
    else:
        ids = list(token_ids)
        size = min(tokenizer.vocab_size, model.config.vocab_size)
        if any(not 0 <= i < size for i in ids):
            raise QkvError(f"token ids must be 0 to {size - 1}")
    if not ids:
        raise QkvError("the text to explain is empty; give a sentence")
    limit = min(MAX_WORDS, model.config.max_seq_len)
    if len(ids) > limit:
        raise QkvError(f"the text has {len(ids)} tokens; explain shows at most {limit}")
    texts = tokenizer.token_texts()
    tokens = [texts[i] for i in ids]
    vocabulary = texts[: model.config.vocab_size]
    vocabulary += [tokenizer.decode([i]) for i in range(len(vocabulary), model.config.vocab_size)]
    if isinstance(model, EncoderDecoder):
        return _explain_pair(model, tokenizer, ids, tokens, vocabulary)
    walkthrough = walk(model, torch.tensor([ids]), tokens, vocabulary)
    formula = "id_i = the tokenizer's number for token i (its text is id_i decoded alone)"
    walkthrough.stages.insert(0, Stage("token_ids", formula, torch.tensor(ids)[:, None], ["id"]))
    return walkthrough


def _explain_pair(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    source_ids: list[int],
    source: list[str],
    vocabulary: list[str],
) -> Walkthrough:
    """An encoder-decoder reads the source; its decoder reads E and the target it writes itself
    (greedy, at most MAX_TARGET tokens): the encoder's stages have a row per source token, the
    decoder's a row per target token, cross-attention a column per source token."""
    end = tokenizer.end_of_text_id
    device = next(model.parameters()).device
    src = torch.tensor([source_ids], device=device)
    room = min(MAX_TARGET, model.config.max_seq_len - 1)
    written = greedy_decode(model, src, torch.ones_like(src), end, room)[0]
    target_ids = [end, *written]
    tokens = [tokenizer.decode([i]) for i in target_ids]
    walkthrough = walk(model, torch.tensor([target_ids]), tokens, vocabulary, src.cpu(), source)
    formula = "id_i = the tokenizer's number for token i; the target starts with E (end of text)"
    walkthrough.stages.insert(
        0, Stage("token_ids", formula, torch.tensor(source_ids)[:, None], ["id"], stack="encoder",
                 rows=source)
    )  # fmt: skip
    walkthrough.stages.insert(
        1, Stage("token_ids", formula, torch.tensor(target_ids)[:, None], ["id"], stack="decoder")
    )
    return walkthrough


@torch.no_grad()
def walk(
    model: DecoderLM | Encoder | EncoderDecoder,
    token_ids: Tensor,
    tokens: list[str],
    vocabulary: list[str],
    source_ids: Tensor | None = None,
    source: list[str] | None = None,
) -> Walkthrough:
    """Run `model` on one sequence (1, seq) (an encoder-decoder: on `source_ids` too, its
    decoder on token_ids) while its modules record: each record becomes a stage, in the order
    computed; a decoder's logit lens (each block's output through the final norm and the head)
    comes next, then logits and probabilities = softmax(logits)."""
    device = next(model.parameters()).device
    outputs: list[Tensor] = []
    blocks = {DecoderLM: "blocks", EncoderDecoder: "decoder_blocks"}.get(type(model))
    hooks = [
        block.register_forward_hook(lambda _module, _args, out: outputs.append(out))
        for block in (getattr(model, blocks) if blocks else [])
    ]
    try:
        with recording(model) as records:
            if source_ids is None:
                model(token_ids.to(device))
            else:
                model(source_ids.to(device), token_ids.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    out = Walkthrough(tokens, token_ids[0].tolist(), vocabulary, model.config, source=source)
    encoding = max((i for i, r in enumerate(records) if r.module.startswith("encoder")), default=-1)
    out.stages = [
        _stage(r, tokens, vocabulary) if source is None else _pair_stage(r, i <= encoding, out)
        for i, r in enumerate(records)
    ]
    logits = out.stages.pop()  # the head's record: the lens goes before it
    if model.config.final_norm:
        formula = LENS_FORMULA.format(read="final_norm(h_l)", by="final norm and output head")
    else:
        formula = LENS_FORMULA.format(read="h_l", by="output head")
    probs = probabilities(logits.values)
    norm = model.decoder_norm if isinstance(model, EncoderDecoder) else model.final_norm
    stack = logits.stack
    per_call = max(1, LENS_ROWS // token_ids.shape[1])  # layers one head matmul reads at once
    lenses = list(probs[None]) if outputs else []  # the last block: the model's own output
    for end in range(len(outputs) - 1, 0, -per_call):
        chunk = torch.cat(outputs[max(0, end - per_call) : end])
        lenses[:0] = probabilities(model.head(norm(chunk))).unbind()
    for layer, rows in enumerate(lenses):
        lens = Stage("logit_lens", formula, rows.float().cpu(), vocabulary, layer, stack=stack)
        out.stages.append(lens)
    out.stages.append(logits)
    out.stages.append(Stage("probabilities", PROBABILITIES_FORMULA, probs, vocabulary, stack=stack))
    return out


def _pair_stage(record: Record, encoding: bool, walkthrough: Walkthrough) -> Stage:
    """An encoder-decoder's record: the encoder's rows are source tokens, the decoder's target
    tokens; cross-attention's columns (the keys) are the source tokens."""
    source = walkthrough.source or []
    cross = ".cross_attention" in record.module
    keys = source if encoding or cross else walkthrough.tokens
    stage = _stage(record, keys, walkthrough.vocabulary)
    stage.stack = "encoder" if encoding else "decoder"
    if encoding or (cross and record.name in ("key", "value", "rotated_key")):
        stage.rows = source
    return stage


def _stage(record: Record, tokens: list[str], vocabulary: list[str]) -> Stage:
    """A record (of the one sequence in the batch) as a table with one row per token."""
    values = record.value[0].float().cpu()
    name = STAGE_OF_MODULE.get(record.module, record.name)
    layer, sublayer = _place(record)
    heads = None
    if record.name in SIDE_BY_SIDE:
        heads, head_dim = values.shape[0], values.shape[-1]
        values = values.transpose(0, 1).flatten(-2)
        columns = [f"h{h}.{i}" for h in range(heads) for i in range(head_dim)]
    elif values.dim() == 3:
        columns = tokens
    elif name == "logits":
        columns = vocabulary
    else:
        rotary = record.module in ("embedder.rotary", "embedder.local_rotary")
        prefix = "θ" if rotary else COLUMN_PREFIX.get(name, "d")
        columns = [f"{prefix}{i}" for i in range(values.shape[-1])]
    return Stage(name, record.formula, values, columns, layer, sublayer, heads)


def _place(record: Record) -> tuple[int | None, str | None]:
    """Layer and sublayer from the module's name: blocks.2.feed_forward_norm (and Gemma's
    feed_forward_post_norm) -> 2, feed_forward."""
    parts = record.module.split(".")
    if parts[0] not in BLOCKS:
        return None, None
    if len(parts) == 2:
        return int(parts[1]), record.sublayer
    part = parts[2].removesuffix("_norm").removesuffix("_post")
    return int(parts[1]), "attention" if part == "self_attention" else part


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
        f"model: {_describe(config)}",
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


def _describe(config: ModelConfig) -> str:
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
        "description": _describe(config),
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
