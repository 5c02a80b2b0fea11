"""checkpoint.read_run: what a training checkpoint says about its run, or one clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from qkv.checkpoint import (
    TRAINER_STATE,
    find_run,
    load_model,
    read_run,
    save_training_checkpoint,
    write_checkpoint,
)
from qkv.config import ModelConfig, TrainConfig
from qkv.errors import QkvError
from qkv.model import build_model
from qkv.tokenizer import Tokenizer

TRAIN_CONFIG = {"data": ["corpus.txt"], "steps": 10, "val_fraction": 0.1}


def model_and_tokenizer() -> tuple[torch.nn.Module, Tokenizer]:
    tokenizer = Tokenizer.train_char(["abc"])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=8, n_heads=2, n_layers=1,
                         max_seq_len=8)  # fmt: skip
    return build_model(config), tokenizer


def training_run(run_dir: Path, state: dict) -> Path:
    model, tokenizer = model_and_tokenizer()
    optimizer = {"optimizer.0.step": torch.tensor(3.0)}
    return save_training_checkpoint(run_dir, 3, model, tokenizer, optimizer, state)


def test_read_run_resolves_the_latest_checkpoint_and_its_state(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    folder = training_run(run_dir, {"kind": "finetune", "step": 3, "train_config": TRAIN_CONFIG})
    run = read_run(run_dir)
    assert (run.folder, run.run_dir, run.kind, run.step) == (folder, run_dir, "finetune", 3)
    assert run.train_config == TrainConfig(**TRAIN_CONFIG) and find_run(folder) == run
    run.require("finetune")
    with pytest.raises(QkvError, match="is a fine-tuning run: continue it with qkv finetune"):
        run.require("train")


@pytest.mark.parametrize("kind", [None, "train", "seq2seq"])
def test_a_training_run_resumes_only_as_its_own_kind(tmp_path: Path, kind) -> None:
    state = {"step": 3, "train_config": TRAIN_CONFIG} | ({"kind": kind} if kind else {})
    run = read_run(training_run(tmp_path / "run", state))
    assert run.kind == (kind or "train")  # runs from before "kind" was recorded: training
    run.require(run.kind)
    with pytest.raises(QkvError, match="run: continue it with qkv train --resume"):
        run.require("finetune")


def test_a_checkpoint_not_written_by_training_is_no_run(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "merged", *model_and_tokenizer())
    assert find_run(folder) is None
    with pytest.raises(QkvError, match=r"cannot be resumed: optimizer\.safetensors is missing"):
        read_run(folder)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("{not json", "trainer_state.json is corrupt"),
        ("[1, 2]", "is corrupt: it is not a JSON object"),
        (json.dumps({"step": 3}), "was not written by this version of qkv train"),
        (json.dumps({"kind": "rl", "step": 3, "train_config": {}}), "unknown kind of run 'rl'"),
        (
            json.dumps({"step": 3, "train_config": {**TRAIN_CONFIG, "warp_drive": 9}}),
            "was not written by this version of qkv train",
        ),
    ],
)
def test_a_broken_trainer_state_is_one_clear_error(tmp_path: Path, state, message) -> None:
    folder = training_run(tmp_path / "run", {"step": 3, "train_config": TRAIN_CONFIG})
    (folder / TRAINER_STATE).write_text(state, encoding="utf-8")
    for read in (read_run, find_run):
        with pytest.raises(QkvError, match=message):
            read(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"n_layers": 100_000}, "says n_layers=100000 but"), ({"d_model": 1 << 20}, "needs [1048576")],
)
def test_a_config_that_does_not_fit_its_weights_is_refused_before_building(
    tmp_path: Path, change: dict, message: str
) -> None:
    model, tokenizer = model_and_tokenizer()
    folder = write_checkpoint(tmp_path / "ckpt", model, tokenizer)
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QkvError, match=re.escape(message)):
        load_model(folder)  # a model of that size would need terabytes
