"""Any number for any numeric option of `qkv train` and `qkv generate` (nan, inf, huge, negative,
a float where an int goes): either a clear error (one error line, the last, no traceback) or a
run (which the test interrupts with Ctrl-C after a few seconds if it is still going: then it
must stop cleanly). Each run is a child process under a memory limit."""

from __future__ import annotations

import itertools
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv.cli import main

MEMORY_LIMIT = 6 * 2**30
RUNNING = 8.0  # seconds a run may go on before the test stops it with Ctrl-C
RUNS = itertools.count()  # each train example writes a run directory of its own

TRAIN_OPTIONS = [
    "--steps", "--batch-size", "--context", "--grad-accum", "--lr", "--warmup-steps",
    "--weight-decay", "--beta2", "--grad-clip", "--eval-every", "--eval-windows", "--save-every",
    "--seed", "--val-fraction", "--vocab-size",
]  # fmt: skip
GENERATE_OPTIONS = [
    "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed",
    "--batch-size",
]  # fmt: skip
NUMBERS = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),  # flush_denormal is on
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 0.5, 1e-300, 1e300]),
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """notes.txt (real text) and a tiny trained run, `run`."""
    folder = tmp_path_factory.mktemp("numbers")
    (folder / "notes.txt").write_text((Path(__file__).parent.parent / "README.md").read_text())
    args = f"{TRAIN} --steps 2 --out run".split()
    here = Path.cwd()
    os.chdir(folder)
    try:
        assert main(args) == 0
    finally:
        os.chdir(here)
    return folder


TRAIN = (
    "train --data notes.txt --tokenizer char --set d_model=32 --set n_layers=1 --set n_heads=2 "
    "--steps 3 --batch-size 2 --context 16 --eval-every 3 --eval-windows 2"
)


def run(place: Path, args: list[str]) -> None:
    """`qkv ARGS` in a child: a clear error, a finished run or one that Ctrl-C stops cleanly."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    child = subprocess.Popen(
        [sys.executable, "-m", "qkv", *args],
        cwd=place,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limited,
    )
    try:
        _, stderr = child.communicate(timeout=RUNNING)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
        if child.returncode in (0, -signal.SIGINT):  # the Ctrl-C came once every step was saved
            out = place / args[args.index("--out") + 1]
            assert "saved step-00000003" in stderr and (out / "latest").exists(), stderr
        else:
            assert child.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    if child.returncode in (1, 2):
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr
    else:
        assert child.returncode in (0, 130, -signal.SIGINT), stderr


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(option=st.sampled_from(TRAIN_OPTIONS), value=NUMBERS)
def test_any_number_for_a_train_option_is_an_error_or_a_run(place, option, value):
    run(place, [*TRAIN.split(), "--out", f"scratch-{next(RUNS)}", option, str(value)])


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(option=st.sampled_from(GENERATE_OPTIONS), value=NUMBERS)
def test_any_number_for_a_generate_option_is_an_error_or_a_run(place, option, value):
    base = ["generate", "--model", "run", "--max-new-tokens", "4", "--json", "hello", "there"]
    run(place, [*base, option, str(value)])
