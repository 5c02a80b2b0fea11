"""Encoder-decoder sequence to sequence: task data, held-out pairs kept out of training,
greedy and beam decoding, and `qkv train --task` / `--arch encoder-decoder --data` end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qkv.checkpoint import load_model
from qkv.cli import main
from qkv.evaluation import IGNORE
from qkv.generate import greedy_decode
from qkv.model import EncoderDecoder
from qkv.seq2seq import (
    TASKS,
    PairBatches,
    beam_decode,
    encode_pairs,
    seq2seq_model_config,
    task_source,
    task_tokenizer,
)


def test_task_pairs_are_what_the_task_says() -> None:
    rng = random.Random(0)
    for _ in range(300):
        source, target = TASKS["reverse"](rng)
        assert 1 <= len(source) <= 16 and source.isdigit() and target == source[::-1]
        source, target = TASKS["sort"](rng)
        assert 1 <= len(source) <= 16 and list(target) == sorted(source)
        source, target = TASKS["add"](rng)
        a, b = source.split("+")
        assert 0 <= int(a) <= 9999 and 0 <= int(b) <= 9999 and int(target) == int(a) + int(b)


def test_decoder_input_is_the_target_shifted_right_after_the_end_token() -> None:
    tokenizer = task_tokenizer()
    src, mask, decoder_in, labels = encode_pairs([("123", "321"), ("4", "4")], tokenizer)
    end = tokenizer.end_of_text_id
    assert labels[0].tolist() == [*tokenizer.encode("321"), end]
    assert decoder_in[0].tolist() == [end, *tokenizer.encode("321")]
    assert labels[1].tolist() == [*tokenizer.encode("4"), end, IGNORE, IGNORE]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]] and src[1, 1:].eq(tokenizer.pad_id).all()


def test_training_batches_never_hold_a_held_out_source() -> None:
    source = task_source("reverse", held_out=1000)
    held = {s for s, _ in source.held_out}
    assert {str(d) for d in range(10)} <= held  # 1,000 draws include every 1-digit source
    batches = PairBatches(source, task_tokenizer(), batch_size=64, seed=0)
    tokenizer = task_tokenizer()
    for _ in range(30):
        (src, _, mask), _ = batches.next()
        for row, row_mask in zip(src.tolist(), mask.tolist(), strict=True):
            text = tokenizer.decode(row[: sum(row_mask)])
            assert text not in held


def sequence_log_prob(model: EncoderDecoder, src, mask, target: list[int], end: int) -> float:
    decoder_in = torch.tensor([[end, *target]])
    labels = torch.tensor([[*target, end]])
    logits = model(src, decoder_in, mask).log_softmax(-1)
    return float(logits.gather(-1, labels[..., None]).sum())


def test_beam_search_finds_targets_at_least_as_likely_as_greedy() -> None:
    tokenizer = task_tokenizer()
    torch.manual_seed(0)
    model = EncoderDecoder(seq2seq_model_config(tokenizer.vocab_size, 17).replace(init_std=0.3))
    model.eval()
    src, mask, _, _ = encode_pairs([("12345", ""), ("9", ""), ("4821", "")], tokenizer)
    end = tokenizer.end_of_text_id
    greedy = greedy_decode(model, src, mask, end, max_len=6)
    assert beam_decode(model, src, mask, end, max_len=6, beams=1) == greedy
    beam = beam_decode(model, src, mask, end, max_len=6, beams=4)
    better = 0
    with torch.no_grad():
        for i in range(3):
            one = (src[i : i + 1], mask[i : i + 1])
            g = sequence_log_prob(model, *one, greedy[i], end) if end not in greedy[i] else None
            b = sequence_log_prob(model, *one, beam[i], end)
            if len(greedy[i]) < 6 and len(beam[i]) < 6 and g is not None:
                assert b >= g - 1e-5
                better += b > g + 1e-5
    assert all(end not in ids for ids in beam)


@pytest.mark.slow
def test_qkv_train_task_reports_exact_match_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "reverse"
    small = ["--set", "d_model=32", "--set", "n_heads=2", "--set", "n_layers=1"]
    args = ["--task", "reverse", "--steps", "6", "--batch-size", "8", "--eval-every", "3",
            "--save-every", "3", "--beam", "2", "--out", str(out), *small]  # fmt: skip
    assert main(["train", *args]) == 0
    printed = capsys.readouterr().out
    assert "held-out exact match: greedy" in printed and "beam search (2 beams)" in printed
    assert "1,000 held-out pairs never trained on" in printed
    model, _ = load_model(out)
    assert model.config.arch == "encoder-decoder" and model.config.d_model == 32
    assert main(["train", "--resume", str(out), "--steps", "9", "--beam", "1"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 10))
    assert any("val_exact_match" in m for m in metrics)
    capsys.readouterr()
    assert main(["eval", "--model", str(out)]) == 2
    assert "scores decoder language models" in capsys.readouterr().err


@pytest.mark.slow
def test_an_encoder_decoder_learns_a_users_pairs(tmp_path: Path, capsys) -> None:
    words = ["".join(p) for p in __import__("itertools").product("abcdef", repeat=3)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"source": w, "target": w[::-1]}) for w in words))
    out = tmp_path / "run"
    args = ["--arch", "encoder-decoder", "--data", str(data), "--steps", "500", "--lr", "3e-3",
            "--batch-size", "32", "--eval-every", "500", "--beam", "1", "--out", str(out),
            "--set", "d_model=64", "--set", "n_layers=1"]  # fmt: skip
    assert main(["train", *args]) == 0
    printed = capsys.readouterr().out
    exact = float(printed.split("greedy ")[1].split("%")[0])
    assert exact >= 75.0, printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "reverse", "--data", "x.jsonl"], "not both"),
        (["--arch", "encoder-decoder"], "--task reverse|sort|add"),
        (["--task", "reverse", "--preset", "tiny"], "trains an encoder-decoder"),
        (["--task", "sort", "--tokenizer", "char"], "drop --tokenizer"),
        (["--resume", "runs/x", "--arch", "decoder"], "--task/--arch"),
    ],
)
def test_seq2seq_option_errors_are_one_line(tmp_path: Path, capsys, args, message) -> None:
    assert main(["train", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"source": "a"}', "expected"), ('{"source": "", "target": "b"}', "the source is empty")],
)
def test_a_malformed_pairs_line_is_named(tmp_path: Path, capsys, line, message) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"source": "a", "target": "b"}\n' + line + "\n", encoding="utf-8")
    code = main(["train", "--arch", "encoder-decoder", "--data", str(data), "--out",
                 str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"pairs.jsonl, line 2: {message}" in err
