"""Reading text: one reader for the text files qkv reads (corpora, prompts, JSON Lines, model
configs) and standard input, each failure one message naming the file and the fix."""

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
