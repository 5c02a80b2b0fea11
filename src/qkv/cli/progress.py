"""The training progress bar: loss, tokens/s and ETA; evaluations and saves as lines above it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qkv.evaluation import EvalResult
from qkv.train import StepInfo, Trainer


@contextlib.contextmanager
def training_bar(
    describe: Callable[[Any], str] = lambda run: run.summary(),
) -> Iterator[Callable[[Any], None]]:
    """An `on_start(run)` for a library run: it prints describe(run) and puts a bar on the run's
    trainer; the bar is closed when the block ends, however it ends."""
    bars: list[TrainingBar] = []

    def started(run: Any) -> None:
        print(describe(run), flush=True)
        bars.append(TrainingBar(run.trainer))

    try:
        yield started
    finally:
        for bar in bars:
            bar.bar.close()


class TrainingBar:
    """A tqdm bar fed by the trainer's on_step / on_eval / on_save."""

    def __init__(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.cfg.steps, initial=trainer.step, desc="train",
                        unit="step", dynamic_ncols=True)  # fmt: skip
        trainer.on_step, trainer.on_eval, trainer.on_save = self.step, self.evaluated, self.saved

    def step(self, info: StepInfo) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{info.loss:.3f}", tok_s=f"{info.tokens_per_second:,.0f}", refresh=False
        )

    def evaluated(self, step: int, result: EvalResult) -> None:
        exact = getattr(result, "exact_match", None)
        self.bar.write(
            f"step {step}: val loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
            + (
                f"bits/byte {result.bits_per_byte:.3f}"
                if exact is None
                else f"exact match {exact:.1%}"
            )
        )

    def saved(self, path: Path) -> None:
        self.bar.set_description(f"train (saved {path.name})")
