"""Shared fixtures: a private cache directory and small corpora made from local text."""

import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets qkv's cache in a temp dir shared by the session (never ~/.cache), and
    Hugging Face libraries work offline: tests build or ship every model they load."""
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "qkv-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of real English-and-code text: a few standard-library modules' sources."""
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "json/decoder.py", "json/encoder.py", "string.py"):
        source = STDLIB / name
        (folder / name.replace("/", "_")).write_text(source.read_text(encoding="utf-8"))
    return folder
