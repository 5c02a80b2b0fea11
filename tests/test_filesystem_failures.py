"""Filesystem failures, one line each: an --out that cannot be written is refused before any
work; a disk that fills during a save leaves the previous checkpoint whole and nothing temporary
behind; a run's record (metrics.jsonl, loss.png) that cannot be written is a warning.

The faults are the kernel's own: a directory no one may write into (immutable by chattr +i,
which stops even root, or without write permission for anyone else), sysfs (which takes no new
entries), a file size limit (RLIMIT_FSIZE with SIGXFSZ ignored: writes past it fail with EFBIG
as a full disk's fail with ENOSPC) and, where this user may make a private mount namespace, a
read-only mount and a full tmpfs.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from qkv.checkpoint import read_run, save_training_checkpoint, write_checkpoint
from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.metrics import record
from qkv.model import build_model
from qkv.tokenizer import Tokenizer

TINY = "--set d_model=32 --set n_layers=2 --set n_heads=2 --tokenizer char --batch-size 4 "
TINY += "--context 32 --eval-every 2 --eval-windows 4 --save-every 2"
FIX = "pass an --out you can write to"  # for a refused write
FULL = "free space or pass --out on another disk"  # for a full disk


def training(corpus_dir: Path, out: Path, steps: int) -> list[str]:
    """`qkv train` of a tiny char-level model on the test corpus, saving every 2 steps."""
    return ["train", "--data", str(corpus_dir), *TINY.split(), "--steps", str(steps),
            "--out", str(out)]  # fmt: skip


def refusal(folder: Path) -> OSError:
    """The error the kernel gives for a new entry in `folder` (the test is skipped if none)."""
    try:
        os.mkdir(folder / "probe")
    except OSError as err:
        return err
    os.rmdir(folder / "probe")
    pytest.skip(f"{folder} takes new entries here, so it cannot stand for an unwritable one")


@pytest.fixture
def lock_up() -> Iterator[Callable[[Path], Path]]:
    """Makes a directory refuse new entries until the test ends: immutable (chattr +i) for
    root, whom permissions do not stop; without write permission for anyone else."""
    root, chattr, locked = os.geteuid() == 0, shutil.which("chattr"), []

    def lock(folder: Path) -> Path:
        immutable = [chattr or "chattr", "+i", str(folder)]
        if not root:
            folder.chmod(0o555)
        elif chattr is None or subprocess.run(immutable, capture_output=True).returncode:
            pytest.skip("chattr +i is not available on this file system, and root ignores chmod")
        locked.append(folder)
        return folder

    yield lock
    for folder in locked:
        if root:
            subprocess.run([chattr, "-i", folder], check=True)
        else:
            folder.chmod(0o755)


@pytest.fixture
def unwritable(tmp_path: Path, lock_up: Callable[[Path], Path]) -> Path:
    """An empty directory that refuses new entries."""
    folder = tmp_path / "locked"
    folder.mkdir()
    return lock_up(folder)


def decoder(folder: Path) -> Path:
    """A small GPT-2-shaped checkpoint, which qkv export writes (about 100 KB of weights)."""
    tokenizer = Tokenizer.train_char(["the quick brown fox jumps over the lazy dog"])
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                         max_seq_len=32)  # fmt: skip
    return write_checkpoint(folder, build_model(config), tokenizer)


def file_size_limit(size: int) -> Callable[[], None]:
    """A child's preexec_fn: no file may grow past `size` bytes; a write past it fails (EFBIG)
    instead of killing the process."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def qkv_limited(size: int, *args: str) -> subprocess.CompletedProcess:
    """`qkv ARGS` in a child process whose files may not grow past `size` bytes."""
    return subprocess.run([sys.executable, "-m", "qkv", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=file_size_limit(size))  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def leftovers(folder: Path) -> list[str]:
    """Hidden entries under `folder` other than the run's lock: temporary files and folders."""
    hidden = (p for p in folder.rglob(".*") if p.name not in {".lock", ".lock.pid"})
    return sorted(str(p.relative_to(folder)) for p in hidden)


def one_error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (progress bars may come before it)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


@pytest.mark.parametrize("command", ["train", "export"])
@pytest.mark.parametrize("where", ["an unwritable directory", "inside one", "under sysfs"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(
    command: str, where: str, request, tmp_path: Path, corpus_dir: Path, qkv_here
) -> None:
    if where == "under sysfs":
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs here")
        parent, out = Path("/sys/kernel"), Path("/sys/kernel/qkv-out")
    else:
        parent = request.getfixturevalue("unwritable")
        out = parent if where == "an unwritable directory" else parent / "run"
    err = refusal(parent)
    if command == "train":
        result = qkv_here(*training(corpus_dir, out, 2))
    else:
        result = qkv_here("export", "--model", str(decoder(tmp_path / "model")), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr == (  # one line, and nothing before it: no tokenizing, no training
        f"qkv {command}: error: cannot write to {out}: {err.strerror} (errno {err.errno}); {FIX}\n"
    )
    assert out == parent or not out.exists()


@pytest.mark.slow
def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_whole(
    corpus_dir: Path, tmp_path: Path, qkv_here
) -> None:
    run = tmp_path / "run"
    assert qkv_here(*training(corpus_dir, run, 2)).returncode == 0
    previous = (run / "latest").resolve()
    before = digests(previous)
    weights = (previous / "model.safetensors").stat().st_size
    result = qkv_limited(weights // 2, "train", "--resume", str(run), "--steps", "4")
    assert one_error(result) == (
        f"qkv train: error: cannot write checkpoint {previous.parent / 'step-00000004'}: File "
        f"too large (errno 27); {FULL}; the previous checkpoint {previous} is untouched"
    )
    assert os.readlink(run / "latest") == "checkpoints/step-00000002"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert digests(previous) == before and leftovers(run) == []
    assert read_run(run).step == 2
    # with room again, the run goes on from the checkpoint the failure left alone
    assert qkv_here("train", "--resume", str(run), "--steps", "4").returncode == 0
    assert os.readlink(run / "latest") == "checkpoints/step-00000004"


@pytest.mark.slow
def test_a_first_save_that_fails_says_none_was_saved_and_its_record_warns(
    corpus_dir: Path, tmp_path: Path, qkv_here
) -> None:
    assert qkv_here(*training(corpus_dir, tmp_path / "warm", 1)).returncode == 0  # cached data
    run = tmp_path / "run"
    result = qkv_limited(200, *training(corpus_dir, run, 4))  # even config.json is too big
    assert (
        f"cannot write {run / 'metrics.jsonl'}: File too large (errno 27); not stopping the run "
        "for it: the next evaluation or checkpoint writes it whole again"
    ) in result.stderr
    assert one_error(result) == (
        f"qkv train: error: cannot write checkpoint {run / 'checkpoints' / 'step-00000002'}: "
        f"File too large (errno 27); {FULL}; no earlier checkpoint was saved"
    )
    assert sorted(p.name for p in run.iterdir()) == [".lock", ".lock.pid", "checkpoints"]
    assert list((run / "checkpoints").iterdir()) == []


def test_a_latest_link_that_cannot_be_swapped_still_names_the_previous_checkpoint(
    tmp_path: Path, lock_up: Callable[[Path], Path]
) -> None:
    tokenizer = Tokenizer.train_char(["abc"])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=8, n_heads=2, n_layers=1,
                         max_seq_len=8)  # fmt: skip
    model, run = build_model(config), tmp_path / "run"

    def save(step: int) -> Path:
        state = {"step": step, "train_config": {"data": ["corpus.txt"]}}
        optimizer = {"optimizer.0.step": torch.tensor(float(step))}
        return save_training_checkpoint(run, step, model, tokenizer, optimizer, state)

    save(3)
    err = refusal(lock_up(run))  # the run directory refuses new entries; its checkpoints/ not
    with pytest.raises(QkvError) as failed:
        save(6)
    new = run / "checkpoints" / "step-00000006"
    assert str(failed.value) == (
        f"cannot write the link {run / 'latest'} to {new}: {err.strerror} (errno {err.errno}); "
        f"{FIX}; the checkpoint itself is whole: resume from it with --resume {new}"
    )
    assert os.readlink(run / "latest") == "checkpoints/step-00000003" and leftovers(run) == []
    assert read_run(new).step == 6


@pytest.mark.slow
def test_a_full_disk_during_export_leaves_nothing_behind(tmp_path: Path) -> None:
    model, out = decoder(tmp_path / "model"), tmp_path / "hf"
    size = (model / "model.safetensors").stat().st_size
    result = qkv_limited(size // 2, "export", "--model", str(model), "--out", str(out))
    assert one_error(result) == (
        f"qkv export: error: cannot write Hugging Face directory {out}: File too large "
        f"(errno 27); {FULL}"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_record_that_cannot_be_written_is_a_warning(unwritable: Path) -> None:
    err = refusal(unwritable)
    history = [{"step": 1, "loss": 3.0}, {"step": 1, "val_loss": 3.5}]
    with pytest.warns(UserWarning) as warned:
        record(history, unwritable)
    assert [str(w.message) for w in warned] == [
        f"cannot write {unwritable / 'metrics.jsonl'}: {err.strerror} (errno {err.errno}); not "
        "stopping the run for it: the next evaluation or checkpoint writes it whole again, and "
        "each checkpoint's trainer_state.json holds the same history"
    ]
    assert list(unwritable.iterdir()) == []


@pytest.fixture(scope="module")
def unshare(tmp_path_factory) -> list[str]:
    """The unshare(1) command that gives a child its own mounts: as root, or in a user
    namespace; the test is skipped where neither is allowed."""
    point = tmp_path_factory.mktemp("mount-probe")
    for user in ([], ["--user", "--map-root-user"]):
        command = ["unshare", *user, "--mount", "--propagation", "private"]
        probe = [*command, "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(point)]
        if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
            return command
    pytest.skip("no private mount namespace here (unshare --mount needs root or user namespaces)")


def qkv_under_mounts(
    unshare: list[str], mounts: list[list[str]], *args: str, then: str = ""
) -> subprocess.CompletedProcess:
    """`qkv ARGS` in a private mount namespace after `mount` with each of `mounts` (seen by no
    other process, gone with it), then the shell command `then` in the same namespace."""
    script = "\n".join([
        " && ".join(shlex.join(["mount", *m]) for m in mounts) + " || exit 99",
        shlex.join([sys.executable, "-m", "qkv", *args]),
        f"status=$?; {then or ':'}; exit $status",
    ])  # fmt: skip
    result = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    if result.returncode == 99:
        pytest.skip(f"mount refused in the namespace: {result.stderr.strip()}")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "export"])
def test_a_read_only_mount_is_refused_before_any_work(
    command: str, unshare: list[str], tmp_path: Path, corpus_dir: Path
) -> None:
    mounted = tmp_path / "read-only"
    mounted.mkdir()
    read_only = [["--bind", str(mounted), str(mounted)], ["-o", "remount,bind,ro", str(mounted)]]
    if command == "train":
        out, args = mounted, training(corpus_dir, mounted, 2)
    else:
        out = mounted / "hf"
        args = ["export", "--model", str(decoder(tmp_path / "model")), "--out", str(out)]
    result = qkv_under_mounts(unshare, read_only, *args)
    assert one_error(result) == (
        f"qkv {command}: error: cannot write to {out}: Read-only file system (errno 30); {FIX}"
    )
    assert result.stderr.count("\n") == 1  # nothing was done before the refusal


@pytest.mark.slow
def test_an_html_page_onto_a_read_only_mount_is_one_error(unshare: list[str], tmp_path: Path):
    mounted = tmp_path / "read-only"
    mounted.mkdir()
    read_only = [["--bind", str(mounted), str(mounted)], ["-o", "remount,bind,ro", str(mounted)]]
    result = qkv_under_mounts(unshare, read_only, "explain", "--html", str(mounted / "x.html"))
    assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr
    assert one_error(result).startswith(f"qkv explain: error: cannot write {mounted}/x.html: "
                                        "Read-only file system (errno 30)")  # fmt: skip


@pytest.mark.slow
def test_export_onto_a_full_disk_removes_its_temporary_directory(
    unshare: list[str], tmp_path: Path
) -> None:
    model, small = decoder(tmp_path / "model"), tmp_path / "small"
    small.mkdir()
    size = (model / "model.safetensors").stat().st_size
    full = [["-t", "tmpfs", "-o", f"size={size // 2}", "tmpfs", str(small)]]
    look = f"echo; echo left:; ls -A {shlex.quote(str(small))}"
    result = qkv_under_mounts(unshare, full, "export", "--model", str(model),
                              "--out", str(small / "hf"), then=look)  # fmt: skip
    assert one_error(result) == (
        f"qkv export: error: cannot write Hugging Face directory {small / 'hf'}: No space left "
        f"on device (errno 28); {FULL}"
    )
    assert result.stdout.split("left:\n")[-1] == ""  # the tmpfs holds nothing
