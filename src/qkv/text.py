"""Reading text: one reader for the text files qkv reads (corpora, prompts, JSON Lines, model
configs) and standard input, each failure one message naming the file and the fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qkv.errors import QkvError


def read_text_file(path: Path, what: str = "data file") -> str:
    """The file's text, or a QkvError naming (as `what`) a missing, empty, binary or non-UTF-8
    file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise QkvError(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise QkvError(f"{what} {path} is a directory where a file was expected") from None
    except OSError as err:
        raise QkvError(f"cannot read {what} {path}: {err.strerror}") from None
    if not data.strip():
        raise QkvError(f"{what} {path} is empty; give files that contain text")
    if b"\x00" in data[:8192]:
        raise QkvError(f"{what} {path} looks binary (it contains NUL bytes); give text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise QkvError(
            f"{what} {path} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} "
            "cannot be decoded; convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_text(path: str | Path) -> tuple[str, str]:
    """(name, text) of a file (read_text_file's checks), or of standard input for '-'."""
    if str(path) != "-":
        return str(path), read_text_file(Path(path))
    try:
        return "standard input", sys.stdin.buffer.read().decode("utf-8")
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


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON Lines file ('-': standard input)."""
    name, text = read_text(path)
    return parse_json_lines(name, text_lines(text))
