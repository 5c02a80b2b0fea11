"""Encoders from Hugging Face directories: BERT hidden states as transformers computes them, and
the real all-MiniLM-L6-v2 weights giving sentence-transformers' embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cli_generate import qkv
from test_hf import TOLERANCE, hf_tokenizer, padded_batch

from qkv.checkpoint import load_model
from qkv.embed import embed

SENTENCES = [
    "A man is eating food.",
    "Someone eats.",
    "The new movie is awesome, and I would watch it again tomorrow with all of my friends!",
    "qkv",
]


@pytest.fixture(scope="module")
def reference(minilm: Path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm), device="cpu")
    return torch.as_tensor(model.encode(SENTENCES, convert_to_numpy=True))


def test_minilm_embeddings_match_sentence_transformers(minilm: Path, reference) -> None:
    model, tokenizer = load_model(minilm)
    assert model.config.arch == "encoder" and model.config.type_vocab_size == 2
    ours = embed(model, tokenizer, SENTENCES, max_tokens=256)
    assert ours.shape == reference.shape == (4, 384)
    assert (ours - reference).abs().max() <= 1e-5
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(4))


def test_minilm_through_its_vocab_txt_alone(minilm: Path, reference, tmp_path: Path) -> None:
    folder = tmp_path / "minilm"
    shutil.copytree(minilm, folder)
    (folder / "tokenizer.json").unlink()
    model, tokenizer = load_model(folder)
    assert (embed(model, tokenizer, SENTENCES, max_tokens=256) - reference).abs().max() <= 1e-5


def test_qkv_embed_prints_the_vectors_as_json(minilm: Path, reference) -> None:
    result = qkv("embed", "--model", str(minilm), "--json", *SENTENCES[:2])
    assert result.returncode == 0, result.stderr
    vectors = torch.tensor(json.loads(result.stdout))
    assert (vectors - reference[:2]).abs().max() <= 1e-5
    assert "float32 (auto: stored in float32)" in result.stderr


@pytest.mark.slow
def test_qkv_embed_and_explain_run_in_the_dtype_asked(minilm: Path, reference) -> None:
    from transformers import BertModel

    result = qkv("embed", "--model", str(minilm), "--json", "--dtype", "bfloat16", *SENTENCES[:2])
    assert result.returncode == 0, result.stderr
    assert "bfloat16 (as asked)" in result.stderr
    vectors = torch.tensor(json.loads(result.stdout))
    assert 1e-4 < (vectors - reference[:2]).abs().max() <= 2e-2  # bfloat16's 8 mantissa bits
    explained = qkv("explain", "--model", str(minilm), "--json", "--dtype", "bfloat16", "The fox")
    assert explained.returncode == 0, explained.stderr
    walkthrough = json.loads(explained.stdout)
    weights = next(s for s in walkthrough["stages"] if s["name"] == "attention_weights")
    hf = BertModel.from_pretrained(str(minilm), attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.tensor([walkthrough["token_ids"]]), output_attentions=True)
    assert 1e-4 < (torch.tensor(weights["values"]) - out.attentions[0][0]).abs().max() <= 3e-2
    refused = qkv("explain", "--dtype", "bfloat16")
    assert refused.returncode == 2 and "add --model" in refused.stderr


@torch.no_grad()
def test_bert_hidden_states_match_transformers_on_a_padded_batch(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, eos_token_id=96,
    )  # fmt: skip
    hf = BertModel(config).eval()
    hf.save_pretrained(tmp_path / "bert")
    hf_tokenizer(97).save(str(tmp_path / "bert" / "tokenizer.json"))
    ours, _ = load_model(tmp_path / "bert")
    ids, mask, _ = padded_batch(97)
    ids, mask = ids.flip(1), mask.flip(1)  # BERT pads on the right
    types = (torch.arange(12) >= 6).long().expand(3, -1)
    expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    actual = ours.hidden_states(ids, mask, types)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max() <= TOLERANCE


def test_embed_needs_an_encoder(tmp_path: Path, qkv_here) -> None:
    from test_cli_generate import checkpoint

    result = qkv_here("embed", "--model", str(checkpoint(tmp_path / "d", "decoder")), "hello")
    assert result.returncode == 2 and "need an encoder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@torch.no_grad()
def test_explain_shows_minilms_attention_as_transformers_computes_it(minilm: Path) -> None:
    from transformers import BertModel

    result = qkv("explain", "--model", str(minilm), "--json", "The quick brown fox")
    assert result.returncode == 0, result.stderr
    walkthrough = json.loads(result.stdout)
    assert walkthrough["tokens"] == ["[CLS]", "the", "quick", "brown", "fox", "[SEP]"]
    hf = BertModel.from_pretrained(str(minilm), attn_implementation="eager").eval()
    out = hf(torch.tensor([walkthrough["token_ids"]]), output_attentions=True)
    weights = [s for s in walkthrough["stages"] if s["name"] == "attention_weights"]
    assert [s["layer"] for s in weights] == list(range(6)) and len(out.attentions) == 6
    for ours, theirs in zip(weights, out.attentions, strict=True):
        assert (torch.tensor(ours["values"]) - theirs[0]).abs().max() <= 1e-5
    last = [s for s in walkthrough["stages"] if s["name"] == "layer_norm" and s["layer"] == 5][-1]
    assert (torch.tensor(last["values"]) - out.last_hidden_state[0]).abs().max() <= 1e-5
    text = qkv("explain", "--model", str(minilm), "--layer", "5", "--head", "3", "The fox")
    assert text.returncode == 0 and "[layer 5, attention]" in text.stdout
    assert "head 3:" in text.stdout and "[layer 4" not in text.stdout
