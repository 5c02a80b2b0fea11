"""Shared fixtures: a private cache directory and small corpora made from local text."""

import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

from qkv.cli import main

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


@pytest.fixture
def qkv_here(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """`qkv ARGS` run in this process (no interpreter to start): its exit status and output, as
    subprocess.run reports them. For errors and quick commands; end-to-end runs use a process."""

    def run(*args: str) -> subprocess.CompletedProcess:
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's usage errors and --help
            code = stop.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["qkv", *args], code, out.out, out.err)

    return run
