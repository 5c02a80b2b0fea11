"""The walkthrough's capture: a text through a model, stage by stage, every number kept.

The stages are what the model's own modules recorded during one forward pass (qkv.nn.recording),
each with the formula its module states; nothing here computes a stage a second time.
`explain_text` builds the notes' worked example (word tokens, a freshly initialised seeded decoder
with d_model = 4); `explain_model` walks any decoder, encoder or encoder-decoder, such as a
trained checkpoint or a Hugging Face GPT-2, Llama or BERT directory loaded by
qkv.checkpoint.load_model; `walk` adds the logit lens, the logits and the probabilities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from qkv.checkpoint import load_for_inference
from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.generate import greedy_decode
from qkv.model import PROBABILITIES_FORMULA, DecoderLM, Encoder, EncoderDecoder, probabilities
from qkv.nn.recording import Record, recording
from qkv.tokenizer import Tokenizer

NOTES_SENTENCE = "The quick brown fox jumps over the lazy dog"
MAX_WORDS = 512
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
# Stages with one column per vocabulary token: shown as each token's top entries.
VOCABULARY_WIDE = {"logits", "probabilities", "logit_lens"}
LENS_FORMULA = (
    "lens_l = softmax(head({read})): block l's output h_l read by the model's own {by}, as if "
    "the model ended there (the last block's is the prediction itself)"
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
