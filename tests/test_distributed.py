"""Distributed training: `torchrun -m qkv train` with DDP and FSDP2 on CPU (Gloo, 2 processes)
trains on the same global batches as one process, and checkpoints move between world sizes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qkv.data import Batches, TokenFile
from qkv.distributed import World, launched_world, peer_failure, split_batch
from qkv.errors import QkvError

STEPS = 20
TOLERANCE = 1e-5


def run(args: list[str], processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`qkv ARGS` in one process, or under torchrun with `processes` processes on this machine."""
    if processes == 1:
        launcher = [sys.executable, "-m", "qkv"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={processes}", "-m", "qkv"]  # fmt: skip
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ}
    )


def training(corpus_dir: Path, out: Path, options: str) -> list[str]:
    """A tiny char-level model on the test corpus, 20 steps, checkpoints at 10 and 20; 12
    validation windows (3 batches of 4: the second of 2 processes scores one)."""
    tiny = "--set d_model=32 --set n_layers=2 --set n_heads=2 --tokenizer char --context 32"
    schedule = f"--steps {STEPS} --eval-every 10 --save-every 10 --eval-windows 12"
    return ["train", "--data", str(corpus_dir), *tiny.split(), *schedule.split(),
            *options.split(), "--out", str(out)]  # fmt: skip


def records(out: Path, key: str) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


def assert_same_curve(a: Path, b: Path) -> None:
    for key in ("loss", "val_loss"):
        first, second = records(a, key), records(b, key)
        assert len(first) == len(second) > 0
        assert np.abs(np.subtract(first, second)).max() <= TOLERANCE, key


RUNS = {
    "single": (1, "--batch-size 8"),
    "ddp": (2, "--batch-size 4 --grad-accum 2"),
    "fsdp": (2, "--batch-size 4 --grad-accum 2 --strategy fsdp"),
    "ddp-accumulating": (2, "--batch-size 2 --grad-accum 4"),
    "fsdp-accumulating": (2, "--batch-size 2 --grad-accum 4 --strategy fsdp"),
}


class Runs(dict):
    """The same 20 steps of global batch 8: one process with batch 8; two processes with
    batch 4 each, under DDP and under FSDP2, in one micro-batch or accumulating two of 2. Each
    run is trained the first time a test asks for it (the fast suite needs three of them)."""

    def __init__(self, corpus_dir: Path, root: Path) -> None:
        super().__init__()
        self.corpus_dir, self.root = corpus_dir, root

    def __missing__(self, name: str) -> Path:
        processes, options = RUNS[name]
        result = run(training(self.corpus_dir, self.root / name, options), processes)
        assert result.returncode == 0, result.stderr
        if processes > 1:
            strategy, _, accumulating = name.partition("-")
            micro = "2 x 2" if accumulating else "1 x 4"
            summary = f"x 2 processes ({strategy.upper()}, Gloo), each {micro} sequences a step"
            assert summary in result.stdout
            assert result.stdout.count("done: validation loss") == 1  # rank 0 alone prints
        self[name] = self.root / name
        return self[name]


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory) -> Runs:
    return Runs(corpus_dir, tmp_path_factory.mktemp("distributed"))


@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        pytest.param("fsdp", marks=pytest.mark.slow),
        pytest.param("ddp-accumulating", marks=pytest.mark.slow),
        pytest.param("fsdp-accumulating", marks=pytest.mark.slow),
    ],
)
def test_two_processes_of_batch_b_train_like_one_process_of_batch_2b(runs, strategy):
    assert len(records(runs["single"], "loss")) == STEPS
    assert_same_curve(runs["single"], runs[strategy])
    assert records(runs["single"], "loss")[-1] < records(runs["single"], "loss")[0] - 0.5


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_a_checkpoint_of_two_processes_is_the_same_file_as_one_process_writes(runs, strategy):
    for name in ("model.safetensors", "optimizer.safetensors"):
        ours = load_file(runs[strategy] / "latest" / name)
        theirs = load_file(runs["single"] / "latest" / name)
        assert ours.keys() == theirs.keys()
        for key, tensor in ours.items():
            assert tensor.shape == theirs[key].shape, key
            if tensor.is_floating_point():
                assert (tensor - theirs[key]).abs().max() <= 1e-4, key


@pytest.mark.parametrize(
    ("written_by", "resumed_with", "options"),
    [
        pytest.param("ddp", 1, "", marks=pytest.mark.slow),
        pytest.param("fsdp", 1, "", marks=pytest.mark.slow),
        pytest.param("single", 2, "--strategy fsdp", marks=pytest.mark.slow),
    ],
)
def test_checkpoints_resume_in_another_number_of_processes(
    runs, tmp_path, written_by, resumed_with, options
):
    copy = tmp_path / "run"
    shutil.copytree(runs[written_by], copy, symlinks=True)
    (copy / "metrics.jsonl").unlink()  # the resumed run writes it again from its checkpoint
    middle = copy / "checkpoints" / "step-00000010"
    result = run(["train", "--resume", str(middle), *options.split()], resumed_with)
    assert result.returncode == 0, result.stderr
    assert "resuming at step 10" in result.stdout
    assert_same_curve(runs[written_by], copy)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def workers(launcher: subprocess.Popen) -> dict[str, int]:
    """torchrun's worker processes by their RANK."""
    found = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(v[5:] for v in variables if v.startswith(b"RANK="))
        found[rank.decode()] = int(pid)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("machines", "victim"),
    [(1, "rank 0"), (2, "second machine's process")],
)
def test_killing_one_process_stops_the_job_and_keeps_the_last_checkpoint(
    corpus_dir, tmp_path, machines, victim
):
    """SIGKILL one process in the middle of training: every torchrun exits non-zero within a
    minute, and the run resumes from its last checkpoint. Two machines are two torchrun agents
    meeting at a c10d rendezvous, as on a real cluster."""
    out = tmp_path / "run"
    args = training(corpus_dir, out, "--batch-size 4 --grad-accum 2")
    args[args.index("--steps") + 1] = "100000"
    args[args.index("--save-every") + 1] = "5"
    if machines == 1:
        flags = ["--standalone", "--nproc-per-node=2"]
    else:
        flags = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=kill-test"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "qkv", *args]
    jobs = [
        subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(machines)
    ]
    deadline = time.monotonic() + 120
    while not (out / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "latest").exists(), "no checkpoint within 2 minutes"
    processes = workers(jobs[-1])
    os.kill(processes[min(processes)], signal.SIGKILL)
    killed = time.monotonic()
    for job in jobs:
        _, stderr = job.communicate(timeout=120)
        assert job.returncode != 0, stderr
    assert time.monotonic() - killed < 60
    step = int((out / "latest").resolve().name.split("-")[1])
    resumed = run(["train", "--resume", str(out), "--steps", str(step + 2)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stdout


@pytest.mark.slow
def test_ctrl_c_stops_every_process_at_one_step_and_saves_it(corpus_dir, tmp_path):
    """Ctrl-C reaches torchrun and its workers (one process group); FSDP2 gathers the shards,
    rank 0 saves the step they all stopped at, and the run resumes from it."""
    out = tmp_path / "run"
    args = training(corpus_dir, out, "--batch-size 4 --grad-accum 2 --strategy fsdp")
    args[args.index("--steps") + 1] = "100000"
    args[args.index("--save-every") + 1] = "20"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "qkv"]  # fmt: skip
    job = subprocess.Popen(
        [*launcher, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert stderr.count("interrupted at step") == 1, stderr
    stopped = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert f"checkpoint at step {stopped}" in stderr
    assert (out / "latest").resolve().name == f"step-{stopped:08d}"
    assert len(records(out, "loss")) == stopped
    resumed = run(["train", "--resume", str(out), "--steps", str(stopped + 2)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped}" in resumed.stdout


TORCHRUN_RANK_0_OF_2 = {
    "TORCHELASTIC_RUN_ID": "t",
    "WORLD_SIZE": "2",
    "RANK": "0",
    "LOCAL_RANK": "0",
}


def as_torchrun_rank_0(args: list[str]) -> subprocess.CompletedProcess:
    """`qkv ARGS` with the environment torchrun gives rank 0 of 2 (checks made before joining
    the process group; nothing waits for a rank 1)."""
    return subprocess.run(
        [sys.executable, "-m", "qkv", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **TORCHRUN_RANK_0_OF_2},
    )


def test_the_global_batch_must_split_over_the_processes(corpus_dir, tmp_path):
    result = as_torchrun_rank_0(training(corpus_dir, tmp_path / "r", "--batch-size 3"))
    assert result.returncode == 2
    assert "does not split evenly over 2 processes; make it a multiple of 2" in result.stderr
    assert not (tmp_path / "r").exists()


def test_only_train_runs_under_torchrun(tmp_path):
    result = as_torchrun_rank_0(["eval", "--model", str(tmp_path)])
    assert result.returncode == 2
    assert "torchrun runs qkv train only" in result.stderr


def test_world_size_outside_torchrun_is_one_process(monkeypatch):
    for name, value in TORCHRUN_RANK_0_OF_2.items():
        if name != "TORCHELASTIC_RUN_ID":
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launched_world() == World()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t")
    assert launched_world() == World(rank=0, size=2, local_rank=0)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
         "[127.0.0.1]:2227. This is typically caused by a remote worker crashing.",
         "lost another process of this job (Connection closed by peer [127.0.0.1]:2227)"),
        ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
         "waiting 600000ms for recv operation to complete",
         "stopped answering"),
        ("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)", None),
    ],
)  # fmt: skip
def test_peer_failures_are_told_from_other_errors(message, expected):
    found = peer_failure(RuntimeError(message))
    assert found == expected or (expected is not None and expected in (found or ""))


@pytest.mark.parametrize(
    ("batch", "accum", "world", "expected"),
    [(8, 1, 1, (8, 1)), (4, 2, 2, (4, 1)), (8, 1, 2, (4, 1)), (8, 3, 2, (6, 2)), (5, 4, 4, (5, 1))],
)
def test_split_batch_keeps_the_global_batch(batch, accum, world, expected):
    micro, per_process = split_batch(batch, accum, World(0, world))
    assert (micro, per_process) == expected
    assert micro * per_process * world == batch * accum and micro <= batch


def test_split_batch_refuses_a_batch_that_does_not_divide():
    with pytest.raises(QkvError, match="multiple of 4"):
        split_batch(3, 2, World(0, 4))


def test_every_process_reads_its_own_share_of_the_same_windows():
    tokens = np.arange(5000, dtype=np.uint16)
    data = TokenFile(tokens, n_bytes=len(tokens))
    whole = Batches(data, 12, 16, seed=3)
    shares = [Batches(data, 3, 16, seed=3, accum=2, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        x, y = whole.next()
        parts = [share.next() for share in shares for _ in range(2)]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), y, rtol=0, atol=0)
