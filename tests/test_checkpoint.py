"""checkpoint.read_run: what a training checkpoint says about its run, or one clear error;
resolve() past a `latest` link that points at nothing; a tokenizer that does not fit its model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv.checkpoint import (
    TRAINER_STATE,
    check_run_directory,
    find_run,
    load_model,
    read_run,
    resolve,
    save_training_checkpoint,
    weights_digest,
    write_checkpoint,
)
from qkv.config import ModelConfig, TrainConfig
from qkv.errors import QkvError
from qkv.model import build_model
from qkv.nn.lora import add_lora
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


def checkpoints_at(run_dir: Path, steps: list[int]) -> list[Path]:
    """A training run that saved at each of `steps` (all kept), `latest` at the last."""
    model, tokenizer = model_and_tokenizer()
    optimizer = {"optimizer.0.step": torch.tensor(1.0)}
    return [
        save_training_checkpoint(run_dir, step, model, tokenizer, optimizer,
                                 {"step": step, "train_config": TRAIN_CONFIG}, keep=len(steps))
        for step in steps
    ]  # fmt: skip


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first, second, last = checkpoints_at(run_dir, [3, 6, 9])
    (second / TRAINER_STATE).unlink()  # incomplete: never chosen
    shutil.rmtree(last)  # deleted by hand: `latest` now points at nothing
    expected = (
        f"{run_dir / 'latest'} points at checkpoints/step-00000009, which is missing; "
        f"using the newest complete checkpoint, {first}"
    )
    for read in (resolve, lambda path: read_run(path).folder, lambda path: find_run(path).folder):
        with pytest.warns(UserWarning, match=re.escape(expected)):
            assert read(run_dir) == first
    with pytest.warns(UserWarning, match="points at"):
        model, tokenizer = load_model(run_dir)
    assert model.config.vocab_size == tokenizer.vocab_size
    with pytest.raises(QkvError, match="already holds a training run; pass --resume"):
        check_run_directory(run_dir)  # a new run would prune the old run's checkpoints
    check_run_directory(run_dir, first)  # resuming it into its own run is fine


def test_a_run_without_its_latest_link_uses_its_newest_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _, newest = checkpoints_at(run_dir, [3, 6])
    (run_dir / "latest").unlink()  # as a kill between the first rename and its link leaves it
    with pytest.warns(UserWarning, match=re.escape(f"{run_dir} has no 'latest' link; using")):
        assert resolve(run_dir) == newest


def test_a_dangling_latest_with_no_checkpoint_left_is_one_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (only,) = checkpoints_at(run_dir, [3])
    shutil.rmtree(only)
    message = (
        f"{run_dir / 'latest'} points at checkpoints/step-00000003, which is missing, and "
        f"{run_dir / 'checkpoints'} holds no complete checkpoint; restore that checkpoint, "
        "or give another"
    )
    with pytest.raises(QkvError, match=re.escape(message)):
        resolve(run_dir)


def test_generate_from_a_run_whose_latest_dangles_warns_and_uses_the_newest(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    first, last = checkpoints_at(run_dir, [3, 6])
    shutil.rmtree(last)
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "generate", "--model", str(run_dir), "ab",
         "--max-new-tokens", "4", "--temperature", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ab")
    assert (
        f"points at checkpoints/step-00000006, which is missing; using the newest complete "
        f"checkpoint, {first}"
    ) in result.stderr


def fewer_tokens() -> Tokenizer:
    return Tokenizer.train_char(["ab"])  # one character fewer than model_and_tokenizer's


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", *model_and_tokenizer())
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    fewer, more = fewer_tokens(), Tokenizer.train_char(["abcd"])
    assert fewer.vocab_size == vocab_size - 1 and more.vocab_size == vocab_size + 1
    fewer.save(folder / "tokenizer.json")
    with pytest.raises(QkvError) as refused:
        load_model(folder)
    assert str(refused.value) == (
        f"the tokenizer {folder / 'tokenizer.json'} has {vocab_size - 1} tokens but "
        f"{folder / 'config.json'} says vocab_size={vocab_size}: the model would generate ids "
        "the tokenizer cannot decode; the files do not belong together: put back the tokenizer "
        "it was trained with"
    )
    more.save(folder / "tokenizer.json")
    larger = f"has {vocab_size + 1} tokens but {folder / 'config.json'} says "
    with pytest.raises(QkvError, match=re.escape(f"{larger}vocab_size={vocab_size}: ids from")):
        load_model(folder)


def test_an_adapter_whose_tokenizer_is_smaller_than_its_base_is_refused(tmp_path: Path) -> None:
    model, tokenizer = model_and_tokenizer()
    base = write_checkpoint(tmp_path / "base", model, tokenizer)
    add_lora(model, 2)
    adapter = {"base": str(base), "base_sha256": weights_digest(base), "rank": 2, "alpha": 2,
               "dropout": 0.0, "targets": ["q_proj", "v_proj"]}  # fmt: skip
    folder = write_checkpoint(tmp_path / "lora", model, tokenizer, adapter=adapter)
    assert load_model(folder)[1].vocab_size == tokenizer.vocab_size
    fewer_tokens().save(folder / "tokenizer.json")
    message = (
        f"the tokenizer {folder / 'tokenizer.json'} has {tokenizer.vocab_size - 1} tokens but "
        f"{base / 'config.json'} says vocab_size={tokenizer.vocab_size}"
    )
    with pytest.raises(QkvError, match=re.escape(message)):
        load_model(folder)


def test_a_hugging_face_tokenizer_may_be_smaller_than_the_model_but_not_larger(
    tmp_path: Path,
) -> None:
    from test_hf import hf_tokenizer, save_hf
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        eos_token_id=59, bos_token_id=59)  # fmt: skip
    folder = save_hf(GPT2LMHeadModel(config), tmp_path / "gpt2")
    hf_tokenizer(60).save(str(folder / "tokenizer.json"))  # the embedding padded past it
    model, tokenizer = load_model(folder)
    assert (model.config.vocab_size, tokenizer.vocab_size) == (64, 60)
    hf_tokenizer(70).save(str(folder / "tokenizer.json"))
    message = (
        f"the tokenizer {folder / 'tokenizer.json'} has 70 tokens but {folder / 'config.json'} "
        "says vocab_size=64: ids from 64 on have no embedding"
    )
    with pytest.raises(QkvError, match=re.escape(message)):
        load_model(folder)
