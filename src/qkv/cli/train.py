"""`qkv train`: a decoder language model on text, or an encoder-decoder on source/target pairs;
under torchrun, on all of its processes."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from qkv.cli.options import add_command, positive, say, seed
from qkv.config import (
    PRESETS,
    RECIPES,
    STRATEGIES,
    TOKENIZERS,
    ModelConfig,
    TrainConfig,
    recipe,
)
from qkv.errors import QkvError

EXAMPLES = """examples:
  qkv train --data notes/ --out runs/notes                      a BPE model of your text folder
  qkv train --data ../shared/data/tinyshakespeare.txt --tokenizer char --context 64 \\
            --batch-size 12 --steps 2000 --out runs/shakespeare  nanoGPT's CPU benchmark
  qkv train --data "docs/**/*.md" --preset llama-small --set n_layers=4 --out runs/llama
  qkv train --recipe speedrun --data train.txt --val-data val.txt --tokenizer char \
            --target-loss 1.88       the fastest recipe, until validation loss 1.88 (then stop)
  qkv train --resume runs/notes --steps 4000                    continue a run (or after Ctrl-C)
  qkv train --task reverse --out runs/reverse                   an encoder-decoder on a task
  torchrun --nproc-per-node 4 -m qkv train --data notes/ --batch-size 8 --grad-accum 4 \\
            --out runs/notes4                         4 processes (GPUs), 32 sequences a step
  torchrun --nproc-per-node 8 -m qkv train --strategy fsdp ...  shard the model (FSDP2)
"""

# TrainConfig fields given as options (--name), with their help; defaults come from TrainConfig.
OPTIONS = [
    ("--steps", positive, "optimizer steps"),
    ("--batch-size", positive, "sequences per micro-batch"),
    ("--context", positive, "tokens per sequence"),
    ("--grad-accum", positive, "micro-batches per step"),
    ("--lr", float, "peak learning rate (AdamW)"),
    ("--min-lr-ratio", float, "the schedule ends at lr times this"),
    ("--warmup-steps", int, "linear warmup steps"),
    ("--schedule", str, "after warmup: cosine decay, or wsd (stable, then a linear decay)"),
    ("--decay-fraction", float, "wsd: the share of the steps spent decaying"),
    ("--optimizer", str, "adamw, or muon: Muon for the blocks' matrices, AdamW for the rest"),
    ("--muon-lr", float, "Muon's peak learning rate"),
    ("--weight-decay", float, "AdamW weight decay on matrices"),
    ("--beta1", float, "AdamW beta1"),
    ("--beta2", float, "AdamW beta2"),
    ("--grad-clip", float, "clip the gradient norm to this"),
    ("--eval-every", positive, "evaluate every N steps"),
    ("--eval-windows", positive, "validation windows per evaluation (--val-data: all)"),
    ("--target-loss", float, "stop (and save) at the first evaluation at or below this loss"),
    ("--save-every", positive, "checkpoint every N steps"),
    ("--seed", seed, "random seed"),
    ("--device", str, "auto, cpu, cuda or cuda:N"),
    ("--dtype", str, "auto, float32 or bfloat16 (autocast)"),
    ("--val-fraction", float, "share of documents held out for validation"),
]


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = add_command(
        commands,
        "train",
        "train a decoder language model on your text",
        "Train a decoder-only language model on text files, folders, globs or "
        "builtin:stdlib-docs. Checkpoints go to OUT/checkpoints (OUT/latest is the newest), with "
        "metrics.jsonl and loss.png beside them. Ctrl-C saves a checkpoint before exiting. "
        "Started by torchrun, it trains on all of torchrun's processes (see README: "
        "Distributed training).",
        EXAMPLES,
    )
    train.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="files, folders, globs or builtin:stdlib-docs (default: builtin:stdlib-docs)",
    )
    train.add_argument(
        "--val-data",
        nargs="+",
        metavar="PATH",
        help="validation text, all of it scored, instead of a share of --data (a benchmark's "
        "own split); each file is read whole",
    )
    train.add_argument("--out", type=Path, help="run directory (default: runs/train)")
    train.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="model and training settings together (--preset, --set and the options above "
        "override them): nanogpt is nanoGPT's CPU recipe for Shakespeare, speedrun the fastest "
        "to its loss (see README: Speedrun)",
    )
    model = train.add_mutually_exclusive_group()
    model.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} (default tiny)")
    model.add_argument("--config", type=Path, help="model config JSON file")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config field, e.g. --set n_layers=6 (repeatable)",
    )
    train.add_argument(
        "--arch",
        choices=["decoder", "encoder-decoder"],
        help="decoder: a language model on text (default); encoder-decoder: source -> target "
        "pairs from --task or a --data JSONL file",
    )
    train.add_argument(
        "--task",
        choices=["reverse", "sort", "add"],
        help="train an encoder-decoder on a built-in task: reverse or sort 1-16 digits, add "
        "two numbers up to 9999",
    )
    train.add_argument(
        "--beam",
        type=positive,
        default=4,
        help="encoder-decoder: beams in the final beam-search evaluation (default 4; 1: none)",
    )
    train.add_argument("--tokenizer", choices=TOKENIZERS, help="bpe (default) or char")
    train.add_argument("--vocab-size", type=positive, help="BPE vocabulary size (default 4096)")
    train.add_argument(
        "--resume", type=Path, metavar="DIR", help="continue from a run directory or checkpoint"
    )
    defaults = TrainConfig()
    for flag, kind, text in OPTIONS:
        default = getattr(defaults, flag[2:].replace("-", "_"))
        train.add_argument(flag, type=kind, help=f"{text} (default {default}, or the recipe's)")
    train.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    train.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="ddp",
        help="under torchrun: ddp copies the model to every process (default); fsdp shards "
        "parameters, gradients and optimizer state over them (FSDP2)",
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values are JSON (numbers, true/false, null) or plain strings."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QkvError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            changes[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            changes[key.strip()] = value
    return changes


def run(args: argparse.Namespace) -> None:
    from qkv.checkpoint import read_run
    from qkv.cli.progress import training_bar
    from qkv.distributed import launched_world
    from qkv.seq2seq import seq2seq_model_config
    from qkv.train import last_evaluation, train

    options = {
        name: value
        for name in TrainConfig.__dataclass_fields__
        if (value := getattr(args, name, None)) is not None
    }
    seq2seq = args.task is not None or args.arch == "encoder-decoder"
    model_config, base = None, None
    if args.resume is not None:
        model_options = (args.preset, args.config, args.set, args.tokenizer, args.vocab_size)
        if any(model_options) or args.task or args.arch or args.recipe:
            raise QkvError(
                "--resume continues a run with its own model, tokenizer and data: drop "
                "--preset/--config/--set/--tokenizer/--vocab-size/--task/--arch/--recipe"
            )
        seq2seq = read_run(args.resume).kind == "seq2seq"
    elif args.recipe is not None:
        if seq2seq:
            raise QkvError("a --recipe trains a decoder language model: drop --task/--arch")
        model_config, base = recipe(args.recipe)
    if args.resume is None and args.config is not None:
        model_config = ModelConfig.load(args.config)
    elif args.resume is None and (args.preset or (not seq2seq and model_config is None)):
        model_config = ModelConfig.preset(args.preset or "tiny")
    if args.set:
        if model_config is None:  # an encoder-decoder's vocabulary and length come from its data
            model_config = seq2seq_model_config(vocab_size=16, longest=17)
        model_config = model_config.replace(**parse_overrides(args.set))
    if seq2seq:
        _seq2seq(args, model_config, options)
        return
    world = launched_world()
    with training_bar() as started:
        result = train(
            args.out, base, model_config, args.resume, world=world, strategy=args.strategy,
            progress=say, on_start=started, **options,
        )  # fmt: skip
    if world.is_main:
        last, out = last_evaluation(result.trainer), result.trainer.run_dir
        if result.trainer.reached is not None:
            step, seconds = result.trainer.reached
            print(
                f"reached the target: validation loss {last['val_loss']:.4f} <= "
                f"{result.trainer.cfg.target_loss:g} at step {step} after {seconds:.1f} s "
                "of training"
            )
        print(
            f"done: validation loss {last['val_loss']:.4f}, bits/byte "
            f"{last['val_bits_per_byte']:.3f}; checkpoint {out / 'latest'}, metrics "
            f"{out / 'metrics.jsonl'}, plot {out / 'loss.png'}"
        )


def _seq2seq(args: argparse.Namespace, model_config: Any, options: dict[str, Any]) -> None:
    """qkv train --task NAME | --arch encoder-decoder --data PAIRS.jsonl."""
    from qkv.cli.progress import training_bar
    from qkv.distributed import launched_world
    from qkv.seq2seq import train_seq2seq

    if launched_world().size > 1:
        raise QkvError(
            "torchrun trains decoder language models; run an encoder-decoder in one process"
        )
    started = time.perf_counter()
    data = options.pop("data", None)
    with training_bar() as on_start:
        run = train_seq2seq(args.out, task=args.task, data=data, model_config=model_config,
                            resume=args.resume, beams=args.beam, on_start=on_start,
                            **options)  # fmt: skip
    line = f"held-out exact match: greedy {run.greedy.exact_match:.1%}"
    if run.beam is not None:
        line += f", beam search ({args.beam} beams) {run.beam.exact_match:.1%}"
    held_out = run.source.held_out
    print(f"{line} ({len(held_out):,} pairs)")
    for (source, target), predicted in list(zip(held_out, run.predictions, strict=True))[:5]:
        mark = "ok" if predicted == target else f"wrong, expected {target}"
        print(f"  {source} -> {predicted}  ({mark})")
    print(
        f"done in {time.perf_counter() - started:.0f} s; checkpoint "
        f"{run.trainer.run_dir / 'latest'}"
    )
