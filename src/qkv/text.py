"""Reading text: one reader for the text files qkv reads (corpora, prompts, JSON Lines, model
configs) and standard input, each failure one message naming the file and the fix; and one
confined, bounded reader for the files of a model directory (model_file, read_model_text,
read_model_json): regular files inside the directory only, never through a link out of it."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

from qkv.errors import QkvError

CHUNK = 1 << 24  # bytes read at a time, each checked before the next is read
STREAM_LIMIT = 1 << 30  # most bytes taken from a pipe or standard input (a file: its size)
MODEL_TEXT_LIMIT = 1 << 26  # most bytes of a model directory's text file (tokenizer.json: ~33 MB)
FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
}


def read_text_file(path: Path, what: str = "data file") -> str:
    """The text of a regular file or a pipe, or a QkvError naming (as `what`) a missing, empty,
    binary (a NUL byte anywhere) or non-UTF-8 file, a directory or a device (/dev/zero)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO without a writer: no hang
    except FileNotFoundError:
        raise QkvError(f"{what} {path} does not exist; check the path") from None
    except OSError as err:
        raise QkvError(f"cannot read {what} {path}: {err.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise QkvError(f"{what} {path} is a directory where a file was expected")
        raise QkvError(f"{what} {path} is a device, not a text file; give a file of text")
    os.set_blocking(fd, True)  # a pipe with no writer reads as empty
    with os.fdopen(fd, "rb", buffering=0) as file:
        data = _read_bounded(file, f"{what} {path}", None if stat.S_ISREG(mode) else STREAM_LIMIT)
    if not data or data.isspace():
        pipe = " (a pipe no one wrote to)" if stat.S_ISFIFO(mode) else ""
        raise QkvError(f"{what} {path} is empty{pipe}; give files that contain text")
    return _decode(data, f"{what} {path}")


def _read_bounded(file: BinaryIO, name: str, limit: int | None) -> bytearray:
    """All of `file`'s bytes, chunk by chunk into one growing buffer (about the file's size at
    the peak): a NUL byte, more than `limit` bytes (a stream) or more than memory holds is a
    QkvError naming `name` at once."""
    data, total = bytearray(), 0
    try:
        while chunk := file.read(CHUNK):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise QkvError(
                    f"{name} looks binary (a NUL byte at offset {total + nul}); give text files"
                )
            total += len(chunk)
            if limit is not None and total > limit:
                raise QkvError(
                    f"{name} gives more than {limit >> 20} MiB; save the text to a file first"
                )
            data += chunk
        return data
    except MemoryError:
        raise QkvError(f"{name} is too large to hold in memory ({total:,} bytes read)") from None
    except OSError as err:
        raise QkvError(f"cannot read {name}: {err.strerror}") from None


def _decode(data: bytearray, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise QkvError(
            f"{name} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} "
            "cannot be decoded; convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_text(path: str | Path, what: str = "data file") -> tuple[str, str]:
    """(name, text) of a file (read_text_file's checks, naming it as `what`), or of standard
    input for '-' (at most STREAM_LIMIT bytes, no NUL)."""
    if str(path) != "-":
        return str(path), read_text_file(Path(path), what)
    data = _read_bounded(sys.stdin.buffer, "standard input", STREAM_LIMIT)
    try:
        return "standard input", data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise QkvError(
            f"standard input is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None


def text_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every non-blank line, a leading byte-order mark dropped."""
    lines = enumerate(text.removeprefix("\ufeff").splitlines(), 1)
    return [(number, line) for number, line in lines if line.strip()]


def parse_json_lines(name: str, lines: list[tuple[int, str]]) -> list[tuple[int, Any]]:
    """(line number, value) of JSON Lines; a line that is not JSON is a QkvError naming `name`
    (the file) and the line."""
    values = []
    for number, line in lines:
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise QkvError(f"{name}, line {number}: not valid JSON ({err.msg})") from None
    return values


def read_jsonl(path: str | Path, what: str = "data file") -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON Lines file ('-': standard input)."""
    name, text = read_text(path, what)
    return parse_json_lines(name, text_lines(text))


def check_unicode(text: str) -> str:
    """`text` itself, or a QkvError where it holds a lone surrogate (JSON's "\\ud800", or a
    command-line argument's invalid UTF-8 byte decoded with surrogateescape), which no tokenizer
    can encode."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise QkvError(
            f"the text is not valid Unicode: a lone surrogate (\\u{ord(text[err.start]):04x}) at "
            f"character {err.start}; send UTF-8 text"
        ) from None
    return text


def _roots(folder: Path) -> tuple[Path, ...]:
    """Where a model directory's files may resolve: the directory, and for a snapshot of the
    Hugging Face cache (REPO/snapshots/REV, whose files link to ../../blobs/HASH) REPO/blobs."""
    real = folder.resolve()
    if real.parent.name == "snapshots":
        return real, real.parent.parent / "blobs"
    return (real,)


def model_file(folder: Path, name: str) -> Path | None:
    """FOLDER/NAME, a file of a model directory (a qkv checkpoint, a run, a LoRA adapter, a
    Hugging Face directory), once checked to be a regular file that resolves inside the
    directory; None where there is nothing by that name. Anything else there is a QkvError
    naming it: a FIFO, a device (/dev/zero), a directory, a broken link, or a link (of the
    file or of a folder on its way) to somewhere outside the directory. (The directory is
    taken to hold still while it is read: a link swapped in between the check and the read is
    not caught, except that a read never blocks.)"""
    path = folder / name
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        if not path.is_symlink():
            return None
        raise QkvError(
            f"{path} is a link to {os.readlink(path)}, which does not exist; restore the "
            "file, or remove the link"
        ) from None
    except OSError as err:
        raise QkvError(f"cannot read {path}: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        link = f" (a link to {os.readlink(path)})" if path.is_symlink() else ""
        raise QkvError(
            f"{path} is {FILE_KINDS.get(stat.S_IFMT(mode), 'not a file')}{link}, not a regular "
            f"file; put the model's {Path(name).name} there as a file"
        )
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in _roots(folder)):
        raise QkvError(
            f"{path} leads outside its model directory {folder} (to {real}); refusing to read "
            "it: copy the file into the directory instead of linking to it"
        )
    return path


def read_model_text(folder: Path, name: str) -> str:
    """The UTF-8 text of FOLDER/NAME (model_file's checks; missing: a QkvError), at most
    MODEL_TEXT_LIMIT bytes, opened without blocking (a FIFO put there after the check is
    refused, not waited on)."""
    path = model_file(folder, name)
    if path is None:
        raise QkvError(f"{folder / name} is missing; restore it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise QkvError(f"cannot read {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # replaced since model_file looked
            raise QkvError(f"{path} is not a regular file; put the model's {name} there")
        if info.st_size > MODEL_TEXT_LIMIT:
            raise QkvError(
                f"{path} holds {info.st_size:,} bytes, more than the {MODEL_TEXT_LIMIT >> 20} MiB "
                "of any model's text file; put the model's own file there"
            )
        data = _read_bounded(file, str(path), MODEL_TEXT_LIMIT)
    return _decode(data, str(path))


def read_model_json(folder: Path, name: str, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in FOLDER/NAME (read_model_text's checks); with `missing_ok` a missing
    file is {}. Invalid JSON, JSON nested deeper than Python parses, or a value other than an
    object is a QkvError naming the file."""
    if missing_ok and model_file(folder, name) is None:
        return {}
    path = folder / name
    text = read_model_text(folder, name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise QkvError(
            f"{path} is corrupt: not valid JSON ({err.msg} at line {err.lineno}, column "
            f"{err.colno}); restore the file"
        ) from None
    except RecursionError:
        raise QkvError(
            f"{path} is corrupt: its JSON nests deeper than can be read; restore the file"
        ) from None
    if not isinstance(value, dict):
        kind = "a list" if isinstance(value, list) else repr(value)[:40]
        raise QkvError(
            f"{path} is corrupt: it is not a JSON object (it holds {kind}); restore the file"
        )
    return value
