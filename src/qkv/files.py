"""Low-level file work shared by checkpoint directories and Hugging Face directories.

- safetensors files read whole, or only their header (names, shapes, dtypes) without the data;
- pickled `.bin` weights read only through torch.load(weights_only=True), which refuses any
  pickled object other than tensors and plain containers;
- tensors checked against the names and shapes a model needs;
- directories written atomically: into a hidden temporary directory, fsynced, renamed into place.

Every failure is one QkvError naming the file and what is wrong with it (missing, corrupt,
unreadable, refused).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from qkv.errors import QkvError


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it: its shape and dtype ("F32", "BF16")."""

    shape: tuple[int, ...]
    dtype: str


def _reason(err: BaseException) -> str:
    """The first line of an error's message, so a QkvError stays one line."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextmanager
def _reading(path: Path, label: str) -> Iterator[None]:
    """A safetensors file's read errors as one QkvError: missing, corrupt or unreadable."""
    try:
        yield
    except FileNotFoundError:
        raise QkvError(f"{label} {path} is missing") from None
    except (SafetensorError, ValueError) as err:
        raise QkvError(f"{label} {path} is corrupt ({_reason(err)})") from None
    except OSError as err:
        raise QkvError(f"{label} {path} is unreadable ({_reason(err)})") from None


def read_safetensors(path: Path, label: str = "weight file") -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU; `label` names the file in errors."""
    with _reading(path, label):
        return load_file(path)


def read_safetensors_header(path: Path, label: str = "weight file") -> dict[str, TensorInfo]:
    """Name -> (shape, dtype) of every tensor in a safetensors file, read from its header alone
    (the data is never loaded), e.g. to check a config against the shapes before building."""
    with _reading(path, label), safe_open(path, framework="pt") as file:
        slices = {name: file.get_slice(name) for name in file.keys()}  # noqa: SIM118
        return {name: TensorInfo(tuple(s.get_shape()), s.get_dtype())
                for name, s in slices.items()}  # fmt: skip


def read_pickled_tensors(path: Path) -> dict[str, Tensor]:
    """A pickled state dict (pytorch_model.bin) through torch.load(weights_only=True): tensors
    and plain containers only; a pickle naming any other object is refused, never run."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QkvError(f"weight file {path} is missing") from None
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise QkvError(
                f"{path} holds pickled objects other than tensors ({refused.group(1)}), which "
                "could run code when loaded; refusing it. Convert it to safetensors where you "
                "trust it"
            ) from None
        found = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(err))
        reason = found.group(1) if found else _reason(err)
        raise QkvError(
            f"weight file {path} is corrupt, or not a pickle of tensors alone ({reason}); "
            "refusing it"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError) as err:
        raise QkvError(f"weight file {path} is corrupt ({_reason(err)})") from None
    except OSError as err:
        raise QkvError(f"weight file {path} is unreadable ({_reason(err)})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise QkvError(f"{path} does not hold a dictionary of tensors")
    return tensors


def check_fit(
    tensors: Mapping[str, Tensor | TensorInfo],
    expected: Mapping[str, Tensor | TensorInfo],
    what: str,
    owner: str,
    source: str = "the tensors",
) -> None:
    """Raise a QkvError naming the first tensor missing from, extra to or misshapen for
    `expected` (what `owner`, the config or the model, needs). Either side may be tensors or a
    header's TensorInfo."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise QkvError(
            f"{source} do not fit {owner}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise QkvError(
                f"{what} tensor {name} has shape {list(tensor.shape)} but {owner} "
                f"needs {list(expected[name].shape)}"
            )


def read_fitting(
    path: Path, expected: Mapping[str, Tensor], what: str, owner: str
) -> dict[str, Tensor]:
    """The tensors of a safetensors file, checked to be exactly `expected`'s names and shapes;
    `what` ("checkpoint", "adapter") and `owner` ("the config") name both sides in errors."""
    tensors = read_safetensors(path, f"{what} weight file")
    check_fit(tensors, expected, what, owner, f"{what} weights {path}")
    return tensors


def fsync(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(folder: Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside `folder` to write into; when the block ends, fsync
    what it holds and rename it to `folder`. An existing `folder` is renamed aside first and
    removed only once the new one is in place, so a crash at any moment leaves the old folder
    whole (under .old-NAME-PID between the two renames). When the block raises, the temporary
    directory is removed and `folder` is left as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    old = folder.parent / f".old-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                fsync(Path(root) / name)
            fsync(Path(root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists() or folder.is_symlink():
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def check_new_directory(folder: Path) -> None:
    """`folder` does not exist yet, or is an empty directory: somewhere a command may write
    without touching what is already saved."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise QkvError(f"{folder} already exists and is not empty; choose another --out")


_HELD: dict[Path, int] = {}  # run directories this process holds the lock of, and how often


@contextmanager
def one_writer(folder: Path) -> Iterator[None]:
    """The block holds an advisory lock on `folder` (FOLDER/.lock, released however the block
    ends, even by SIGKILL): a second writer, another process, is refused with the pid that holds
    it. Within one process the lock nests (a run prepared under it, then trained under it)."""
    if folder.exists() and not folder.is_dir():
        raise QkvError(f"--out {folder} is a file; give a directory for the run")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QkvError(f"cannot write to {folder}: {err.strerror}; give another --out") from None
    key = folder.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    owner = folder / ".lock.pid"
    lock = FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text(encoding="utf-8").strip() if owner.is_file() else "unknown"
        raise QkvError(
            f"{folder} is in use by another qkv process (pid {holder}); wait for it to finish, "
            "or give another --out"
        ) from None
    _HELD[key] = 1
    try:
        owner.write_text(str(os.getpid()), encoding="utf-8")
        yield
    finally:
        del _HELD[key]
        lock.release()
