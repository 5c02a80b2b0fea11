"""Hostile model directories (issue 28): every file of a qkv checkpoint, a run, a LoRA adapter
and a Hugging Face directory is read through one confined, bounded reader (qkv.text), so a link
out of the directory, a FIFO, a device or absurd JSON in any of them is one clear error naming
the file, never a read of the machine's files, a hang or a traceback; a lone surrogate in a
prompt is one line; a failed run leaves no lock files behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_hf import save_hf

from qkv.checkpoint import find_run, load_model, weights_digest, write_checkpoint
from qkv.config import MAX_SIZE, ModelConfig
from qkv.errors import QkvError
from qkv.memory import check_model_fits
from qkv.nn.lora import add_lora
from qkv.text import read_model_json
from qkv.tokenizer import Tokenizer

SECRET = "TOP-SECRET: the contents of a file outside the model directory\n"
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
STEP = "checkpoints/step-00000001"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, model_dir: Path) -> dict[str, Path]:
    """One of each kind of model directory, every file a reader opens present: a Hugging Face
    Llama (with tokenizer_config.json, chat_template.jinja, generation_config.json), the same
    sharded (index + shards), a qkv checkpoint, a LoRA adapter of it, and a training run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("directories")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        eos_token_id=96, bos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip
    llama = LlamaForCausalLM(config).eval()
    hf = save_hf(llama, root / "hf")
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (hf / "chat_template.jinja").write_text(TEMPLATE)
    assert (hf / "generation_config.json").is_file()
    sharded = save_hf(llama, root / "sharded", max_shard_size="4KB")
    model, tokenizer = load_model(model_dir)
    add_lora(model, 2, 4.0, 0.0, ("q_proj", "v_proj"))
    adapter = {
        "base": str(model_dir.resolve()), "base_sha256": weights_digest(model_dir), "rank": 2,
        "alpha": 4.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"],
    }  # fmt: skip
    lora = write_checkpoint(root / "lora", model, tokenizer, adapter=adapter)
    run = root / "run"
    shutil.copytree(model_dir, run / STEP)
    (run / STEP / "trainer_state.json").write_text(json.dumps({"step": 1, "train_config": {}}))
    (run / "latest").symlink_to(STEP)
    return {"hf": hf, "sharded": sharded, "checkpoint": model_dir, "lora": lora, "run": run}


def shard(folder: Path) -> str:
    """The first shard the index of a sharded directory names."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))[0]


# (kind of directory, file in it, what reads it)
FILES = [
    ("hf", "config.json", load_model),
    ("hf", "tokenizer.json", load_model),
    ("hf", "tokenizer_config.json", load_model),
    ("hf", "chat_template.jinja", load_model),
    ("hf", "generation_config.json", load_model),
    ("hf", "model.safetensors", load_model),
    ("sharded", "model.safetensors.index.json", load_model),
    ("sharded", "SHARD", load_model),
    ("checkpoint", "config.json", load_model),
    ("checkpoint", "model.safetensors", load_model),
    ("checkpoint", "tokenizer.json", load_model),
    ("lora", "adapter_config.json", load_model),
    ("lora", "adapter.safetensors", load_model),
    ("lora", "tokenizer.json", load_model),
    ("run", f"{STEP}/config.json", load_model),
    ("run", f"{STEP}/trainer_state.json", find_run),
]
IDS = [f"{kind}-{name.rsplit('/', 1)[-1]}" for kind, name, _ in FILES]


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """The block fails (TimeoutError) instead of hanging past `seconds`."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: a read hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def copy_of(dirs: dict[str, Path], kind: str, name: str, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the `kind` directory, the path of `name` in it; SHARD: the first shard)."""
    folder = tmp_path / kind
    shutil.copytree(dirs[kind], folder, symlinks=True)
    return folder, folder / (shard(folder) if name == "SHARD" else name)


def refused(read: Callable[[Path], object], folder: Path) -> str:
    """The one-line message of the QkvError `read(folder)` raises, within 20 seconds."""
    with deadline(20), pytest.raises(QkvError) as info:
        read(folder)
    message = str(info.value)
    assert "\n" not in message and SECRET.strip() not in message
    return message


@pytest.mark.parametrize(("kind", "name", "read"), FILES, ids=IDS)
def test_a_file_linked_from_outside_the_directory_is_refused(
    dirs, tmp_path: Path, kind: str, name: str, read
) -> None:
    folder, path = copy_of(dirs, kind, name, tmp_path)
    outside = tmp_path / "elsewhere" / path.name  # the very file, moved out and linked back
    outside.parent.mkdir()
    shutil.move(path, outside)
    path.symlink_to(outside)
    message = refused(read, folder)
    assert f"{path} leads outside its model directory" in message


@pytest.mark.parametrize(("kind", "name", "read"), FILES, ids=IDS)
def test_a_fifo_in_place_of_a_file_is_refused_without_hanging(
    dirs, tmp_path: Path, kind: str, name: str, read
) -> None:
    folder, path = copy_of(dirs, kind, name, tmp_path)
    path.unlink()
    os.mkfifo(path)
    assert f"{path} is a FIFO (named pipe)" in refused(read, folder)


def test_the_directories_load_as_they_are(dirs) -> None:
    """The controls: each kind loads, `latest` (a link inside the run) included, and a snapshot
    of the Hugging Face cache, whose files link to ../../blobs."""
    for kind in ("hf", "sharded", "lora", "run"):
        load_model(dirs[kind])
    assert find_run(dirs["run"]).step == 1
    assert load_model(dirs["hf"])[1].chat_template == TEMPLATE


def test_a_hugging_face_cache_snapshot_loads_through_its_blob_links(dirs, tmp_path: Path) -> None:
    repo = tmp_path / "models--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in dirs["hf"].iterdir():
        shutil.copy(path, repo / "blobs" / f"hash-{path.name}")
        (snapshot / path.name).symlink_to(f"../../blobs/hash-{path.name}")
    assert load_model(snapshot)[1].chat_template == TEMPLATE


def test_a_chat_template_linked_to_etc_passwd_is_refused(dirs, tmp_path: Path, qkv_here) -> None:
    folder, path = copy_of(dirs, "hf", "chat_template.jinja", tmp_path)
    path.unlink()
    path.symlink_to("/etc/passwd")
    result = qkv_here("generate", "--model", str(folder), "w1", "--max-new-tokens", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"error: {path} leads outside its model directory {folder} (to /etc/passwd)" in (
        result.stderr
    )
    assert "root:" not in result.stdout + result.stderr


def test_a_config_linked_to_dev_zero_says_it_is_a_device(dirs, tmp_path: Path, qkv_here) -> None:
    for kind in ("hf", "checkpoint"):
        folder, path = copy_of(dirs, kind, "config.json", tmp_path)
        path.unlink()
        path.symlink_to("/dev/zero")
        with deadline(20):
            result = qkv_here("generate", "--model", str(folder), "hi")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"{path} is a character device (a link to /dev/zero), not a regular file" in (
            result.stderr
        )


def test_a_latest_link_out_of_its_run_is_refused(dirs, tmp_path: Path) -> None:
    folder, link = copy_of(dirs, "run", "latest", tmp_path)
    link.unlink()
    link.symlink_to(dirs["checkpoint"])
    assert f"{link} points outside its run directory" in refused(load_model, folder)


def test_a_shard_named_outside_the_directory_is_refused(dirs, tmp_path: Path) -> None:
    folder, index = copy_of(dirs, "sharded", "model.safetensors.index.json", tmp_path)
    names = json.loads(index.read_text())
    first = shard(folder)
    outside = tmp_path / first
    shutil.move(folder / first, outside)
    names["weight_map"] = {
        k: "../" + v if v == first else v for k, v in names["weight_map"].items()
    }
    index.write_text(json.dumps(names))
    assert f"{folder}/../{first} leads outside its model directory" in refused(load_model, folder)


def test_the_model_text_reader_refuses_what_is_no_json_object(tmp_path: Path) -> None:
    cases = {
        "nested.json": (
            '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "is corrupt: its JSON nests",
        ),
        "broken.json": ('{"a": 1', "is corrupt: not valid JSON (Expecting ',' delimiter"),
        "list.json": ("[1, 2]", "is corrupt: it is not a JSON object (it holds a list)"),
        "binary.json": ("{}\x00", "looks binary (a NUL byte at offset 2)"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(QkvError, match=re.escape(f"{name} {message}")):
            read_model_json(tmp_path, name)
    os.mkdir(tmp_path / "folder.json")
    with pytest.raises(QkvError, match=r"folder.json is a directory, not a regular file"):
        read_model_json(tmp_path, "folder.json")
    assert read_model_json(tmp_path, "absent.json", missing_ok=True) == {}


LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # fmt: skip
VALUE_CASES = [
    ({"eos_token_id": -1}, "eos_token_id must be a token id from 0 to 96", "-1"),
    ({"eos_token_id": "abc"}, "eos_token_id must be a token id from 0 to 96", "'abc'"),
    ({"eos_token_id": 10**30}, "eos_token_id must be a token id from 0 to 96", str(10**30)),
    ({"pad_token_id": -1}, "pad_token_id must be a token id from 0 to 96", "-1"),
    ({"rope_theta": "abc"}, "rope_theta must be a finite number above 1", "'abc'"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number above 1", "inf"),
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number above 1", "nan"),
    ({"rope_parameters": {"rope_theta": float("inf")}}, "rope_parameters.rope_theta must", "inf"),
    ({"rope_scaling": LLAMA3 | {"factor": 0}}, "rope_scaling.factor must be a finite number "
     "of at least 1", "0"),
    ({"rope_parameters": LLAMA3 | {"factor": -2.0}}, "rope_parameters.factor must", "-2.0"),
    ({"rope_scaling": "abc"}, "rope_scaling must be an object or null", "'abc'"),
    ({"model_type": {"a": 1}}, "model_type must be a string", "{'a': 1}"),
    ({"max_position_embeddings": 1e9}, "max_position_embeddings must be an integer from 1 to "
     f"{MAX_SIZE:,}", "1000000000.0"),
    ({"max_position_embeddings": 10**9}, "max_position_embeddings must be an integer", "10000"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer", "2.5"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers must be an integer from 1 to 100,000",
     "1000000"),
    ({"hidden_size": -16}, "hidden_size must be an integer from 1", "-16"),
    ({"num_attention_heads": True}, "num_attention_heads must be an integer", "True"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false", "'yes'"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number above 0", "0"),
    ({"layer_types": [1]}, "layer_types must be a list of strings", "[1]"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message", "value"), VALUE_CASES)
def test_a_config_value_of_the_wrong_type_or_range_is_one_clear_error(
    dirs, tmp_path: Path, change: dict, message: str, value: str
) -> None:
    folder, path = copy_of(dirs, "hf", "config.json", tmp_path)
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    error = refused(load_model, folder)
    assert error.startswith(f"{path}: {message}") and f"got {value}" in error, error


def test_generation_config_ids_outside_the_vocabulary_are_refused(dirs, tmp_path: Path) -> None:
    folder, path = copy_of(dirs, "hf", "generation_config.json", tmp_path)
    for ids in ([-1], [96, 97], "abc"):
        path.write_text(json.dumps({"eos_token_id": ids}))
        assert refused(load_model, folder).startswith(
            f"{path}: eos_token_id must be a token id from 0 to 96 (or a list of them, or null), "
            f"got {ids!r}"
        )


def test_adapter_config_values_of_the_wrong_type_are_refused(dirs, tmp_path: Path) -> None:
    folder, path = copy_of(dirs, "lora", "adapter_config.json", tmp_path)
    adapter = json.loads(path.read_text())
    changes = [({"base": 5}, "base must be a string"), ({"rank": "2"}, "rank must be an integer"),
               ({"dropout": 1.5}, "dropout must be a number from 0 to below 1"),
               ({"targets": "q_proj"}, "targets must be a list of strings")]  # fmt: skip
    for change, message in changes:
        path.write_text(json.dumps(adapter | change))
        assert refused(load_model, folder).startswith(f"{path}: {message}")


def test_the_memory_check_counts_the_position_tables() -> None:
    config = ModelConfig(vocab_size=256, d_model=2048, n_heads=1, n_layers=1, position="rope",
                         max_seq_len=MAX_SIZE, init_std=None)  # fmt: skip
    with pytest.raises(QkvError, match=r"\(parameters [\d.]+ MB, position tables 1.9 TB\)"):
        check_model_fits(config, "a long context")
    check_model_fits(config.replace(max_seq_len=64), "a short context")  # fits


SURROGATE = "ab\udcffcd"  # $'ab\xffcd' as Python decodes a command-line argument


def test_a_lone_surrogate_is_one_clear_error(model_dir: Path, qkv_here) -> None:
    tokenizer = Tokenizer.load(model_dir)
    message = r"the text is not valid Unicode: a lone surrogate \(\\udcff\) at character 2"
    encoders = [tokenizer.encode, tokenizer.encode_plain, lambda t: tokenizer.encode_batch([t]),
                lambda t: tokenizer.encode_plain_batch(["ok", t]),
                lambda t: tokenizer.encode_inputs([t])]  # fmt: skip
    for encode in encoders:
        with pytest.raises(QkvError, match=message):
            encode(SURROGATE)
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"
    result = qkv_here("explain", "--model", str(model_dir), SURROGATE)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "lone surrogate (\\udcff) at character 2; send UTF-8 text" in result.stderr


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "x"}\n')  # line 2 is bad
    return path


def test_a_failed_finetune_leaves_no_lock_files(model_dir: Path, tmp_path: Path, pairs, qkv_here):
    base = ["finetune", "--model", str(model_dir), "--data", str(pairs), "--steps", "1"]
    new = tmp_path / "new" / "run"
    result = qkv_here(*base, "--out", str(new))
    assert result.returncode == 2 and "line 2: expected" in result.stderr
    assert not (tmp_path / "new").exists()  # both folders it made are gone
    empty, used = tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    for out in (empty, used):
        assert qkv_here(*base, "--out", str(out)).returncode == 2
    assert list(empty.iterdir()) == [] and [p.name for p in used.iterdir()] == ["notes.txt"]
    pairs.write_text('{"prompt": "a", "response": "b"}\n' * 4)
    result = qkv_here(*base[:-2], "--lora-rank", "2", "--lora-targets", "nope", "--out", str(new))
    assert result.returncode == 2 and "--lora-targets names nope" in result.stderr
    assert not (tmp_path / "new").exists()


def test_a_failed_train_leaves_no_lock_files(tmp_path: Path, qkv_here) -> None:
    (tmp_path / "short.txt").write_text("too short for a validation window")
    out = tmp_path / "runs" / "first"
    result = qkv_here("train", "--data", str(tmp_path / "short.txt"), "--tokenizer", "char",
                      "--steps", "1", "--context", "64", "--out", str(out))  # fmt: skip
    assert result.returncode == 2 and "a validation split needs" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()
