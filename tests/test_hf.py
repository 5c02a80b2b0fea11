"""Hugging Face interop: a random-init transformers model and its qkv import compute the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cli_generate import qkv

from qkv.checkpoint import load_model
from qkv.generate import GenerationConfig, decode, positions_of
from qkv.hf import from_gpt2

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, eos_token_id=96,
        bos_token_id=96,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def test_gpt2_logits_match_transformers_on_a_left_padded_batch(gpt2) -> None:
    ours = from_gpt2(gpt2)
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    positions = positions_of(mask)
    expected = gpt2(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    actual = ours(ids, mask, positions)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max() <= TOLERANCE


@torch.no_grad()
def test_gpt2_greedy_tokens_match_transformers_generate(gpt2) -> None:
    ours = from_gpt2(gpt2)
    prompt = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = gpt2.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
        do_sample=False, pad_token_id=0,
    )[0, 6:]  # fmt: skip
    steps = decode(ours, prompt.tolist(), GenerationConfig(temperature=0), pad_id=0)
    tokens = [int(token) for _, (token, _) in zip(range(32), steps, strict=False)]
    assert tokens == expected.tolist()


def hf_tokenizer(vocab_size: int):
    """A word-level tokenizer.json with `vocab_size` entries, the last one "</s>"."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"</s>": vocab_size - 1}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["</s>"])
    return backend


def save_hf(model, folder: Path, **options) -> Path:
    model.save_pretrained(folder, **options)
    hf_tokenizer(model.config.vocab_size).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=96,
        bos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    return model, save_hf(model, tmp_path_factory.mktemp("llama") / "model")


def padded_batch(vocab: int):
    ids = torch.randint(0, vocab - 1, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask, positions_of(mask)


@torch.no_grad()
def test_llama_directory_logits_match_transformers_on_a_left_padded_batch(llama) -> None:
    hf, folder = llama
    ours, tokenizer = load_model(folder)
    assert ours.config.n_kv_heads == 2 and not ours.config.tie_embeddings
    assert ours.config.rope_base == 5000.0 and tokenizer.end_of_text_id == 96
    ids, mask, positions = padded_batch(97)
    expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    actual = ours(ids, mask, positions)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max() <= TOLERANCE


@torch.no_grad()
def test_llama_greedy_tokens_match_transformers_generate(llama) -> None:
    hf, folder = llama
    ours, _ = load_model(folder)
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
        do_sample=False, pad_token_id=0,
    )[0, 6:]  # fmt: skip
    steps = decode(ours, prompt.tolist(), GenerationConfig(temperature=0), pad_id=0)
    tokens = [int(token) for _, (token, _) in zip(range(32), steps, strict=False)]
    assert tokens == expected.tolist()


@torch.no_grad()
def test_gpt2_from_sharded_safetensors_and_from_a_bin_file(gpt2, tmp_path: Path) -> None:
    sharded = save_hf(gpt2, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = save_hf(gpt2, tmp_path / "bin")
    (binary / "model.safetensors").unlink()  # as transformers 4 wrote it: a pickled state dict
    torch.save(gpt2.state_dict(), binary / "pytorch_model.bin")
    ids, mask, positions = padded_batch(97)
    expected = gpt2(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    for folder in (sharded, binary):
        ours, _ = load_model(folder)
        assert (ours(ids, mask, positions)[real] - expected[real]).abs().max() <= TOLERANCE


class Payload:
    """Stands for whatever a malicious pickle would construct."""


def test_a_bin_file_with_pickled_objects_is_refused(gpt2, tmp_path: Path) -> None:
    folder = save_hf(gpt2, tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    torch.save({"wte.weight": torch.zeros(2), "payload": Payload()}, folder / "pytorch_model.bin")
    result = qkv("generate", "--model", str(folder), "w1")
    assert result.returncode == 2 and "refusing it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_qkv_generate_runs_a_hugging_face_directory(llama) -> None:
    hf, folder = llama
    result = qkv("generate", "--model", str(folder), "w5 w7 w11", "--temperature", "0",
                 "--max-new-tokens", "8", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    prompt = torch.tensor([[5, 7, 11]])
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                               do_sample=False, pad_token_id=0)[0, 3:].tolist()  # fmt: skip
    if 96 in expected:
        expected = expected[: expected.index(96)]
    assert json.loads(result.stdout)["token_ids"] == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", "has no tensor 'model.layers.1.mlp.up_proj.weight'"),
        ("shape", "feed_forward.gate.weight has shape [96, 64] but config.json needs [80, 64]"),
        ("type", "model_type 'mamba' is not supported"),
        ("corrupt", "model.safetensors is corrupt ("),
    ],
)
def test_a_broken_directory_gets_one_clear_message(
    llama, tmp_path: Path, change, message, qkv_here
) -> None:
    from safetensors.torch import load_file, save_file

    _, source = llama
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    if change == "missing":
        tensors = load_file(folder / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    elif change == "shape":
        config["intermediate_size"] = 80
    elif change == "corrupt":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    result = qkv_here("generate", "--model", str(folder), "w1")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


LLAMA_SHAPE = {"position": "rope", "norm": "rmsnorm", "feed_forward": "swiglu", "bias": False}
GEMMA_SHAPE = LLAMA_SHAPE | {"feed_forward": "geglu_tanh", "norm_unit_offset": True,
                             "post_norms": True, "scale_embeddings": True, "head_dim": 12,
                             "n_kv_heads": 2}  # fmt: skip


EXPORTED = [
    ({"position": "learned", "feed_forward": "gelu"}, "GPT2LMHeadModel"),
    ({"position": "learned", "feed_forward": "gelu_tanh", "tie_embeddings": False},
     "GPT2LMHeadModel"),
    (LLAMA_SHAPE | {"n_kv_heads": 2, "tie_embeddings": False, "rope_base": 500.0},
     "LlamaForCausalLM"),  # GQA
    (LLAMA_SHAPE | {"d_ff": 86}, "LlamaForCausalLM"),  # the quickstart's: tied, 8/3 d_model
    (LLAMA_SHAPE | {"rope_scaling": "llama3", "rope_factor": 8.0,
                    "rope_original_context": 16, "head_dim": 16}, "LlamaForCausalLM"),
    (LLAMA_SHAPE | {"sliding_window": 7}, "MistralForCausalLM"),
    (LLAMA_SHAPE | {"qkv_bias": True, "sliding_window": 7, "sliding_layers": (1,)},
     "Qwen2ForCausalLM"),
    (LLAMA_SHAPE | {"qk_norm": True, "n_kv_heads": 2}, "Qwen3ForCausalLM"),
    (GEMMA_SHAPE | {"attention_softcap": 0.5, "logit_softcap": 3.0, "attention_scale": 0.2,
                    "sliding_window": 7, "sliding_layers": (0,)}, "Gemma2ForCausalLM"),
    (GEMMA_SHAPE | {"qk_norm": True, "rope_local_base": 100.0, "rope_scaling": "linear",
                    "rope_factor": 4.0, "sliding_window": 7, "sliding_layers": (0,)},
     "Gemma3ForCausalLM"),
]  # fmt: skip


@pytest.mark.parametrize(
    "changes, hf_class",
    EXPORTED,
    ids=["gpt2", "gpt2-untied", "llama-gqa", "llama-tied", "llama3", "mistral", "qwen2", "qwen3",
         "gemma2", "gemma3"],
)  # fmt: skip
@torch.no_grad()
def test_exported_models_load_in_transformers_with_the_same_logits(
    tmp_path: Path, changes, hf_class
) -> None:
    from transformers import AutoModelForCausalLM

    from qkv.checkpoint import write_checkpoint
    from qkv.config import ModelConfig
    from qkv.hf import save_hf_directory
    from qkv.model import DecoderLM
    from qkv.tokenizer import Tokenizer

    tokenizer = Tokenizer.train_char(["the quick brown fox jumps over the lazy dog"])
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                         max_seq_len=48, **changes)  # fmt: skip
    model = DecoderLM(config).eval()
    for parameter in model.parameters():  # away from init, so biases and norms count
        parameter.add_(0.05 * torch.randn_like(parameter))
    if changes == EXPORTED[0][0]:  # the command once; the library function for the rest
        write_checkpoint(tmp_path / "ours", model, tokenizer)
        result = qkv("export", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "hf"))
        assert result.returncode == 0 and f"as {hf_class}" in result.stdout, result.stderr
    else:
        assert save_hf_directory(model, tokenizer, tmp_path / "hf").hf_class == hf_class
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(theirs).__name__ == hf_class
    ids = torch.randint(
        0, tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3)
    )
    expected = model(ids)
    assert (theirs(ids).logits - expected).abs().max() <= 1e-5
    back, _ = load_model(tmp_path / "hf")
    assert (back(ids) - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_export_names_what_fits_no_family(tmp_path: Path) -> None:
    from test_cli_generate import checkpoint

    folder = checkpoint(tmp_path / "rope-layernorm", "decoder")  # RoPE with LayerNorm and GELU
    result = qkv("export", "--model", str(folder), "--out", str(tmp_path / "hf"))
    assert result.returncode == 2 and "fits no Hugging Face family" in result.stderr
    assert "position='rope' (needs learned)" in result.stderr and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_qkv_eval_scores_an_exported_directory_as_the_original(tmp_path: Path) -> None:
    from test_cli_generate import TEXT

    from qkv.checkpoint import write_checkpoint
    from qkv.config import ModelConfig
    from qkv.model import DecoderLM
    from qkv.tokenizer import Tokenizer

    tokenizer = Tokenizer.train_char([TEXT])
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4,
                                  n_layers=2, max_seq_len=32))  # fmt: skip
    original = write_checkpoint(tmp_path / "ours", model, tokenizer)
    exported = tmp_path / "hf"
    assert qkv("export", "--model", str(original), "--out", str(exported)).returncode == 0
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT * 20, encoding="utf-8")
    results = []
    for folder in (original, exported):
        result = qkv("eval", "--model", str(folder), "--data", str(corpus), "--json")
        assert result.returncode == 0, result.stderr
        results.append(json.loads(result.stdout))
    assert results[0]["tokens"] == results[1]["tokens"] > 0
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], abs=1e-5)
    half = qkv("eval", "--model", str(exported), "--data", str(corpus), "--json", "--dtype",
               "bfloat16")  # fmt: skip
    assert half.returncode == 0, half.stderr
    assert "GPT-2, " in half.stderr and "bfloat16 (as asked)" in half.stderr
    assert json.loads(half.stdout)["loss"] == pytest.approx(results[0]["loss"], rel=2e-2)
