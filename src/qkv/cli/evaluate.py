"""`qkv eval`: loss, perplexity and bits per byte of a decoder on a corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qkv.cli.options import add_command, add_device, add_dtype, add_model, positive, say

EXAMPLES = """examples:
  qkv eval --model runs/quickstart
  qkv eval --model runs/notes --data notes/ --json
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = add_command(
        commands,
        "eval",
        "loss, perplexity and bits per byte of a model on a corpus",
        "Evaluate a checkpoint on text: mean next-token loss, perplexity and bits per byte.\n"
        "Without --data: the validation split of the model's own training data (or of\n"
        "builtin:stdlib-docs for a model that has none).",
        EXAMPLES,
    )
    add_model(evaluate)
    evaluate.add_argument("--data", nargs="+", metavar="PATH", help="files, folders, globs")
    evaluate.add_argument("--context", type=positive, help="tokens per window (default: model's)")
    evaluate.add_argument(
        "--batch-size", type=positive, default=16, help="windows per forward pass (default 16)"
    )
    add_device(evaluate)
    add_dtype(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from qkv.evaluation import evaluate_checkpoint

    bar = None

    def windows(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="eval", unit="window", disable=args.json)
        bar.update(done - bar.n)

    try:
        result = evaluate_checkpoint(
            Path(args.model), args.data, args.context, args.batch_size, args.device, say, windows,
            args.dtype,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(
            f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
            f"bits/byte {result.bits_per_byte:.3f}  ({result.tokens:,} tokens)"
        )
