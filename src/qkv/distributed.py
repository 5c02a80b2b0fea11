"""Training on several processes with PyTorch's own engine: `torchrun` starts the processes,
`torch.distributed` connects them (NCCL between GPUs, Gloo on CPUs), and the model is wrapped in
DistributedDataParallel (each process holds the whole model; gradients are averaged) or sharded
with FSDP2's `fully_shard` (each process holds 1/N of every parameter, gradient and Adam moment).

Every optimizer step trains on one global batch of `batch_size * grad_accum` sequences whatever the
number of processes N: process r takes the r-th N-th of it, in micro-batches of at most
`batch_size`, so gradient = mean over the global batch's tokens, the same as in one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qkv.config import STRATEGIES
from qkv.errors import QkvError

TIMEOUT = timedelta(minutes=10)  # a collective waiting this long for a silent peer fails
PATIENCE = timedelta(hours=24)  # waiting for another process to tokenize a corpus
_patient_group: dist.ProcessGroup | None = None  # Gloo, PATIENCE: see start()


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank r of `size` processes, `local_rank` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes files."""
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of `value` over all processes (each passes its own)."""
        if self.size == 1:
            return value
        return float(self.total(torch.tensor([value], dtype=torch.float64))) / self.size

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any of them."""
        if self.size == 1:
            return flag
        return bool(self.total(torch.tensor([int(flag)])))

    def total(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over all processes (on the CPU; NCCL adds it up on this GPU)."""
        if self.size == 1:
            return tensor
        if dist.get_backend() == "nccl":
            tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tensor)
        return tensor.cpu()

    @contextlib.contextmanager
    def local_first(self) -> Iterator[None]:
        """The first process on each machine runs the block before the others do (e.g. to
        fill a cache they then read)."""
        if self.local_rank:
            dist.barrier(group=_patient_group)
        yield
        if self.size > 1 and not self.local_rank:
            dist.barrier(group=_patient_group)

    def check_same(self, text: str, what: str) -> None:
        """Fail on every process if `text` differs between processes (e.g. a tokenizer that
        different machines built from different data)."""
        if self.size == 1:
            return
        digests: list[str | None] = [None] * self.size
        dist.all_gather_object(digests, hashlib.sha256(text.encode()).hexdigest())
        differ = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
        if differ:
            raise QkvError(
                f"{what} of process {differ[0]} differs from process 0's: every machine must "
                "see the same --data files (and the same run directory to resume)"
            )


ONE_PROCESS = World()


def peer_failure(err: BaseException) -> str | None:
    """What happened, if `err` says another process of the job died (its connection closed) or
    stopped answering (a collective timed out); else None. Gloo raises plain RuntimeErrors."""
    text = str(err).strip()
    first = re.sub(r"^\[[^\]]*\] *", "", text.splitlines()[0] if text else type(err).__name__)
    first = first.split(". ")[0]
    if isinstance(err, dist.DistNetworkError) or re.search(
        r"(closed|reset) by peer|Broken pipe", text
    ):
        return f"lost another process of this job ({first})"
    if "gloo" in text and re.search(r"[Tt]imed out", text):
        return f"another process of this job stopped answering for {TIMEOUT} ({first})"
    return None


def launched_world() -> World:
    """The World that torchrun's environment variables describe: one process unless torchrun
    (TORCHELASTIC_RUN_ID) started several (WORLD_SIZE, RANK, LOCAL_RANK)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return ONE_PROCESS
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise QkvError(f"torchrun's WORLD_SIZE/RANK/LOCAL_RANK are not integers ({err})") from None
    if size > 1 and not dist.is_available():
        raise QkvError("this PyTorch build has no torch.distributed; install one that does")
    return World(rank, size, local_rank)


class LostProcess(QkvError):
    """Another process of a torchrun job died: this one stops too (exit status 1)."""

    exit_code = 1


@contextlib.contextmanager
def joined(world: World, device: str, latest: Path) -> Iterator[None]:
    """One of torchrun's processes inside the block: in the process group, a lost peer told as
    LostProcess (saying whether the run's last checkpoint, the link `latest`, is intact); for
    one process, nothing."""
    if world.size == 1:
        yield
        return
    start(world, device_for(world, device))
    try:
        yield
    except RuntimeError as err:
        why = peer_failure(err)
        if why is None:
            raise
        kept = (
            f"its last checkpoint {latest.resolve()} is intact: continue with "
            f"--resume {latest.parent}"
            if latest.exists()
            else "no checkpoint was saved yet"
        )
        raise LostProcess(f"{why}; {kept}") from None
    finally:
        stop()


def device_for(world: World, name: str) -> torch.device:
    """The device process `world.rank` trains on: cuda:LOCAL_RANK for auto (with GPUs) or cuda;
    else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise QkvError(
            f"--device {name} names one device; under torchrun give auto, cuda or cpu "
            "(process r uses cuda:LOCAL_RANK)"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise QkvError("--device cuda was asked for but no CUDA GPU is available; use cpu")
    count = torch.cuda.device_count()
    index = 0 if count == 1 else world.local_rank  # one visible GPU each: CUDA_VISIBLE_DEVICES
    if index >= count:
        raise QkvError(
            f"local rank {world.local_rank} has no GPU: this machine has {count}; lower "
            "--nproc-per-node"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def start(world: World, device: torch.device) -> None:
    """Join the job's process group: NCCL between GPUs, Gloo between CPUs; and a Gloo group
    that waits up to PATIENCE, for the first process on a machine to prepare the data."""
    global _patient_group
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        _patient_group = dist.new_group(backend="gloo", timeout=PATIENCE)


def stop() -> None:
    """Leave the process group (if this process joined one)."""
    global _patient_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _patient_group = None


def wrap(model: nn.Module, strategy: str, world: World, device: torch.device) -> nn.Module:
    """The module to call for training: `model` itself in one process; DDP around it; or, for
    FSDP2, `model` sharded in place (each block, then the rest) and returned."""
    if strategy not in STRATEGIES:
        raise QkvError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if world.size == 1:
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    # FSDP2 and DTensor take half a second to import: loaded only when a job uses them.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside skip averaging gradients across processes when not `enabled`
    (every micro-batch but a step's last): DDP's no_sync, FSDP2's set_requires_gradient_sync."""
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def whole(tensor: Tensor) -> Tensor:
    """A sharded FSDP2 tensor (DTensor) gathered from every process; other tensors as they are.
    Every process must call it for the same tensors in the same order."""
    if not dist.is_available():
        return tensor
    from torch.distributed.tensor import DTensor  # see wrap(): imported when first needed

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_as(tensor: Tensor, like: Tensor) -> Tensor:
    """A whole tensor cut into this process's shard of `like` when `like` is a sharded DTensor
    of its shape; otherwise `tensor` itself."""
    if not dist.is_available():
        return tensor
    from torch.distributed.tensor import DTensor, distribute_tensor  # see wrap()

    if isinstance(like, DTensor) and tensor.shape == like.shape:
        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements)
    return tensor


def split_batch(batch_size: int, grad_accum: int, world: World) -> tuple[int, int]:
    """(micro-batch, micro-batches per step) for each process: share = batch_size * grad_accum
    / N sequences, micro = the largest divisor of share <= batch_size, share / micro of them."""
    total = batch_size * grad_accum
    if total % world.size:
        raise QkvError(
            f"the global batch of {total} sequences (--batch-size {batch_size} x --grad-accum "
            f"{grad_accum}) does not split evenly over {world.size} processes; make it a multiple "
            f"of {world.size}"
        )
    share = total // world.size
    small = [d for d in range(1, math.isqrt(share) + 1) if share % d == 0]
    micro = max(d for d in small + [share // d for d in small] if d <= batch_size)
    return micro, share // micro
