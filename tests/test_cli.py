"""End-to-end: the `qkv` command as a user runs it."""

import json
import math
import re
import subprocess
import sys

import pytest

REQUIRED_STAGES = (
    "embeddings",
    "positional_encoding",
    "attention_weights",
    "feed_forward",
    "layer_norm",
    "probabilities",
)


def qkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qkv", *args], capture_output=True, text=True, timeout=120
    )


def test_explain_prints_every_stage_for_the_notes_sentence():
    result = qkv("explain", "The quick brown fox jumps over the lazy dog")
    assert result.returncode == 0, result.stderr
    headers = re.findall(r"^\s*\d+\. (\w+)", result.stdout, flags=re.MULTILINE)
    for name in REQUIRED_STAGES:
        assert name in headers
    assert "softmax" in result.stdout


def test_explain_json_is_one_object_with_valid_numbers(tmp_path):
    result = qkv(
        "explain",
        "--json",
        "--d-model",
        "8",
        "--heads",
        "4",
        "--layers",
        "2",
        "--plot",
        str(tmp_path / "a.png"),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tokens"] == ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    names = [s["name"] for s in data["stages"]]
    for name in REQUIRED_STAGES:
        assert name in names
    weights = [s for s in data["stages"] if s["name"] == "attention_weights"]
    assert len(weights) == 2 and weights[0]["shape"] == [4, 9, 9]
    for stage in weights:
        for head in stage["values"]:
            for row in head:
                assert abs(sum(row) - 1) < 1e-5
    pe = next(s for s in data["stages"] if s["name"] == "positional_encoding")
    for pos, row in enumerate(pe["values"]):
        for j, value in enumerate(row):
            angle = pos / 10000 ** (2 * (j // 2) / 8)
            assert abs(value - (math.sin(angle) if j % 2 == 0 else math.cos(angle))) < 1e-6
    assert (tmp_path / "a.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "--d-model", "5", "--heads", "2"], "--heads"),
        (["explain", "--d-model", "0"], "at least 1"),
        (["explain", "--heads", "two"], "whole number"),
        (["explain", ""], "empty"),
        (["explain", "--plot", "/no/such/folder/a.png"], "does not exist"),
        (["explain", "--plot", "/tmp/qkv-plot.unknownext"], "cannot write the plot"),
        (["explain", "--plot", "/tmp"], "image file name"),
        (["explain", "--plot", ""], "image file name"),
        (["explain", "--plot", "/tmp/no-extension"], "end the name with"),
        (["explain", "--seed", "99999999999999999999999"], "--seed"),
        (["explain", "--layers", "0"], "at least 1"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gets_one_clear_line_and_nonzero_exit(args, message, qkv_here):
    result = qkv_here(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_has_examples():
    result = qkv("explain", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--plot" in result.stdout


def test_plot_of_text_the_font_cannot_draw_stays_quiet(tmp_path):
    result = qkv("explain", "héllo 世界 🙂 ok", "--plot", str(tmp_path / "u.png"))
    assert result.returncode == 0
    assert result.stderr == ""
    assert (tmp_path / "u.png").stat().st_size > 1000
