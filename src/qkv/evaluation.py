"""Evaluation: the loss every task trains on, and one helper that scores a model on any batches.

loss = mean over targets t of -log p(target_t);  perplexity = exp(loss);
bits per byte = sum_t -log2 p(target_t) / bytes of the text the targets encode (comparable across
tokenizers). A target equal to IGNORE is skipped: padding, and prompt tokens in fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.checkpoint import find_run, load_for_inference
from qkv.data import TokenFile, eval_windows, prepare_eval_data
from qkv.device import resolve_device
from qkv.distributed import ONE_PROCESS, World
from qkv.errors import QkvError
from qkv.memory import check_fits, scoring_parts

IGNORE = -100  # cross_entropy's ignore_index: a target the loss skips

Inputs = Tensor | tuple[Tensor, ...]  # the model's input, or all its inputs (encoder-decoder)


def next_token_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy -log p(target) over (batch, seq), in float32; IGNORE targets skipped."""
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]),
        targets.reshape(-1),
        reduction=reduction,
        ignore_index=IGNORE,
    )


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Iterable[tuple[Inputs, Tensor]],
    n_bytes: float,
    dtype: torch.dtype = torch.float32,
    world: World = ONE_PROCESS,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` over every target of `batches` ((inputs,
    targets) pairs); `n_bytes`: the bytes of the text all the targets encode. With several
    processes, process r scores batches r, r + N, ... and the sums are added up; one left without
    a batch in the last round runs one again unscored, as FSDP needs every process in every
    forward pass. `progress(rows)` follows each batch."""
    device = next(model.parameters()).device
    torch.set_flush_denormal(True)  # denormal activations slow fp32 CPU math (2.8x measured)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # -log p, targets

    def forward(inputs: Inputs) -> Tensor:
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(*(t.to(device) for t in inputs))

    index, scored, inputs = -1, 0, None
    for index, (inputs, targets) in enumerate(batches):
        if progress:
            progress(targets.shape[0])
        if index % world.size == world.rank:
            sums[0] += next_token_loss(forward(inputs), targets.to(device), "sum").item()
            sums[1] += int((targets != IGNORE).sum())
            scored += 1
    for _ in range(scored, math.ceil((index + 1) / world.size)):
        forward(inputs)
    model.train(was_training)
    total, count = world.total(sums).tolist()
    loss = total / max(count, 1)
    bits_per_byte = total / (math.log(2) * max(n_bytes, 1))
    return EvalResult(loss, math.exp(min(loss, 80.0)), bits_per_byte, int(count))


def evaluate(
    model: nn.Module,
    data: TokenFile,
    context: int,
    batch_size: int = 16,
    max_windows: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
    world: World = ONE_PROCESS,
) -> EvalResult:
    """A decoder's next-token scores over consecutive windows of `data` (from its start)."""
    windows = (len(data.tokens) - 1) // context
    if max_windows is not None:
        windows = min(windows, max_windows)
    n_bytes = windows * context * data.bytes_per_token
    batches = eval_windows(data, context, batch_size, max_windows)
    return score(model, batches, n_bytes, dtype, world, progress)


def evaluate_checkpoint(
    path: str | Path,
    data: list[str] | None = None,
    context: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
    on_windows: Callable[[int, int], None] | None = None,
    dtype: str = "auto",
) -> EvalResult:
    """`qkv eval`: a decoder checkpoint scored on all of `data`, or without it on the validation
    split of its own training data (builtin:stdlib-docs for a model that has none), its weights
    in `dtype` (auto, float32, bfloat16, float16: load_for_inference, whose line `progress` gets);
    `on_windows(done, total)` follows the windows scored."""
    model, tokenizer, summary = load_for_inference(path, resolve_device(device), dtype)
    if model.config.arch != "decoder":
        raise QkvError(
            f"qkv eval scores decoder language models; {path} holds an {model.config.arch} "
            "model (an encoder-decoder run reports its exact match at the end of qkv train)"
        )
    if progress:
        progress(summary)
    context = context or model.config.max_seq_len
    if context > model.config.max_seq_len:
        raise QkvError(f"--context must be at most the model's {model.config.max_seq_len}")
    run = None if data else find_run(path)
    training = None
    if run is not None:
        cfg = run.train_config
        training = (cfg.data, cfg.val_fraction, cfg.val_data)
    tokens = prepare_eval_data(data, tokenizer, training, progress)
    total, done = (len(tokens.tokens) - 1) // context, 0
    rows = min(batch_size, total)
    check_fits(
        scoring_parts(model.config, rows, context),
        f"scoring {rows} windows of {context} tokens at once",
        "lower --batch-size or --context",
        next(model.parameters()).device,
    )

    def windows_scored(rows: int) -> None:
        nonlocal done
        done += rows
        if on_windows:
            on_windows(done, total)

    return evaluate(model, tokens, context, batch_size, progress=windows_scored)
