"""Memory: what a model, a training step or a generation batch will need, estimated from the
config and options before anything is allocated, against what the machine has free.

    parameters    = P x 4 bytes (float32; P counted exactly, on the meta device)
    training      = gradients + AdamW's two moments (3 x 4 bytes per trainable parameter)
                    + activations of one micro-batch, B x T tokens each keeping at least
                      d_model + n_layers (6 d_model + 2 d_ff) + 2 vocab values
    scoring       = B x T x (2 vocab + 4 d_model + d_ff) values: logits, their log-softmax and
                    one layer's activations (no gradients: each layer's are freed after it)
    generation    = the KV cache, B x max_seq_len x n_layers x 2 x n_kv_heads x d_k values,
                    + B x vocab logits

Activations are a lower bound (attention scores, dropout masks and the allocator's slack come on
top), so a refusal means the work cannot fit; a pass does not promise that it will.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

import psutil
import torch

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.model import build_model

FLOAT32 = 4
CGROUP = Path("/sys/fs/cgroup")


def parameter_count(config: ModelConfig) -> int:
    """P of the model `config` describes, exactly, without allocating it: models of one and two
    layers are built on the meta device; each further layer adds what the second did."""
    with torch.device("meta"):
        models = [build_model(config.replace(n_layers=n, init_std=None)) for n in (1, 2)]
    one, two = (sum(p.numel() for p in model.parameters()) for model in models)
    return one + (config.n_layers - 1) * (two - one)


def available_memory(device: torch.device | None = None) -> int:
    """Bytes this process may still allocate: a GPU's free memory, or on the CPU the least of
    the machine's available memory, the container's (cgroup v2) limit and RLIMIT_AS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = [psutil.virtual_memory().available]
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        free.append(soft - psutil.Process().memory_info().vms)
    return max(0, min(free))


def size(n: float) -> str:
    """Bytes for people: 340 bytes, 1.2 GB (powers of 1000)."""
    exponent = min(5, int(math.log10(max(n, 1)) // 3))
    if exponent == 0:
        return f"{n:.0f} bytes"
    return f"{n / 1000**exponent:.1f} {'kMGTP'[exponent - 1]}B"


def check_fits(
    parts: dict[str, int], what: str, fix: str, device: torch.device | None = None
) -> None:
    """Raise a QkvError when the parts' sum exceeds the memory available: one line with both
    figures, the parts, and `fix` (the option to change)."""
    need, free = sum(parts.values()), available_memory(device)
    if need <= free:
        return
    listed = ", ".join(f"{name} {size(n)}" for name, n in parts.items() if n)
    where = "GPU memory" if device is not None and device.type == "cuda" else "memory"
    raise QkvError(
        f"{what} needs at least {size(need)} ({listed}) but {size(free)} of {where} is "
        f"available; {fix}"
    )


def check_model_fits(config: ModelConfig, source: str, device: torch.device | None = None) -> None:
    """Refuse to build a model whose float32 parameters cannot fit, before allocating them."""
    parts = {"parameters": parameter_count(config) * FLOAT32}
    check_fits(
        parts,
        f"the model of {source} (d_model={config.d_model}, n_layers={config.n_layers}, "
        f"vocab_size={config.vocab_size})",
        "choose a smaller model (--preset, --set d_model=... n_layers=...)",
        device,
    )


def training_parts(
    model: torch.nn.Module, micro_batch: int, context: int, dtype: torch.dtype, on_device: bool
) -> dict[str, int]:
    """Bytes of one training step of `model` (a qkv model: `.config`) at (micro_batch, context)
    tokens; its parameters are counted unless they are already `on_device`."""
    config: ModelConfig = model.config
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_token = config.d_model + config.n_layers * (6 * config.d_model + 2 * config.d_ff)
    width = torch.finfo(dtype).bits // 8
    tokens = micro_batch * context
    return {
        "parameters": 0 if on_device else parameters * FLOAT32,
        "gradients and optimizer state": 3 * trainable * FLOAT32,
        "activations of one step": tokens * (per_token * width + 2 * config.vocab_size * FLOAT32),
    }


def scoring_parts(config: ModelConfig, batch: int, context: int) -> dict[str, int]:
    """Bytes of one batch of a decoder's next-token scores (float32)."""
    tokens = batch * context
    return {
        "logits": tokens * 2 * config.vocab_size * FLOAT32,
        "activations": tokens * (4 * config.d_model + config.d_ff) * FLOAT32,
    }


def generation_parts(model: torch.nn.Module, batch: int, cached: bool = True) -> dict[str, int]:
    """Bytes a batch of `batch` rows adds to a loaded decoder: its KV cache (when `cached`) and
    logits."""
    config: ModelConfig = model.config
    width = next(model.parameters()).element_size()
    cache = batch * config.max_seq_len * config.n_layers * 2 * config.n_kv_heads * config.head_dim
    return {"KV cache": cache * width * cached, "logits": batch * config.vocab_size * FLOAT32}
