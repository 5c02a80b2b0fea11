"""The main job, `qkv quickstart`: the whole life of a small language model on 2 CPU cores.

builtin:stdlib-docs -> a BPE tokenizer -> the tiny preset as a Llama (RoPE, RMSNorm,
SwiGLU) trained with Muon for the steps that fit the time budget (each step timed first; at most
1,500) -> validation loss and bits per byte -> samples.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qkv.checkpoint import LATEST
from qkv.config import QUICKSTART, QUICKSTART_MINUTES, ModelConfig
from qkv.errors import QkvError
from qkv.files import one_writer
from qkv.generate import Generator
from qkv.train import Run, Trainer, prepare_run, run_to_end

# The tiny preset shaped as a Llama (RoPE, RMSNorm, SwiGLU at 8/3 d_model, no biases; it still
# exports to transformers), trained with Muon: 1.65 bits per byte in the 4 minutes, not 2.0.
MODEL = ModelConfig.preset("tiny").replace(
    position="rope", norm="rmsnorm", feed_forward="swiglu", d_ff=344, bias=False
)
RESERVE_S = 20  # evaluations, the final save and the samples
PROMPTS = ["Return the", "This module provides", "If the file", "Raise ValueError if"]


@dataclass
class Quickstart:
    """What the main job made: its run, the seconds a step took, and samples of the model."""

    run: Run
    seconds_per_step: float
    budgeted: bool  # the steps were cut to fit the time
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, continuation)

    @property
    def trainer(self) -> Trainer:
        """The run's trainer (what a progress bar follows)."""
        return self.run.trainer


def quickstart(
    out: Path = Path("runs/quickstart"),
    steps: int | None = None,
    minutes: float = QUICKSTART_MINUTES,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
    on_start: Callable[[Quickstart], None] | None = None,
) -> Quickstart:
    """Train the tiny preset on builtin:stdlib-docs into `out` for `steps`, or for as many steps
    as fit in `minutes` (at most QUICKSTART.steps), then sample PROMPTS (temperature 0.8, top-k 50).
    `on_start` hears of the run before it trains."""
    out = Path(out)
    if (out / LATEST).exists():
        raise QkvError(f"{out} already holds a quickstart run; delete it or pass another --out")
    if not 0 < minutes < math.inf:
        raise QkvError(f"--minutes must be a positive number of minutes, got {minutes}")
    started = time.perf_counter()
    with one_writer(out):
        cfg = dataclasses.replace(QUICKSTART, steps=steps or QUICKSTART.steps, device=device)
        run = prepare_run(out, cfg, MODEL, progress=progress)
        per_step = run.trainer.seconds_per_step() if steps is None else 0.0
        if steps is None:
            budget = 60 * minutes - (time.perf_counter() - started) - RESERVE_S
            cfg.steps = max(1, min(QUICKSTART.steps, int(budget / per_step)))
        cfg.eval_every = min(cfg.eval_every, cfg.steps)
        job = Quickstart(run, per_step, steps is None and cfg.steps < QUICKSTART.steps)
        if on_start:
            on_start(job)
        run_to_end(run.trainer, "train")
    generator = Generator.load(out)  # the saved checkpoint, as `qkv generate` will read it
    for seed, prompt in enumerate(PROMPTS):
        job.samples.append((prompt, generator.generate(prompt, max_new_tokens=60, seed=seed).text))
    return job
