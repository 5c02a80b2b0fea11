"""`qkv finetune` as a user runs it: a checkpoint and JSONL pairs in, a fine-tuned model out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_cli_generate import checkpoint, qkv

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
