"""The catalog of bad inputs and faults (issue 14): each case is one command that must end with
its exit status and one error line on stderr naming the problem (the last line, after any
progress lines; no traceback), leaving every
saved run as it was (hashed before and after). Cases that could allocate without bound run in a
child process under a memory limit (RLIMIT_AS), so a regression fails here, not the machine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qkv.cli import main

MEMORY_LIMIT = 6 * 2**30  # address space of a child: torch and a tiny model fit in ~2 GB


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder with notes.txt (real text) and a tiny trained run, `run`."""
    folder = tmp_path_factory.mktemp("catalog")
    text = "".join((Path(__file__).parent.parent / name).read_text() for name in ("README.md",))
    (folder / "notes.txt").write_text(text)
    tiny = "--set d_model=32 --set n_layers=2 --set n_heads=2 --tokenizer char"
    args = f"train --data notes.txt {tiny} --steps 4 --batch-size 4 --context 32 --out run"
    here = Path.cwd()
    os.chdir(folder)
    try:
        assert main(args.split()) == 0
    finally:
        os.chdir(here)
    return folder


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (links by their target)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock.pid"
    }


def copy_with_config(place: Path, name: str, **changes: object) -> str:
    """A copy of the run's latest checkpoint whose config.json has `changes`."""
    target = place / name
    if not target.exists():
        shutil.copytree((place / "run" / "latest").resolve(), target)
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **changes}))
    return name


def hf_with_config(place: Path, name: str, **changes: object) -> str:
    """The run exported as a Hugging Face GPT-2 directory, its config.json changed."""
    exported = place / "hf"
    if not exported.exists():
        assert main(["export", "--model", str(place / "run"), "--out", str(exported)]) == 0
    target = place / name
    if not target.exists():
        shutil.copytree(exported, target)
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **changes}))
    return name


def make_fifo(place: Path) -> str:
    if not (place / "fifo").exists():
        os.mkfifo(place / "fifo")
    return "fifo"


def make_late_nul(place: Path) -> str:
    (place / "late-nul.txt").write_bytes(b"plain text\n" * 5000 + b"\x00 and more\n")
    return "late-nul.txt"


def with_more_vocabulary(place: Path) -> str:
    """A copy of the run's checkpoint whose config asks for 5 more embedding rows than its
    tokenizer has tokens."""
    config = json.loads(((place / "run" / "latest").resolve() / "config.json").read_text())
    return copy_with_config(place, "vocab", vocab_size=config["vocab_size"] + 5)


def make_pairs(place: Path) -> str:
    lines = [json.dumps({"prompt": f"What is {n}?", "response": f"It is {n}."}) for n in range(40)]
    (place / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return "pairs.jsonl"


def unwritable() -> str:
    """A directory no one may create entries in, even root (sysfs)."""
    return "/sys/kernel/qkv-out"


def refuses_entries(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return True
    path.rmdir()
    return False


@dataclass(frozen=True)
class Case:
    """`qkv ARGS` (built in the folder by `args`), its exit status and a part of its one line."""

    name: str
    args: Callable[[Path], list[str]]
    message: str
    code: int = 2
    stdin: str | None = None  # a file for standard input (in a child process)
    risky: bool = False  # may allocate without bound: run in a child under MEMORY_LIMIT


S2S = "train --arch encoder-decoder --task reverse --steps 2 --out new-run"
TRAIN = "train --data notes.txt --tokenizer char --steps 2 --context 32 --out new-run"
CASES = [
    # 1. work sized before it is started
    Case(
        "train-huge-batch",
        lambda p: f"{TRAIN} --batch-size 100000000".split(),
        "activations of one step",
        risky=True,
    ),
    Case(
        "train-100000-layers",
        lambda p: f"{TRAIN} --set n_layers=100000".split(),
        "(parameters ",
        risky=True,
    ),
    Case(
        "train-huge-d-model",
        lambda p: f"{TRAIN} --set d_model=1048576".split(),
        "(parameters ",
        risky=True,
    ),
    Case(
        "seq2seq-100000-layers",
        lambda p: [*S2S.split(), "--set", "n_layers=100000"],
        "(parameters ",
        risky=True,
    ),
    Case(
        "checkpoint-config-100000-layers",
        lambda p: ["generate", "--model", copy_with_config(p, "deep", n_layers=100000), "hi"],
        "says n_layers=100000 but",
        risky=True,
    ),
    Case(
        "checkpoint-config-huge-d-model",
        lambda p: ["generate", "--model", copy_with_config(p, "wide", d_model=1048576), "hi"],
        "has shape",
        risky=True,
    ),
    Case(
        "hf-config-100000-layers",
        lambda p: ["generate", "--model", hf_with_config(p, "hf-deep", n_layer=100000), "hi"],
        "asks for 100000 layers but the weights hold 2",
        risky=True,
    ),
    Case(
        "hf-config-huge-d-model",
        lambda p: ["generate", "--model", hf_with_config(p, "hf-wide", n_embd=1048576), "hi"],
        "has shape",
        risky=True,
    ),
    # 2. reads are bounded
    Case(
        "train-data-dev-zero",
        lambda p: [*TRAIN.replace("notes.txt", "/dev/zero").split(), "--batch-size", "4"],
        "/dev/zero is a device, not a text file",
        risky=True,
    ),
    Case(
        "generate-prompts-dev-zero",
        lambda p: ["generate", "--model", "run", "--prompts", "/dev/zero"],
        "prompts file /dev/zero is a device",
        risky=True,
    ),
    Case(
        "eval-data-dev-zero",
        lambda p: ["eval", "--model", "run", "--data", "/dev/zero"],
        "data file /dev/zero is a device",
        risky=True,
    ),
    Case(
        "generate-prompts-stdin-dev-zero",
        lambda p: ["generate", "--model", "run", "--prompts", "-"],
        "standard input looks binary (a NUL byte at offset 0)",
        stdin="/dev/zero",
        risky=True,
    ),
    Case(
        "train-data-fifo-without-writer",
        lambda p: TRAIN.replace("notes.txt", make_fifo(p)).split(),
        "is empty (a pipe no one wrote to)",
        risky=True,
    ),
    Case(
        "train-data-nul-after-8-kb",
        lambda p: TRAIN.replace("notes.txt", make_late_nul(p)).split(),
        "looks binary (a NUL byte at offset 55000)",
    ),
    # 5. mismatched parts
    Case(
        "checkpoint-tokenizer-smaller-than-model",
        lambda p: ["generate", "--model", with_more_vocabulary(p), "hi"],
        "the model would generate ids the tokenizer cannot decode",
    ),
    Case(
        "finetune-unknown-lora-target",
        lambda p: [
            "finetune",
            "--model",
            "run",
            "--data",
            make_pairs(p),
            "--lora-rank",
            "2",
            "--lora-targets",
            "q_proj,bogus",
            "--steps",
            "1",
            "--out",
            "new-run",
        ],
        "--lora-targets names bogus, which this model does not have",
    ),
    # 6. filesystem failures (a full disk mid-save: tests/test_filesystem_failures.py)
    Case(
        "train-out-not-writable",
        lambda p: [*TRAIN.replace("new-run", unwritable()).split(), "--batch-size", "4"],
        f"cannot write to {unwritable()}",
    ),
    Case(
        "export-out-not-writable",
        lambda p: ["export", "--model", "run", "--out", unwritable()],
        f"cannot write to {unwritable()}",
    ),
    # 7. edge values
    Case(
        "train-seed-beyond-64-bits",
        lambda p: [*TRAIN.split(), "--seed", "99999999999999999999999"],
        "--seed",
    ),
    Case(
        "explain-model-invalid-utf8",  # a shell's $'ab\xffcd', as Python decodes arguments
        lambda p: ["explain", "--model", "run", "ab\udcffcd"],
        "a lone surrogate (\\udcff) at character 2",
    ),
    Case("quickstart-minutes-nan", lambda p: ["quickstart", "--minutes", "nan"], "--minutes"),
    Case("quickstart-minutes-inf", lambda p: ["quickstart", "--minutes", "inf"], "--minutes"),
]


CHILD = """
import contextlib, io, json, os, resource, sys, traceback
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from qkv.cli import main
results = {}
for name, args, stdin in json.loads(open(sys.argv[1]).read()):
    err = io.StringIO()
    with open(stdin or os.devnull, "rb") as source:
        sys.stdin = io.TextIOWrapper(source)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as stop:
                code = stop.code
            except BaseException:
                traceback.print_exc()
                code = -1
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def risky(place: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every risky case run in one child process under MEMORY_LIMIT (one interpreter start for
    all of them), each with its own standard input and captured stderr."""
    cases = [(c.name, c.args(place), c.stdin) for c in CASES if c.risky or c.stdin]
    (place / "risky.json").write_text(json.dumps(cases))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, "risky.json", str(MEMORY_LIMIT)],
        cwd=place, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        name: subprocess.CompletedProcess(args, results[name][0], "", results[name][1])
        for name, args, _ in cases
    }


def run_case(case: Case, place: Path, capsys, risky) -> subprocess.CompletedProcess:
    if case.risky or case.stdin:
        return risky[case.name]
    args = case.args(place)
    here = Path.cwd()
    os.chdir(place)
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code
    finally:
        os.chdir(here)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_catalog_case(case: Case, place: Path, capsys, request):
    if "not-writable" in case.name and not refuses_entries(Path(unwritable())):
        pytest.skip("sysfs takes new entries here; tests/test_filesystem_failures.py covers it")
    before = digest(place / "run")
    risky = request.getfixturevalue("risky") if case.risky or case.stdin else {}
    result = run_case(case, place, capsys, risky)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == case.code, result.stderr
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().endswith(errors[0]), "the error is the last line"
    assert case.message in errors[0], errors[0]
    assert digest(place / "run") == before
    assert not (place / "new-run" / "checkpoints").exists()
