"""qkv.files: atomic directory writes, safetensors and pickles read with one-line errors."""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qkv.errors import QkvError
from qkv.files import (
    TensorInfo,
    atomic_directory,
    check_fit,
    one_writer,
    read_pickled_tensors,
    read_safetensors,
    read_safetensors_header,
)


def test_atomic_directory_leaves_the_old_folder_whole_when_a_write_fails(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(folder) as tmp:
        (tmp / "config.json").write_text("new", encoding="utf-8")
        raise RuntimeError("disk full")  # as if the weights failed to write
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    assert (folder / "config.json").read_text(encoding="utf-8") == "old"


def test_a_write_that_fails_in_an_atomic_directory_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("old", encoding="utf-8")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a full disk's write raises
    with pytest.raises(QkvError) as failed, atomic_directory(folder, "checkpoint", "; a") as tmp:
        (tmp / "config.json").write_text("new", encoding="utf-8")
        raise full
    assert str(failed.value) == (
        f"cannot write checkpoint {folder}: No space left on device (errno 28); free space or "
        "pass --out on another disk; a"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (folder / "config.json").read_text(encoding="utf-8") == "old"


def test_atomic_directory_replaces_an_existing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "stale.txt").write_text("old", encoding="utf-8")
    with atomic_directory(folder) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-") and not any(tmp.iterdir())
        (tmp / "config.json").write_text("new", encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in folder.iterdir()] == ["config.json"]


def test_a_truncated_safetensors_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    for read in (read_safetensors, read_safetensors_header):
        with pytest.raises(QkvError, match=r"weight file .*model\.safetensors is corrupt") as err:
            read(path)
        assert "\n" not in str(err.value)
    with pytest.raises(QkvError, match=r"nowhere\.safetensors is missing"):
        read_safetensors(tmp_path / "nowhere.safetensors")
    with pytest.raises(QkvError, match="is unreadable"):
        read_safetensors(tmp_path)  # a directory


def sparse_safetensors(path: Path, shape: tuple[int, ...]) -> None:
    """A valid safetensors file of one float32 tensor whose data is a hole: 4 * prod(shape) bytes
    on paper and none on disk, so only a reader that skips the data finishes at once."""
    size = 4 * torch.Size(shape).numel()
    header = json.dumps({"big": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, size]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header)) + header.encode())
        file.truncate(8 + len(header) + size)


def test_a_header_read_gives_names_shapes_and_dtypes_without_the_data(tmp_path: Path) -> None:
    small = tmp_path / "small.safetensors"
    tensors = {"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16)}
    save_file(tensors, small)
    header = read_safetensors_header(small)
    assert header == {"a": TensorInfo((3, 5), "F32"), "b": TensorInfo((7,), "BF16")}
    check_fit(header, tensors, "checkpoint", "the config")  # a header checks like the tensors
    with pytest.raises(QkvError, match=r"tensor a has shape \[3, 5\] but the config needs \[3\]"):
        check_fit(header, {"a": torch.zeros(3), "b": tensors["b"]}, "checkpoint", "the config")
    big = tmp_path / "big.safetensors"
    sparse_safetensors(big, (1 << 15, 1 << 15))  # 4 GiB of float32
    started = time.perf_counter()
    assert read_safetensors_header(big) == {"big": TensorInfo((1 << 15, 1 << 15), "F32")}
    assert time.perf_counter() - started < 1.0


class Payload:
    """Stands for whatever a malicious pickle would construct."""


def test_a_pickle_holding_an_object_is_refused(tmp_path: Path) -> None:
    plain, evil = tmp_path / "plain.bin", tmp_path / "evil.bin"
    torch.save({"w": torch.arange(3.0)}, plain)
    assert torch.equal(read_pickled_tensors(plain)["w"], torch.arange(3.0))
    torch.save({"w": torch.zeros(2), "payload": Payload()}, evil)
    with pytest.raises(QkvError, match=r"Payload\), which could run code .* refusing it") as err:
        read_pickled_tensors(evil)
    assert "\n" not in str(err.value)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle at all" * 4)
    with pytest.raises(QkvError, match=r"junk\.bin is corrupt"):
        read_pickled_tensors(tmp_path / "junk.bin")


def test_check_fit_names_missing_and_unexpected_tensors() -> None:
    expected = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(QkvError, match=r"missing \['b'\], unexpected \['c'\]"):
        check_fit({"a": torch.zeros(2), "c": torch.zeros(2)}, expected, "adapter", "the model")


def test_one_writer_refuses_a_second_process_and_nests_in_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    folder = tmp_path / "run"
    holder = "from qkv.files import one_writer; import sys, pathlib\n" \
             "with one_writer(pathlib.Path(sys.argv[1])):\n    print('held', flush=True)\n" \
             "    sys.stdin.read()"  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", holder, str(folder)], text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "held"
        busy = f"in use by another qkv process \\(pid {process.pid}\\)"
        with pytest.raises(QkvError, match=busy), one_writer(folder):
            pass
    finally:
        process.communicate("", timeout=60)
    with one_writer(folder), one_writer(folder):  # free again, and nested in this process
        (folder / "written").write_text("ok")
    assert (folder / "written").read_text() == "ok"
