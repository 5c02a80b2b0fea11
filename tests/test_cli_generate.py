"""`qkv generate` as a user runs it: prompts in, streamed text or JSON out, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv.checkpoint import write_checkpoint
from qkv.cli import main
from qkv.config import ModelConfig
from qkv.generate import Generator
from qkv.model import build_model
from qkv.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"
PROMPTS = ["the quick", "a", "pack my box"]


def checkpoint(folder: Path, arch: str, nan: bool = False) -> Path:
    """A small model of `arch`; with `nan`, every weight NaN (a broken checkpoint)."""
    tokenizer = Tokenizer.train_char([TEXT])
    torch.manual_seed(0)
    config = ModelConfig(
        arch=arch, vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
        max_seq_len=32, position="rope", init_std=None,
    )  # fmt: skip
    model = build_model(config)
    if nan:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
    return write_checkpoint(folder, model, tokenizer)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("decoder") / "model", "decoder")


def qkv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qkv", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env={**os.environ},
    )


@pytest.mark.parametrize("fmt", ["lines", "jsonl"])
def test_json_prints_one_object_per_prompt_as_the_python_api_generates(
    decoder_dir: Path, tmp_path: Path, fmt: str
) -> None:
    prompts_file = tmp_path / f"prompts.{'txt' if fmt == 'lines' else 'jsonl'}"
    lines = PROMPTS if fmt == "lines" else [json.dumps({"prompt": p}) for p in PROMPTS]
    prompts_file.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    options = ["--max-new-tokens", "6", "--temperature", "0", "--json", "--batch-size", "2"]
    result = qkv("generate", "--model", str(decoder_dir), "--prompts", str(prompts_file), *options)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = Generator.load(decoder_dir).generate(PROMPTS, max_new_tokens=6, temperature=0)
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["text"] for r in records] == [c.text for c in expected]
    assert [r["token_ids"] for r in records] == [c.token_ids for c in expected]


def test_no_cache_recomputes_the_same_greedy_text(decoder_dir: Path, capsys) -> None:
    outputs = []
    for extra in ([], ["--no-cache"]):
        args = ["generate", "--model", str(decoder_dir), *PROMPTS, "--temperature", "0"]
        assert main([*args, "--max-new-tokens", "40", "--json", *extra]) == 0
        outputs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert outputs[0] == outputs[1]


def test_text_mode_streams_each_prompt_and_its_continuation(decoder_dir: Path) -> None:
    result = qkv("generate", "--model", str(decoder_dir), "the lazy", "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the lazy")
    assert "tokens/s" in result.stderr


def test_prompts_from_stdin_and_a_long_prompt_warns(decoder_dir: Path) -> None:
    long_prompt = TEXT[:50]
    result = qkv(
        "generate", "--model", str(decoder_dir), "--prompts", "-", "--json",
        "--max-new-tokens", "3", stdin=long_prompt + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning: prompt 1 has 50 tokens but the context window is 32" in result.stderr
    assert json.loads(result.stdout)["truncated_tokens"] == 18


def test_prompts_are_checked_before_any_output_and_numbered_over_all(
    decoder_dir: Path, capsys
) -> None:
    code = main(["generate", "--model", str(decoder_dir), "ok", "", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "prompt 2 is empty" in captured.err


def test_non_utf8_stdin_is_one_clear_line(decoder_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "generate", "--model", str(decoder_dir), "--prompts", "-"],
        input=b"caf\xe9\n",
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert b"standard input is not UTF-8 text (byte 3)" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{missing}", "hi"], "no checkpoint at"),
        (["--model", "{encoder}", "hi"], "generation needs a decoder"),
        (["--model", "{decoder}", ""], "prompt 1 is empty"),
        (["--model", "{decoder}"], "give a prompt to continue"),
        (["--model", "{decoder}", "hi", "--top-p", "0"], "top-p must be in (0, 1]"),
        (["--model", "{decoder}", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["--model", "{decoder}", "hi", "--stop", "z" * 300], "at most 256 characters; one"),
        (["--model", "{decoder}", "--prompts", "{bad_jsonl}"], "line 2: not valid JSON"),
        (["--model", "{decoder}", "--prompts", "{missing}"], "does not exist"),
    ],
)
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(
    args: list[str], message: str, decoder_dir: Path, tmp_path: Path, capsys
) -> None:
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    paths = dict(
        missing=tmp_path / "nowhere",
        encoder=checkpoint(tmp_path / "encoder", "encoder"),
        decoder=decoder_dir,
        bad_jsonl=bad_jsonl,
    )
    code = main(["generate", *(a.format(**paths) for a in args)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("json_lines", [False, True], ids=["streamed", "json"])
def test_a_model_of_nan_weights_is_one_error_line_not_a_traceback(
    tmp_path: Path, capsys, json_lines: bool
) -> None:
    model = checkpoint(tmp_path / "nan", "decoder", nan=True)
    args = ["generate", "--model", str(model), "the quick", "--temperature", "1"]
    code = main([*args, "--json"] if json_lines else args)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ("" if json_lines else "the quick\n")  # the streamed line is ended
    model_line, error = captured.err.strip().splitlines()
    assert model_line.startswith("model: qkv decoder")
    assert error.startswith("qkv generate: error: the model produced NaN or infinite logits at")
    assert "try --dtype float32" in error
