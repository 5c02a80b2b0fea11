"""README's Python example, run as written: a run trained from Python writes what `qkv train`
writes, and the command line loads it. And the parser starts without PyTorch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_train import qkv

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    """The code block of README's "From Python" section."""
    section = README.read_text(encoding="utf-8").split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readmes_python_example_trains_a_run_the_command_line_loads(corpus_dir, tmp_path):
    shutil.copytree(corpus_dir, tmp_path / "notes")
    result = subprocess.run(
        [sys.executable, "-c", python_example()],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "notes-py"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [30, 60]
    assert sum("loss" in r for r in records) == 60
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert (run / "latest" / "model.safetensors").is_file()
    assert "perplexity" in result.stdout and "parameters" in result.stdout
    scores = qkv("eval", "--model", str(run), "--json")
    assert scores.returncode == 0, scores.stderr
    last, measured = [r for r in records if "val_loss" in r][-1], json.loads(scores.stdout)
    assert {"loss", "perplexity", "bits_per_byte"} <= measured.keys()
    assert abs(measured["loss"] - last["val_loss"]) < 0.5  # its own validation split
    text = qkv("generate", "--model", str(run), "The ", "--max-new-tokens", "8")
    assert text.returncode == 0 and text.stdout.startswith("The ")


def test_the_parser_starts_without_pytorch():
    code = "import sys, qkv.cli; qkv.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
    for command in ("train", "generate", "explain", "chat", "finetune", "eval", "export"):
        help_text = qkv(command, "--help")
        assert help_text.returncode == 0 and "examples:" in help_text.stdout
