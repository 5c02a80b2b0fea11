"""`qkv quickstart`: the main job, a small model of the standard library's docstrings."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qkv.cli.options import add_command, add_device, positive, say
from qkv.config import QUICKSTART, QUICKSTART_MINUTES

EXAMPLES = """examples:
  qkv quickstart
  qkv quickstart --out runs/qs2 --steps 300
  qkv quickstart --minutes 10                 more steps on a slow machine
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    quickstart = add_command(
        commands,
        "quickstart",
        "train a small model on the standard library's docstrings in about 5 minutes",
        "The whole life of a language model on 2 CPU cores: build builtin:stdlib-docs from this\n"
        "Python's standard library, train a BPE tokenizer and a small decoder, report\n"
        "validation loss and bits per byte, and generate samples. Everything goes to OUT.",
        EXAMPLES,
    )
    quickstart.add_argument(
        "--out",
        type=Path,
        default=Path("runs/quickstart"),
        help="run directory (default %(default)s)",
    )
    quickstart.add_argument(
        "--steps",
        type=positive,
        help=f"training steps (default: as many as fit in --minutes, at most {QUICKSTART.steps})",
    )
    quickstart.add_argument(
        "--minutes",
        type=float,
        default=QUICKSTART_MINUTES,
        help="time for the whole job; sets the steps on a slow machine (default %(default)s)",
    )
    add_device(quickstart)


def run(args: argparse.Namespace) -> None:
    from qkv.cli.progress import training_bar
    from qkv.quickstart import Quickstart, quickstart
    from qkv.train import last_evaluation

    started = time.perf_counter()

    def describe(job: Quickstart) -> str:
        if job.budgeted:
            print(
                f"this machine takes {1000 * job.seconds_per_step:.0f} ms a step: "
                f"{job.run.trainer.cfg.steps} steps fit in {args.minutes:g} minutes "
                "(--minutes, --steps)",
                file=sys.stderr,
            )
        return job.run.summary()

    with training_bar(describe) as on_start:
        job = quickstart(args.out, args.steps, args.minutes, args.device, say, on_start)
    final = last_evaluation(job.trainer)
    print(
        f"\nvalidation: loss {final['val_loss']:.4f}, perplexity {final['val_perplexity']:.2f}, "
        f"bits/byte {final['val_bits_per_byte']:.3f}"
    )
    print("\nsamples (temperature 0.8, top-k 50):")
    for prompt, text in job.samples:
        print(f"--- {prompt}{text}")
    print(
        f"\ndone in {time.perf_counter() - started:.0f} s; everything is in {args.out}/ "
        f"(checkpoint: {args.out}/latest, metrics.jsonl, loss.png)"
    )
