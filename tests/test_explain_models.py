"""explain_model on real models: each recorded stage is what its module computes from the recorded
input, and Hugging Face's GPT-2, Llama (grouped-query) and BERT compute the same hidden states,
attention weights and logits as the walkthrough shows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers
from torch import Tensor
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from qkv.checkpoint import load_model
from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.explain import Walkthrough, explain_model, render_json, render_text
from qkv.model import DecoderLM, Encoder, EncoderDecoder, build_model
from qkv.nn.block import DecoderBlock, EncoderBlock
from qkv.nn.feedforward import FeedForward
from qkv.nn.position import apply_rotary
from qkv.tokenizer import Tokenizer

TOLERANCE = 1e-5
VOCAB = 97
TEXT = "w1 w5 w9 w3 w7 w2"
SENTENCE = "the quick brown fox jumps over the lazy dog"

HF_MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                   eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 1)
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_theta=500.0, eos_token_id=VOCAB - 1, bos_token_id=None,
                    pad_token_id=None)
    ),
    "bert": lambda: BertModel(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, eos_token_id=VOCAB - 1)
    ),
}  # fmt: skip
# The stage Hugging Face's hidden_states[0] is: what the first block reads.
FIRST_BLOCK_INPUT = {
    "gpt2": "embeddings_plus_positions",
    "llama": "embeddings",
    "bert": "embedding_norm",
}
QKV_MODELS = {
    "decoder-post-norm-sinusoidal-relu": dict(
        position="sinusoidal", norm_first=False, feed_forward="relu", n_heads=2
    ),
    "decoder-rope-gqa-swiglu-untied": dict(
        position="rope", norm="rmsnorm", feed_forward="swiglu", n_heads=8, n_kv_heads=2,
        bias=False, tie_embeddings=False,
    ),
    "encoder-learned-post-norm-gelu": dict(
        arch="encoder", norm_first=False, type_vocab_size=2, embedding_norm=True
    ),
}  # fmt: skip


def word_tokenizer(folder: Path) -> None:
    """tokenizer.json: words w0 .. w95 and </s>, split at spaces."""
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"</s>": VOCAB - 1}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["</s>"])
    backend.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family, random-init, saved with save_pretrained beside a word-level tokenizer."""
    folders = {}
    for family, make in HF_MODELS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        make().save_pretrained(folder)
        word_tokenizer(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module", params=list(HF_MODELS))
def hf_case(request: pytest.FixtureRequest, hf_folders: dict[str, Path]):
    """(family, transformers model with eager attention, our model loaded, its walkthrough)."""
    folder = hf_folders[request.param]
    theirs = type(HF_MODELS[request.param]()).from_pretrained(folder, attn_implementation="eager")
    ours, tokenizer = load_model(folder)
    return request.param, theirs.eval(), ours, explain_model(ours, tokenizer, TEXT)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe([SENTENCE] * 4, vocab_size=300)


@pytest.fixture(scope="module", params=list(QKV_MODELS))
def qkv_case(request: pytest.FixtureRequest, bpe: Tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=bpe.vocab_size, d_model=32, n_layers=2, d_ff=48, max_seq_len=64,
        **QKV_MODELS[request.param],
    )  # fmt: skip
    model = build_model(config).eval()
    return model, explain_model(model, bpe, SENTENCE)


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected.detach().float(), atol=TOLERANCE, rtol=0)


def heads(columns: Tensor, n_heads: int) -> Tensor:
    """(seq, n_heads * d_k), heads side by side -> (1, n_heads, seq, d_k)."""
    return columns.unflatten(-1, (n_heads, -1)).transpose(0, 1)[None]


def side_by_side(x: Tensor) -> Tensor:
    """(1, n_heads, seq, d_k) -> (seq, n_heads * d_k)."""
    return x[0].transpose(0, 1).flatten(-2)


def check_block(
    block: DecoderBlock | EncoderBlock,
    layer: int,
    w: Walkthrough,
    x: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    causal: bool,
) -> Tensor:
    """Each stage of one block against the block's own modules fed the recorded input x
    (seq, d_model); returns the block's recorded output."""

    def stage(name: str, sublayer: str = "attention") -> Tensor:
        return w.stage(name, layer, sublayer).values

    block_input = x
    attention = block.self_attention
    n, n_kv, d_k = attention.n_heads, attention.n_kv_heads, attention.head_dim
    group = n // n_kv
    h = x
    if block.norm_first:
        h = stage("layer_norm")
        close(h, block.attention_norm(x))
    close(stage("query"), attention.q_proj(h))
    close(stage("key"), attention.k_proj(h))
    close(stage("value"), attention.v_proj(h))
    assert stage("key").shape == (len(w.tokens), n_kv * d_k)
    q, k = heads(stage("query"), n), heads(stage("key"), n_kv)
    if rotary is not None:
        close(stage("rotated_query"), side_by_side(apply_rotary(q, *rotary)))
        close(stage("rotated_key"), side_by_side(apply_rotary(k, *rotary)))
        q, k = heads(stage("rotated_query"), n), heads(stage("rotated_key"), n_kv)
    scores = q @ k.repeat_interleave(group, 1).transpose(-2, -1) / math.sqrt(d_k)
    close(stage("scores"), scores[0])
    out, weights = attention(h[None], is_causal=causal, rotary=rotary, need_weights=True)
    close(stage("attention_weights"), weights[0])
    values = heads(stage("value"), n_kv).repeat_interleave(group, 1)
    close(stage("weighted_values"), side_by_side(stage("attention_weights")[None] @ values))
    close(stage("attention_output"), out[0])
    close(stage("residual"), x + stage("attention_output"))
    x = stage("residual")
    if not block.norm_first:
        close(stage("layer_norm"), block.attention_norm(x))
        x = stage("layer_norm")

    ffn = block.feed_forward
    h = x
    if block.norm_first:
        h = stage("layer_norm", "feed_forward")
        close(h, block.feed_forward_norm(x))
    if isinstance(ffn, FeedForward):
        hidden = ffn.activation(ffn.w1(h))
    else:
        hidden = ffn.activation(ffn.gate(h)) * ffn.up(h)
    close(stage("feed_forward_hidden", "feed_forward"), hidden)
    close(stage("feed_forward", "feed_forward"), ffn(h))
    close(stage("residual", "feed_forward"), x + stage("feed_forward", "feed_forward"))
    x = stage("residual", "feed_forward")
    if not block.norm_first:
        close(stage("layer_norm", "feed_forward"), block.feed_forward_norm(x))
        x = stage("layer_norm", "feed_forward")
    options = {"is_causal": True} if causal else {}
    close(x, block(block_input[None], rotary=rotary, **options)[0])
    return x


@torch.no_grad()
def check_stages(model: DecoderLM | Encoder, w: Walkthrough) -> None:
    """Every stage against the module computing it, fed the stage before; logits against
    model(ids)."""
    ids = torch.tensor([w.token_ids])
    positions = torch.arange(ids.shape[1])[None]
    embedder = model.embedder
    close(w.stage("embeddings").values, embedder.token_embedding(ids)[0])
    x = w.stage("embeddings").values
    rotary = None
    if embedder.rotary is not None:
        close(w.stage("positional_encoding").values, embedder.rotary.angles(positions)[0])
        rotary = embedder.rotary(positions)
    if embedder.position is not None:
        close(w.stage("positional_encoding").values, embedder.position(positions)[0])
        x = x + w.stage("positional_encoding").values
    if embedder.token_type is not None:
        types = w.stage("token_type_embeddings").values
        close(types, embedder.token_type(torch.zeros_like(ids))[0])
        x = x + types
    if embedder.position is not None or embedder.token_type is not None:
        close(w.stage("embeddings_plus_positions").values, x)
        x = w.stage("embeddings_plus_positions").values
    if embedder.norm is not None:
        close(w.stage("embedding_norm").values, embedder.norm(x))
        x = w.stage("embedding_norm").values
    causal = isinstance(model, DecoderLM)
    for layer, block in enumerate(model.blocks):
        x = check_block(block, layer, w, x, rotary, causal)
    if model.config.final_norm:
        close(w.stage("final_norm").values, model.final_norm(x))
        x = w.stage("final_norm").values
    logits = w.stage("logits").values
    close(logits, model.head(x))
    close(logits, model(ids)[0])
    close(w.stage("probabilities").values, torch.softmax(model(ids)[0], dim=-1))
    assert [s.name for s in w.stages][-2:] == ["logits", "probabilities"]


def test_every_stage_of_a_qkv_model_is_what_its_module_computes(qkv_case) -> None:
    check_stages(*qkv_case)


def test_every_stage_of_a_hugging_face_model_is_what_its_module_computes(hf_case) -> None:
    _, _, ours, w = hf_case
    check_stages(ours, w)


@torch.no_grad()
def test_transformers_compute_the_hidden_states_attention_and_logits_shown(hf_case) -> None:
    family, theirs, ours, w = hf_case
    out = theirs(torch.tensor([w.token_ids]), output_hidden_states=True, output_attentions=True)
    config = ours.config
    outputs = [
        w.stage("residual" if config.norm_first else "layer_norm", layer, "feed_forward").values
        for layer in range(config.n_layers)
    ]
    shown = [w.stage(FIRST_BLOCK_INPUT[family]).values, *outputs]
    if config.final_norm:  # transformers' last hidden state is after the final norm
        shown[-1] = w.stage("final_norm").values
    assert len(out.hidden_states) == len(shown) == config.n_layers + 1
    for ours_, theirs_ in zip(shown, out.hidden_states, strict=True):
        close(ours_, theirs_[0])
    assert len(out.attentions) == config.n_layers
    for layer, weights in enumerate(out.attentions):
        close(w.stage("attention_weights", layer).values, weights[0])
    if family != "bert":  # BertModel has no head; ours is h E^T, checked against model(ids)
        close(w.stage("logits").values, out.logits[0])


@pytest.mark.parametrize("hf_case", ["llama"], indirect=True)
def test_grouped_query_keys_keep_their_heads_and_say_how_they_are_shared(hf_case) -> None:
    _, _, ours, w = hf_case
    d_k = ours.config.head_dim
    assert w.stage("query", 0).values.shape == (6, 4 * d_k)
    assert w.stage("key", 0).values.shape == w.stage("value", 0).values.shape == (6, 2 * d_k)
    assert w.stage("attention_weights", 0).values.shape == (4, 6, 6)
    text = render_text(w, layer=0, head=3)
    assert "2 key/value heads, each shared by 2 query heads" in text
    key = text.split(". key  [layer 0")[1].split("\n\n")[0]
    assert "h1.0" in key and "h0.0" not in key  # query head 3 reads key head 3 // 2 = 1


def test_render_text_shows_the_chosen_layer_and_head(qkv_case) -> None:
    model, w = qkv_case
    n_heads = model.config.n_heads
    full = render_text(w)
    assert "[layer 0" in full and "[layer 1" in full and "softmax" in full
    assert (f"all {n_heads} heads" if n_heads <= 4 else f"head 0 of {n_heads}") in full
    chosen = render_text(w, layer=1, head=1)
    assert "[layer 0" not in chosen and "[layer 1" in chosen
    assert "head 1:" in chosen and "head 0:" not in chosen
    assert "logits" in chosen and "embeddings" in chosen
    with pytest.raises(QkvError, match=r"layer must be in 0\.\.1"):
        render_text(w, layer=2)
    with pytest.raises(QkvError, match="head must be in"):
        render_text(w, head=n_heads)


def test_tokens_are_shown_as_the_text_they_decode_to(qkv_case, bpe: Tokenizer) -> None:
    _, w = qkv_case
    assert "".join(w.tokens) == SENTENCE
    assert not any("Ġ" in t for t in w.tokens)
    assert " quick" in w.tokens or " q" in w.tokens
    assert "·quick" in render_text(w) or "·q" in render_text(w)
    assert w.vocabulary[w.token_ids[1]] == w.tokens[1]


def test_json_keeps_the_walkthrough_shape(hf_case) -> None:
    _, _, ours, w = hf_case
    data = json.loads(render_json(w))
    assert set(data) == {
        "tokens", "token_ids", "vocabulary", "config", "stages", "description", "untrained",
        "layers", "heads", "residual_stream",
    } | ({"next_token"} if ours.config.arch == "decoder" else set())  # fmt: skip
    assert data["tokens"] == TEXT.split() and data["config"]["n_layers"] == 2
    weights = [s for s in data["stages"] if s["name"] == "attention_weights"]
    assert [s["layer"] for s in weights] == [0, 1]
    assert weights[0]["shape"] == [ours.config.n_heads, 6, 6]
    for stage in data["stages"]:
        assert {"name", "formula", "shape", "values"} <= set(stage)
        assert torch.tensor(stage["values"]).shape == tuple(stage["shape"])


def test_explain_model_refuses_texts_it_cannot_show(bpe: Tokenizer) -> None:
    config = ModelConfig(arch="encoder-decoder", vocab_size=bpe.vocab_size, d_model=8, n_heads=2,
                         n_layers=1, max_seq_len=4)  # fmt: skip
    with pytest.raises(QkvError, match="at most 4"):
        explain_model(EncoderDecoder(config), bpe, SENTENCE)
    written = explain_model(EncoderDecoder(config), bpe, "the")  # its target fits the window too
    assert len(written.tokens) <= 4
    decoder = DecoderLM(config.replace(arch="decoder"))
    with pytest.raises(QkvError, match="at most 4"):
        explain_model(decoder, bpe, SENTENCE)
    with pytest.raises(QkvError, match="empty"):
        explain_model(decoder, bpe, "  ")


def test_the_logit_lens_reads_each_layer_as_transformers_hidden_states_do(hf_case) -> None:
    """lens_l = softmax(head(final_norm(h_l))): transformers' hidden_states[l + 1] through its
    own final norm and LM head; the last layer's (already normed there) is the prediction."""
    family, theirs, ours, w = hf_case
    lens = [s for s in w.stages if s.name == "logit_lens"]
    if family == "bert":
        assert not lens  # an encoder predicts no next token
        return
    ids = torch.tensor([w.token_ids])
    with torch.no_grad():
        out = theirs(ids, output_hidden_states=True)
        norm = theirs.transformer.ln_f if family == "gpt2" else theirs.model.norm
        layers = ours.config.n_layers
        assert [s.layer for s in lens] == list(range(layers))
        for layer, stage in enumerate(lens):
            hidden = out.hidden_states[layer + 1]
            logits = out.logits if layer == layers - 1 else theirs.lm_head(norm(hidden))
            close(stage.values, torch.softmax(logits[0], dim=-1))
    close(lens[-1].values, w.stage("probabilities").values)
