"""End-to-end: `qkv train`, `qkv eval` and `qkv quickstart` as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch


def qkv(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qkv", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ},
    )


def small_training(corpus_dir, options: str) -> list[str]:
    """`qkv train` of a tiny char-level model on the test corpus, plus `options`."""
    tiny = "--set d_model=32 --set n_layers=2 --set n_heads=2 --tokenizer char"
    return ["train", "--data", str(corpus_dir), *tiny.split(), *options.split()]


def test_train_then_eval_a_small_corpus(corpus_dir, tmp_path):
    out = tmp_path / "run"
    options = "--steps 30 --batch-size 8 --context 64 --eval-every 15 --save-every 15"
    result = qkv(*small_training(corpus_dir, options), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "GFLOP/step" in result.stdout
    assert "validation loss" in result.stdout
    for name in (
        "metrics.jsonl",
        "loss.png",
        "latest/config.json",
        "latest/model.safetensors",
        "latest/tokenizer.json",
        "latest/optimizer.safetensors",
        "latest/trainer_state.json",
    ):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    final = [r for r in records if "val_loss" in r][-1]

    evaluated = qkv("eval", "--model", str(out), "--data", str(corpus_dir), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout)
    assert set(scores) >= {"loss", "perplexity", "bits_per_byte"}
    assert scores["perplexity"] == pytest.approx(2.718281828 ** scores["loss"], rel=1e-6)
    assert abs(scores["loss"] - final["val_loss"]) < 0.5


def _losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def train_until_first_checkpoint(args: list[str], run) -> subprocess.Popen:
    """`qkv ARGS --out RUN` started in the background, returned once RUN/latest exists."""
    process = subprocess.Popen(
        [sys.executable, "-m", "qkv", *args, "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return process


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_continues_the_same_run(corpus_dir, tmp_path):
    options = "--steps 200 --batch-size 8 --context 32 --eval-every 50"
    args = [*small_training(corpus_dir, options), "--set", "dropout=0.1"]
    straight = qkv(*args, "--save-every", "1000", "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "interrupted"
    process = train_until_first_checkpoint([*args, "--save-every", "10"], run)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    stopped = len(_losses(run))
    assert 10 <= stopped < 200

    resumed = qkv("train", "--resume", str(run), "--save-every", "1000")  # saves cost time
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped}" in resumed.stdout
    assert _losses(run) == _losses(tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stopped_at(corpus_dir, tmp_path):
    """A scheduler's SIGTERM (preemption) is handled like Ctrl-C: save, then exit 128 + 15."""
    run = tmp_path / "run"
    options = "--steps 100000 --batch-size 8 --context 32 --save-every 5 --eval-every 1000"
    process = train_until_first_checkpoint(small_training(corpus_dir, options), run)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    stopped = len(_losses(run))
    assert f"stopped by SIGTERM at step {stopped}; checkpoint at step {stopped}" in stderr
    assert (run / "latest").resolve().name == f"step-{stopped:08d}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "/no/such/file.txt", "--out", "{tmp}/r"], "does not exist"),
        (
            [
                "train",
                "--data",
                "{corpus}",
                "--set",
                "d_model=30",
                "--set",
                "n_heads=4",
                "--out",
                "{tmp}/r",
            ],
            "n_heads",
        ),
        (["train", "--data", "{corpus}", "--set", "widht=3", "--out", "{tmp}/r"], "widht"),
        (["train", "--data", "{corpus}", "--lr", "-1", "--out", "{tmp}/r"], "--lr"),
        (["train", "--data", "{corpus}", "--preset", "gpt5", "--out", "{tmp}/r"], "gpt5"),
        (["train", "--resume", "{tmp}/nothing"], "does not exist"),
        (["eval", "--model", "{tmp}"], "not a qkv checkpoint"),
        pytest.param(
            ["train", "--data", "{corpus}", "--device", "cuda", "--out", "{tmp}/r"],
            "no CUDA",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        (["train", "--data", "{corpus}", "--device", "meta", "--out", "{tmp}/r"], "unknown device"),
        (["train", "--data", "{corpus}", "--grad-clip", "-1", "--out", "{tmp}/r"], "--grad-clip"),
        (["train", "--data", "{corpus}", "--beta2", "1.5", "--out", "{tmp}/r"], "--beta2"),
        (["train", "--data", "{corpus}", "--out", "{corpus}/textwrap.py"], "is a file"),
        (
            ["train", "--data", "{corpus}", "--context", "100000", "--out", "{tmp}/r"],
            "validation split",
        ),
        (
            ["train", "--data", "{corpus}", "--config", "{tmp}", "--out", "{tmp}/r"],
            "is a directory",
        ),
        (["train", "--data", "{corpus}", "--seed", "99999999999999999999999"], "--seed"),
        (["quickstart", "--minutes", "nan", "--out", "{tmp}/q"], "--minutes"),
        (["quickstart", "--minutes", "inf", "--out", "{tmp}/q"], "--minutes"),
    ],
)
def test_bad_training_input_gets_one_clear_line(args, message, corpus_dir, tmp_path, qkv_here):
    args = [a.format(tmp=tmp_path, corpus=corpus_dir) for a in args]
    result = qkv_here(*args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_corrupt_weights_are_refused_clearly(corpus_dir, tmp_path):
    out = tmp_path / "run"
    trained = qkv(*small_training(corpus_dir, "--steps 2 --context 32"), "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    (out / "latest" / "model.safetensors").write_bytes(b"\x00" * 100)
    result = qkv("eval", "--model", str(out), "--data", str(corpus_dir))
    assert result.returncode != 0
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    result = qkv("quickstart", "--steps", "10", "--out", str(tmp_path / "qs"))
    assert result.returncode == 0, result.stderr
    assert "bits/byte" in result.stdout and "samples" in result.stdout
    assert (tmp_path / "qs" / "latest" / "tokenizer.json").is_file()
    assert len([line for line in result.stdout.splitlines() if line.startswith("--- ")]) == 4
    assert "steps fit in" not in result.stderr  # --steps given: no time budget
    exported = qkv("export", "--model", str(tmp_path / "qs"), "--out", str(tmp_path / "hf"))
    assert "as LlamaForCausalLM" in exported.stdout, exported.stderr  # its shape is a Llama's


@pytest.mark.slow
def test_quickstart_fits_its_steps_to_the_time_given(tmp_path):
    result = qkv("quickstart", "--minutes", "0.01", "--out", str(tmp_path / "qs"))
    assert result.returncode == 0, result.stderr
    assert "1 steps fit in 0.01 minutes" in result.stderr
    state = json.loads((tmp_path / "qs" / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 1


@pytest.mark.slow
def test_eval_without_data_uses_the_models_own_validation_split(corpus_dir, tmp_path):
    from qkv.data import prepare_corpus
    from qkv.tokenizer import Tokenizer

    out = tmp_path / "run"
    options = "--steps 4 --context 32 --val-fraction 0.2"
    trained = qkv(*small_training(corpus_dir, options), "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    result = qkv("eval", "--model", str(out), "--json")
    assert result.returncode == 0, result.stderr
    corpus = prepare_corpus([str(corpus_dir)], Tokenizer.load(out / "latest"), val_fraction=0.2)
    windows = (len(corpus.val.tokens) - 1) // 32
    assert json.loads(result.stdout)["tokens"] == windows * 32


@pytest.mark.slow
def test_a_second_writer_of_a_run_directory_is_refused(corpus_dir, tmp_path, qkv_here):
    run = tmp_path / "run"
    options = "--steps 100000 --batch-size 8 --context 32 --save-every 5 --eval-every 1000"
    first = train_until_first_checkpoint(small_training(corpus_dir, options), run)
    try:
        second = qkv_here("train", "--resume", str(run), "--save-every", "1")
        assert second.returncode == 2, second.stderr
        assert f"is in use by another qkv process (pid {first.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143 and "checkpoint at step" in stderr  # the first saved its work
    stopped = len(_losses(run))
    again = qkv_here("train", "--resume", str(run), "--steps", str(stopped + 2))
    assert again.returncode == 0, again.stderr  # the lock went with the first process
