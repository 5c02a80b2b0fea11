"""Memory: what a model, a training step or a generation batch will need, estimated from the
config and options before anything is allocated, against what the machine has free.

    parameters    = P x 4 bytes (float32; P counted exactly, on the meta device)
                    + the position tables computed when it is built (position_table_bytes)
    training      = gradients + AdamW's two moments (3 x 4 bytes per trainable parameter)
                    + activations of one micro-batch, B x T tokens each keeping at least
                      d_model + n_layers (6 d_model + 2 d_ff (ReLU: 1)) + 2 vocab values (the logits
                      alone under torch.compile or with frozen weights)
    scoring       = B x T x 2 vocab values: the logits and their log-softmax
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
    layers are built on the meta device; each further layer adds what the second did (which
    layers slide changes no parameter)."""
    with torch.device("meta"):
        layers = [config.replace(n_layers=n, init_std=None, sliding_layers=None) for n in (1, 2)]
        models = [build_model(layer_config) for layer_config in layers]
    one, two = (sum(p.numel() for p in model.parameters()) for model in models)
    return one + (config.n_layers - 1) * (two - one)


def position_table_bytes(config: ModelConfig) -> int:
    """Bytes of the tables a model computes for its max_seq_len positions as it is built, with
    what computing the last of them holds meanwhile: RoPE's cos and sin (L x d_k float32 each,
    per base), from L int64 positions, their float32 copy and L x d_k / 2 + L x d_k angles; the
    sinusoids (L x d_model float32), made in float64 from L positions and L x d_model / 2 angles."""
    length = config.max_seq_len
    if config.position == "rope":
        tables = 1 + (config.rope_local_base is not None)
        return length * (tables * 8 * config.head_dim + 12 + 6 * config.head_dim)
    if config.position == "sinusoidal":
        return length * (4 * config.d_model + 8 + 12 * config.d_model)
    return 0


def available_memory(device: torch.device | None = None) -> int:
    """Bytes this process may still allocate: a GPU's free memory, or on the CPU the least of
    the machine's available memory, the container's (cgroup v2) limit and RLIMIT_AS."""
    if device is not None and device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached  # PyTorch reuses what it caches
    free = [psutil.virtual_memory().available]
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            stat = dict(line.split() for line in (CGROUP / "memory.stat").read_text().splitlines())
            used = int((CGROUP / "memory.current").read_text()) - int(stat["inactive_file"])
            free.append(int(limit) - used)  # the page cache it may drop is not in use
    except (OSError, ValueError, KeyError):
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


SMALLER_MODEL = "choose a smaller model (--preset, --set d_model=... n_layers=...)"
MORE_MEMORY = "use a machine (or --device) with more memory"


def check_model_fits(
    config: ModelConfig,
    source: str,
    device: torch.device | None = None,
    fix: str = SMALLER_MODEL,
) -> None:
    """Refuse to build a model whose float32 parameters and position tables cannot fit, before
    allocating them."""
    parts = {
        "parameters": parameter_count(config) * FLOAT32,
        "position tables": position_table_bytes(config),
    }
    check_fits(
        parts,
        f"the model of {source} (d_model={config.d_model}, n_layers={config.n_layers}, "
        f"vocab_size={config.vocab_size})",
        fix,
        device,
    )


def training_parts(
    model: torch.nn.Module,
    micro_batch: int,
    context: int,
    dtype: torch.dtype,
    on_device: bool,
    shards: int = 1,
    compiled: bool = False,
) -> dict[str, int]:
    """Bytes of one training step of `model` (a qkv model: `.config`) at (micro_batch, context)
    tokens on one of `shards` processes (FSDP shards parameters, gradients and moments); its
    parameters are counted unless they are already `on_device`. Under torch.compile (which may
    recompute) or with frozen weights (LoRA: a frozen layer keeps no input) only the logits
    count as activations."""
    config: ModelConfig = model.config
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hidden = 1 if config.feed_forward == "relu" else 2  # ReLU's output is W2's input too
    per_token = config.d_model + config.n_layers * (6 * config.d_model + hidden * config.d_ff)
    if compiled or trainable < parameters:
        per_token = 0
    width = torch.finfo(dtype).bits // 8
    tokens = micro_batch * context
    logits = (1 if compiled else 2) * config.vocab_size * FLOAT32
    return {
        "parameters": 0 if on_device else parameters * FLOAT32 // shards,
        "gradients and optimizer state": 3 * trainable * FLOAT32 // shards,
        "activations of one step": tokens * (per_token * width + logits),
    }


def scoring_parts(config: ModelConfig, batch: int, context: int) -> dict[str, int]:
    """Bytes of one batch of a decoder's next-token scores: its float32 logits and their
    log-softmax (each layer's activations are freed before the head runs)."""
    return {"logits": batch * context * 2 * config.vocab_size * FLOAT32}


def generation_parts(model: torch.nn.Module, batch: int, cached: bool = True) -> dict[str, int]:
    """Bytes a batch of `batch` rows adds to a loaded decoder: its KV cache (when `cached`) and
    logits."""
    config: ModelConfig = model.config
    width = next(model.parameters()).element_size()
    cache = batch * config.max_seq_len * config.n_layers * 2 * config.n_kv_heads * config.head_dim
    return {"KV cache": cache * width * cached, "logits": batch * config.vocab_size * FLOAT32}
