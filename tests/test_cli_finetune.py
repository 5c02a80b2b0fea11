"""`qkv finetune` as a user runs it: a checkpoint and JSONL pairs in, a fine-tuned model out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_cli_generate import checkpoint, qkv
from torch import nn

from qkv.checkpoint import load_model, write_checkpoint
from qkv.cli import main
from qkv.generate import Generator
from qkv.nn.lora import LoRALinear

PAIRS = [{"prompt": f"reverse {w}", "response": w[::-1]} for w in ["fox", "dog", "box", "jug"]]


def test_finetune_trains_saves_and_the_result_generates(tmp_path: Path, capsys) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS * 3) + "\n", encoding="utf-8")
    out = tmp_path / "tuned"
    args = ["--steps", "4", "--batch-size", "4", "--eval-every", "2", "--save-every", "2"]
    code = main(["finetune", "--model", str(base), "--data", str(data), "--out", str(out), *args])
    printed = capsys.readouterr().out
    assert code == 0
    assert "before: held-out response loss" in printed and "after:" in printed
    assert "--- Q: reverse" in printed
    generator = Generator.load(out)
    assert generator.tokenizer.backend.token_to_id("<|assistant|>") is not None
    assert generator.model.config.vocab_size == generator.tokenizer.vocab_size


def test_finetune_names_a_malformed_line(tmp_path: Path, capsys) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(PAIRS[0]) + '\n{"prompt": "x"}\n', encoding="utf-8")
    code = main(
        ["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "line 2: expected" in err and len(err.strip().splitlines()) == 1


def finetune(tmp_path: Path, base: Path, out: Path, *extra: str) -> str:
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS * 3) + "\n", encoding="utf-8")
    args = ["--batch-size", "4", "--eval-every", "3", "--save-every", "3", *extra]
    assert (
        main(["finetune", "--model", str(base), "--data", str(data), "--out", str(out), *args]) == 0
    )
    return str(out)


def test_lora_checkpoints_hold_only_the_adapter_and_merge_keeps_the_logits(
    tmp_path: Path, capsys
) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    base_bytes = (base / "model.safetensors").read_bytes()
    out = tmp_path / "lora"
    finetune(tmp_path, base, out, "--steps", "4", "--lora-rank", "4", "--lora-targets",
             "q_proj,v_proj,o_proj")  # fmt: skip
    printed = capsys.readouterr().out
    assert "LoRA: rank 4, alpha 8" in printed and "KiB" in printed
    latest = out / "latest"
    assert not (latest / "model.safetensors").exists() and not (latest / "config.json").exists()
    names = safe_open(latest / "adapter.safetensors", "pt").keys()
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    assert len(names) == 2 * 3 * 2  # a and b, three projections, two blocks
    assert (base / "model.safetensors").read_bytes() == base_bytes  # the base is untouched

    assert main(["merge", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    adapted, _ = load_model(out)
    merged, _ = load_model(tmp_path / "merged")
    plain, _ = load_model(base)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    ids = torch.randint(0, plain.config.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=0)
        assert (merged(ids)[..., : plain.config.vocab_size] - plain(ids)).abs().max() > 1e-4


def test_an_adapter_refuses_a_base_model_that_changed(tmp_path: Path) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    out = finetune(tmp_path, base, tmp_path / "lora", "--steps", "2", "--lora-rank", "2")
    model, tokenizer = load_model(base)
    with torch.no_grad():
        model.head.matrix.mul_(2)
    write_checkpoint(base, model, tokenizer)
    result = qkv("generate", "--model", out, "the")
    assert result.returncode == 2 and "changed since the adapter" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "2"]], ids=["full", "lora"])
def test_a_resumed_finetuning_run_matches_an_uninterrupted_one(tmp_path: Path, lora) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    straight = Path(finetune(tmp_path, base, tmp_path / "straight", "--steps", "6", *lora))
    halfway = straight / "checkpoints" / "step-00000003"
    resumed = tmp_path / "resumed"
    assert main(["finetune", "--resume", str(halfway), "--out", str(resumed)]) == 0
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)


def hf_llama_directory(folder: Path) -> Path:
    """A random-init LlamaForCausalLM with its own tokenizer (eos "</s>"), as downloaded."""
    from test_hf import save_hf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=63, bos_token_id=None, pad_token_id=None)  # fmt: skip
    return save_hf(LlamaForCausalLM(config), folder)


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "2"]], ids=["full", "lora"])
def test_fine_tuning_a_hugging_face_model_keeps_its_end_token(tmp_path: Path, lora) -> None:
    base = hf_llama_directory(tmp_path / "llama")
    pairs = [{"prompt": f"w{i} w{i + 1}", "response": f"w{i + 2}"} for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in pairs), encoding="utf-8")
    out = tmp_path / "tuned"
    args = ["--model", str(base), "--data", str(data), "--out", str(out), "--steps", "2", *lora]
    assert main(["finetune", *args]) == 0
    if lora:
        assert main(["merge", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
        out = tmp_path / "merged"
    model, tokenizer = load_model(out)
    assert tokenizer.end_of_text == "</s>" and tokenizer.end_of_text_id == 63
    assert model.config.vocab_size == tokenizer.vocab_size == 64 + 3


def test_full_fine_tuning_from_an_adapter_trains_its_merged_weights(tmp_path: Path, capsys) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    adapter = finetune(tmp_path, base, tmp_path / "lora", "--steps", "2", "--lora-rank", "2")
    full = finetune(tmp_path, Path(adapter), tmp_path / "full", "--steps", "2")
    printed = capsys.readouterr().out.splitlines()
    trained = [line for line in printed if "trained;" in line][-1]
    counts = re.findall(r"([\d,]+) parameters, ([\d,]+) trained", trained)[0]
    total, learning = (int(x.replace(",", "")) for x in counts)
    assert total == learning
    model, _ = load_model(full)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora-targets", "q_proj"], "need --lora-rank"),
        (["--lora-rank", "999"], "rank must be from 1 to"),
        (["--lora-rank", "2", "--lora-targets", "nope"], "--lora-targets names nope, which"),
        (["--lora-rank", "2", "--lora-alpha", "-1"], "--lora-alpha must be positive"),
    ],
)
def test_bad_lora_options_are_one_line(tmp_path: Path, capsys, args, message) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS), encoding="utf-8")
    code = main(["finetune", "--model", str(base), "--data", str(data), "--out",
                 str(tmp_path / "o"), *args])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_lora_targets_naming_a_layer_the_model_lacks_are_refused(tmp_path: Path, qkv_here) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS), encoding="utf-8")
    model, _ = load_model(base)
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    lora = ["--lora-rank", "2", "--lora-targets", "q_proj,bogus"]
    result = qkv_here("finetune", "--model", str(base), "--data", str(data), "--out",
                      str(tmp_path / "o"), *lora)  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "o" / "latest").exists()
    assert result.stderr == (
        "qkv finetune: error: --lora-targets names bogus, which this model does not have; its "
        f"linear layers are: {', '.join(dict.fromkeys(names))}\n"
    )


def test_runs_resume_only_with_their_own_command(tmp_path: Path, capsys) -> None:
    base = checkpoint(tmp_path / "base", "decoder")
    tuned = finetune(tmp_path, base, tmp_path / "tuned", "--steps", "2")
    assert main(["train", "--resume", tuned, "--steps", "4"]) == 2
    assert "continue it with qkv finetune --resume" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(base)]) == 2
    assert "cannot be resumed: optimizer.safetensors is missing" in capsys.readouterr().err
    assert main(["merge", "--model", tuned, "--out", str(tmp_path / "pairs.jsonl")]) == 2
    assert "is not a LoRA adapter" in capsys.readouterr().err
