"""Where and in what precision a model runs: the device (CPU or a CUDA GPU) and the dtype."""

from __future__ import annotations

import time
from functools import lru_cache

import torch

from qkv.errors import QkvError

LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else cpu; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise QkvError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QkvError(f"--device {name} was asked for but no CUDA GPU is available; use cpu")
    return device


def resolve_dtype(name: str, device: torch.device, d_model: int) -> torch.dtype:
    """auto -> bfloat16 where it pays: CUDA with bf16, or a CPU with native bf16 matmul and
    d_model >= 256 (measured: bf16 is 1.45x faster at d_model 256, 0.8x at d_model 128)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native and d_model >= 256 else torch.float32


@lru_cache(maxsize=4)
def matmul_gflops(dtype: torch.dtype, n: int = 256, repeats: int = 2) -> float:
    """This CPU's speed at an (n, n) @ (n, n) matmul in `dtype`, GFLOP/s (best of `repeats`
    after one warmup; about 0.1 s where bfloat16 is emulated)."""
    a = torch.randn(n, n).to(dtype)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[1:]) / 1e9


def choose_load_dtype(
    name: str, device: torch.device, stored: torch.dtype
) -> tuple[torch.dtype, str]:
    """The dtype to run a loaded model in, and why: float32 / bfloat16 / float16 as asked; auto
    is the stored dtype on a GPU, and on a CPU the stored half-precision dtype only where a
    short measurement finds its matmuls at least as fast as float32's (AMX, AVX512-BF16), else
    float32 (AVX2 CPUs emulate bfloat16 at about 1 GFLOP/s)."""
    if name != "auto":
        if name not in LOAD_DTYPES:
            raise QkvError(f"unknown --dtype {name!r}; use auto, float32, bfloat16 or float16")
        return LOAD_DTYPES[name], "as asked"
    if stored == torch.float32:
        return torch.float32, "auto: stored in float32"
    if device.type == "cuda":
        return stored, "auto: the stored dtype, on a GPU"
    half, single = matmul_gflops(stored), matmul_gflops(torch.float32)
    speeds = f"this CPU multiplies {_name(stored)} at {half:.0f} GFLOP/s, float32 at {single:.0f}"
    return (stored if half >= single else torch.float32), f"auto: {speeds}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def keep_freed_memory() -> bool:
    """On glibc, keep freed blocks for reuse instead of handing them back to the system.

    glibc gives each freed block above its mmap threshold back to the kernel, so the next
    activation of that size page-faults its memory in again: measured, a 2,048-token step of
    the speedrun recipe 142 -> 125 ms. M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1) at
    1 GiB keep them in the heap. Returns whether it applied (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError):
        return False
