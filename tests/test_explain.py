"""The walkthrough: faithful to the model, attention rows sum to 1, positions follow the formula."""

import math

import pytest
import torch

from qkv import ModelConfig, QkvError
from qkv.explain import (
    NOTES_SENTENCE,
    explain_text,
    figure,
    plot,
    render_text,
    walk,
    word_tokens,
)
from qkv.model import DecoderLM
from qkv.nn.attention import MultiHeadAttention
from qkv.nn.feedforward import FeedForward
from qkv.nn.norm import LayerNorm

REQUIRED = {"embeddings", "positional_encoding", "attention_weights", "feed_forward", "layer_norm"}


def test_walkthrough_has_the_notes_stages_in_order():
    w = explain_text()
    names = [s.name for s in w.stages]
    assert REQUIRED | {"probabilities", "query", "key", "value", "scores"} <= set(names)
    order = ["token_ids", "embeddings", "positional_encoding", "embeddings_plus_positions", "query"]
    assert names[: len(order)] == order
    assert names[-2:] == ["logits", "probabilities"]
    assert w.tokens == NOTES_SENTENCE.split()
    assert w.config.d_model == 4
    for stage in w.stages:
        assert stage.values.shape[-2] == len(w.tokens)


def test_walkthrough_logits_equal_the_model_forward():
    for preset_changes in (
        {},
        {
            "norm_first": True,
            "position": "rope",
            "norm": "rmsnorm",
            "feed_forward": "swiglu",
            "n_kv_heads": 1,
            "tie_embeddings": False,
        },
        {"position": "learned", "feed_forward": "gelu", "norm_first": True},
    ):
        torch.manual_seed(1)
        config = ModelConfig.preset(
            "notes-demo", d_model=8, n_heads=2, n_layers=2, **preset_changes
        )
        model = DecoderLM(config).eval()
        ids = torch.randint(0, config.vocab_size, (1, 6))
        w = walk(model, ids, [f"t{i}" for i in range(6)], [f"v{i}" for i in range(16)])
        with torch.no_grad():
            expected = model(ids)[0]
        torch.testing.assert_close(w.stage("logits").values, expected, atol=1e-5, rtol=0)


def test_attention_weights_rows_sum_to_one_and_are_causal():
    w = explain_text(n_layers=2, n_heads=2)
    for layer in range(2):
        weights = w.stage("attention_weights", layer).values
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 9))
        assert (weights.triu(1) == 0).all()


def test_positional_encoding_stage_matches_formula():
    w = explain_text(d_model=6)
    pe = w.stage("positional_encoding").values
    for pos in range(pe.shape[0]):
        for j in range(6):
            angle = pos / 10000 ** (2 * (j // 2) / 6)
            assert (
                abs(pe[pos, j].item() - (math.sin(angle) if j % 2 == 0 else math.cos(angle))) < 1e-6
            )


def test_same_word_shares_an_embedding_but_not_a_position():
    w = explain_text()
    first, second = w.tokens.index("The"), w.tokens.index("the")
    emb = w.stage("embeddings").values
    torch.testing.assert_close(emb[first], emb[second])
    summed = w.stage("embeddings_plus_positions").values
    assert not torch.allclose(summed[first], summed[second])


def test_seed_reproduces_and_changes_weights():
    a, b, c = explain_text(seed=1), explain_text(seed=1), explain_text(seed=2)
    torch.testing.assert_close(a.stage("logits").values, b.stage("logits").values)
    assert not torch.allclose(a.stage("logits").values, c.stage("logits").values)


def test_text_rendering_has_one_row_per_word_and_formulas():
    text = render_text(explain_text("the cat sat"))
    assert "softmax" in text and "sqrt(d_k)" in text and "10000" in text
    assert "next word after 'sat'" in text


def test_word_tokens_split_punctuation():
    assert word_tokens("The dog, lazy.") == ["The", "dog", ",", "lazy", "."]


def test_plot_writes_a_png(tmp_path):
    path = plot(explain_text(n_layers=2), tmp_path / "attention.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text", ["", "   ", "x " * 600])
def test_unusable_text_is_refused(text):
    with pytest.raises(QkvError):
        explain_text(text)


def test_plot_labels_heatmaps_with_the_words():
    w = explain_text("the cat sat on the mat", n_heads=2)
    fig = figure(w)
    titled = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert any(t.startswith("positional encoding") for t in titled)
    head = titled["attention weights, layer 0, head 1"]
    words = ["the", "cat", "sat", "on", "the", "mat"]
    assert [t.get_text() for t in head.get_yticklabels()] == words
    assert [t.get_text() for t in head.get_xticklabels()] == words


def test_rope_walkthrough_shows_unwrapped_angles():
    torch.manual_seed(0)
    config = ModelConfig.preset("notes-demo", position="rope", norm_first=True)
    model = DecoderLM(config).eval()
    w = walk(model, torch.zeros(1, 12, dtype=torch.long), [str(i) for i in range(12)], ["a"] * 16)
    angles = w.stage("positional_encoding").values
    torch.testing.assert_close(angles[:, 0], torch.arange(12, dtype=torch.float32))


def test_explain_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    explain_text(seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


def test_each_formula_is_the_one_its_module_states():
    w = explain_text(d_model=8, n_heads=4)
    attention = MultiHeadAttention.FORMULAS
    scaled = "Q_h K_h^T / sqrt(d_k), d_k = 2"
    for name in ("scores", "attention_weights", "weighted_values", "attention_output"):
        assert w.stage(name).formula == attention[name].format(scaled=scaled, capped="")
    assert w.stage("query").formula == attention["query"].format(n_heads=4, head_dim=2)
    assert w.stage("layer_norm").formula == LayerNorm.FORMULAS["layer_norm"].format(eps=1e-5)
    hidden = FeedForward.FORMULAS["feed_forward_hidden"]
    assert w.stage("feed_forward_hidden").formula == hidden.format(activation_name="relu", d_ff=32)


@pytest.mark.parametrize("lens_rows", [6, 12, 18, 512])  # 1, 2 (uneven), 3 layers a call; all
@torch.no_grad()
def test_logit_lens_is_each_blocks_output_through_final_norm_and_head(monkeypatch, lens_rows):
    import qkv.explain.capture

    monkeypatch.setattr(qkv.explain.capture, "LENS_ROWS", lens_rows)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=5)).eval()
    ids = torch.randint(0, 16, (1, 6))
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for b in model.blocks]
    model(ids)
    for hook in hooks:
        hook.remove()
    w = walk(model, ids, [f"t{i}" for i in range(6)], [f"v{i}" for i in range(16)])
    lens = [s for s in w.stages if s.name == "logit_lens"]
    assert [s.layer for s in lens] == list(range(5))
    for stage, h in zip(lens, outputs, strict=True):
        expected = torch.softmax(model.head(model.final_norm(h)), -1)[0]
        torch.testing.assert_close(stage.values, expected, atol=1e-6, rtol=0)
