"""Low-level file work shared by checkpoint directories and Hugging Face directories.

- safetensors files read whole, or only their header (names, shapes, dtypes) without the data;
- pickled `.bin` weights read only through torch.load(weights_only=True), which refuses any
  pickled object other than tensors and plain containers;
- tensors checked against the names and shapes a model needs;
- directories written atomically: into a hidden temporary directory, fsynced, renamed into place;
- somewhere to write checked before any work, by creating (and removing) an entry there.

Every failure is one QkvError naming the file and what is wrong with it (missing, corrupt,
unreadable, refused), and a write that fails says the errno's meaning and number and how to fix
it (free space, or another --out).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from qkv.errors import QkvError, describe_os_error


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


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: free space, or write elsewhere
_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)  # not writable: elsewhere


def _os_error(err: BaseException) -> OSError | None:
    """The operating system's error behind a failed write: `err` itself, or the one a
    safetensors write reports as "os error N"; None for any other failure."""
    if isinstance(err, OSError):
        return err
    found = re.search(r"os error (\d+)", str(err)) if isinstance(err, SafetensorError) else None
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


def write_error(target: str, err: OSError, after: str = "") -> QkvError:
    """`cannot write TARGET: MEANING (errno N); FIX` + `after`, the fix by the errno: free space
    when the disk or a file size limit is full, an --out you can write to when refused."""
    if err.errno in _FULL:
        fix = "free space or pass --out on another disk"
    elif err.errno in _REFUSED:
        fix = "pass an --out you can write to"
    else:
        fix = "check the disk, or pass --out on another one"
    return QkvError(f"cannot write {target}: {describe_os_error(err)}; {fix}{after}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: a reader sees the
    old file or the whole new one, never part of it; a failed write leaves the old one."""
    if path.is_dir():
        raise QkvError(f"cannot write {path}: it is a directory; give a file name")
    if not path.parent.is_dir():
        raise QkvError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # a read-only mount refuses even this (EROFS)
            tmp.unlink(missing_ok=True)
        raise QkvError(
            f"cannot write {path}: {describe_os_error(err)}; free space or write elsewhere"
        ) from None


def check_writable(folder: Path) -> None:
    """`folder`, or the nearest of its parents that exists, takes a new entry: tried by creating
    and removing a hidden directory there, since access(2) misses refusals (root passes it where
    sysfs, a mount's permissions or a full disk still refuse)."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qkv-probe-", dir=existing))
    except OSError as err:
        raise write_error(f"to {folder}", err) from None


@contextmanager
def atomic_directory(folder: Path, what: str = "directory", after: str = "") -> Iterator[Path]:
    """Yield an empty hidden directory beside `folder` to write into; when the block ends, fsync
    what it holds and rename it to `folder`. An existing `folder` is renamed aside first and
    removed only once the new one is in place, so a crash at any moment leaves the old folder
    whole (under .old-NAME-PID between the two renames). When the block raises, the temporary
    directory is removed and `folder` is left as it was; a failed write (a full disk, a
    read-only one) is raised as write_error naming `what` `folder`, with `after` appended."""
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    old = folder.parent / f".old-{folder.name}-{os.getpid()}"
    aside = False
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                fsync(Path(root) / name)
            fsync(Path(root))
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists() or folder.is_symlink():
            os.replace(folder, old)
            aside = True
        os.replace(tmp, folder)
        fsync(folder.parent)
    except BaseException as err:
        if aside and tmp.exists():  # the new folder never took its place: the old one goes back
            os.replace(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        failed = _os_error(err)
        if failed is None:
            raise
        raise write_error(f"{what} {folder}", failed, after) from None
    shutil.rmtree(old, ignore_errors=True)


def check_new_directory(folder: Path) -> None:
    """`folder` does not exist yet, or is an empty directory: somewhere a command may write
    without touching what is already saved, and that takes new entries (check_writable)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise QkvError(f"{folder} already exists and is not empty; choose another --out")
    check_writable(folder)


_HELD: dict[Path, int] = {}  # run directories this process holds the lock of, and how often


@contextmanager
def one_writer(folder: Path) -> Iterator[None]:
    """The block holds an advisory lock on `folder` (FOLDER/.lock, released however the block
    ends, even by SIGKILL): a second writer, another process, is refused with the pid that holds
    it. Within one process the lock nests (a run prepared under it, then trained under it).
    A block that raises before anything is saved there (the folder holds what it held, and the
    lock's files) leaves no trace: the lock's files it made are removed, and the folders this
    call created; a folder that existed stays, with all it held."""
    if folder.exists() and not folder.is_dir():
        raise QkvError(f"--out {folder} is a file; give a directory for the run")
    created = [p for p in (folder, *folder.absolute().parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        before = set(os.listdir(folder))
    except OSError as err:
        raise write_error(f"to {folder}", err) from None
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
    except OSError as err:  # a read-only or full run directory: refused before any work
        raise write_error(f"to {folder}", err) from None
    try:
        owner.write_text(str(os.getpid()), encoding="utf-8")
    except OSError as err:
        lock.release()
        raise write_error(f"to {folder}", err) from None
    _HELD[key] = 1
    try:
        yield
    except BaseException:
        _remove_if_unused(folder, before, created)
        raise
    finally:
        del _HELD[key]
        lock.release()


def _remove_if_unused(folder: Path, before: set[str], created: list[Path]) -> None:
    """Where `folder` holds what it held `before` and the lock's files, remove those of the lock
    files that were not there before, then the folders in `created` (deepest first) while they
    are empty."""
    lock_files = {".lock", ".lock.pid"}
    try:
        if set(os.listdir(folder)) - lock_files != before - lock_files:
            return  # something was saved: the run's to keep
        for name in lock_files - before:
            (folder / name).unlink(missing_ok=True)
        for made in created:
            made.rmdir()
    except OSError:  # written to meanwhile, or not ours to change: kept as it is
        pass
