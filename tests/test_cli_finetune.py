"""`qkv finetune` as a user runs it: a checkpoint and JSONL pairs in, a fine-tuned model out."""

from __future__ import annotations

import json
from pathlib import Path

from test_cli_generate import checkpoint

from qkv.cli import main
from qkv.generate import Generator

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
