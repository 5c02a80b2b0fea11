"""`qkv finetune` (all weights, or a LoRA adapter) and `qkv merge` (fold an adapter in)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.cli.options import add_command, add_model, positive, say, seed
from qkv.config import FINETUNE, FINETUNE_LR, LORA_LR
from qkv.errors import QkvError

EXAMPLES = """examples:
  qkv finetune --model runs/quickstart --data builtin:stdlib-qa --out runs/qa
  qkv finetune --model runs/quickstart --lora-rank 8 --out runs/qa-lora    adapter only
  qkv finetune --model runs/notes --data pairs.jsonl --steps 500 --out runs/notes-chat
  qkv finetune --resume runs/qa --steps 600                    continue a run (or after Ctrl-C)
  qkv chat --model runs/qa
"""
MERGE_EXAMPLES = """examples:
  qkv merge --model runs/qa-lora --out runs/qa-merged
  qkv chat --model runs/qa-merged
"""
# (flag, type, help, default shown); the defaults themselves are the library's (config.FINETUNE).
OPTIONS = [
    ("--steps", positive, "optimizer steps", FINETUNE["steps"]),
    ("--batch-size", positive, "examples per step", FINETUNE["batch_size"]),
    ("--context", positive, "longest example in tokens", "the model's"),
    ("--lr", float, "peak learning rate", f"{FINETUNE_LR:g}; {LORA_LR:g} with LoRA"),
    ("--eval-every", positive, "evaluate every N steps", FINETUNE["eval_every"]),
    ("--save-every", positive, "checkpoint every N steps", FINETUNE["save_every"]),
    ("--seed", seed, "random seed", 0),
]
LORA_OPTIONS = [
    ("--lora-rank", positive, "train a LoRA adapter of this rank, not all weights", None),
    ("--lora-alpha", float, "LoRA scale alpha (the update is scaled by alpha / rank)",
     "2 x rank"),
    ("--lora-dropout", float, "dropout on the adapter's input", "0"),
]  # fmt: skip


def add_parser(commands: argparse._SubParsersAction) -> None:
    finetune = add_command(
        commands,
        "finetune",
        "fine-tune a trained decoder on prompt/response pairs (fully or with LoRA)",
        "Fine-tune a decoder checkpoint on prompt/response examples: JSON Lines of\n"
        '{"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}]},\n'
        "or builtin:stdlib-qa (questions about the standard library answered by its\n"
        "docstrings). The chat tokens <|system|>, <|user|>, <|assistant|> are added to the\n"
        "tokenizer and embedding; the loss counts response tokens only. With --lora-rank\n"
        "the base weights stay frozen and checkpoints hold only the adapter (see qkv merge).\n"
        "Reports the held-out response loss before and after, with sample answers.",
        EXAMPLES,
    )
    finetune.add_argument("--model", type=Path, help="run or checkpoint directory to start from")
    finetune.add_argument("--data", default=None, help="JSONL file or builtin:stdlib-qa (default)")
    finetune.add_argument("--out", type=Path, help="run directory for the result")
    finetune.add_argument(
        "--resume", type=Path, metavar="RUN", help="continue a fine-tuning run from its checkpoint"
    )
    for flag, kind, text, default in OPTIONS + LORA_OPTIONS:
        shown = "" if default is None else f" (default {default})"
        finetune.add_argument(flag, type=kind, default=None, help=text + shown)
    finetune.add_argument(
        "--lora-targets",
        help="comma-separated linear layers to adapt: q_proj, k_proj, v_proj, o_proj, w1, w2, "
        "gate, up, down (default q_proj,v_proj)",
    )
    finetune.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")


def add_merge_parser(commands: argparse._SubParsersAction) -> None:
    merge = add_command(
        commands,
        "merge",
        "fold a LoRA adapter into its base model's weights",
        "Fold a LoRA adapter (a checkpoint of `qkv finetune --lora-rank`) into its\n"
        "base model: W' = W + (alpha / r) B A. The result is a plain checkpoint that computes\n"
        "the same logits as base + adapter, at the base model's speed.",
        MERGE_EXAMPLES,
    )
    add_model(merge, "the adapter's run or checkpoint")
    merge.add_argument("--out", type=Path, required=True, help="directory for the merged model")


def run(args: argparse.Namespace) -> None:
    from qkv import finetune as library
    from qkv.cli.progress import training_bar
    from qkv.train import last_evaluation

    lora = None
    given = {
        name: value
        for name in ("alpha", "dropout", "targets")
        if (value := getattr(args, f"lora_{name}")) is not None
    }
    if args.lora_rank is None and given:
        raise QkvError("--lora-alpha, --lora-dropout and --lora-targets need --lora-rank")
    if "targets" in given:
        given["targets"] = tuple(t.strip() for t in given["targets"].split(",") if t.strip())
    if args.lora_rank is not None:
        lora = library.LoRASettings(args.lora_rank, **given)
    options = {
        name: getattr(args, name) for name in library.OPTIONS if getattr(args, name) is not None
    }

    def describe(run: library.FinetuneRun) -> str:
        word = "now" if run.resumed else "before"
        return f"{run.summary()}\n{word}: held-out response loss {run.before.loss:.4f}"

    with training_bar(describe) as started:
        run = library.finetune(args.model, args.data, args.out, lora=lora, resume=args.resume,
                               progress=say, on_start=started, **options)  # fmt: skip
    out = run.trainer.run_dir
    after = last_evaluation(run.trainer)["val_loss"]
    print(
        f"after: held-out response loss {after:.4f} ({1 - after / run.before.loss:.0%} lower); "
        f"checkpoint {out / 'latest'}"
    )
    if run.adapter_file is not None:
        size = run.adapter_file.stat().st_size
        print(
            f"adapter: {run.adapter_file}, {size / 1024:,.0f} KiB ({run.trained_parameters:,} "
            f"parameters); fold it into the base with: qkv merge --model {out} --out DIR"
        )
    for question, answer in run.sample_answers():
        print(f"--- Q: {question}\n    A: {answer}")


def run_merge(args: argparse.Namespace) -> None:
    from qkv.finetune import merge_adapter

    report = merge_adapter(args.model, args.out)
    print(
        f"merged {report.layers} LoRA layers into the base model: {args.out} "
        f"({report.parameters:,} parameters); logits on a random probe differ from base + "
        f"adapter by at most {report.difference:.1e}"
    )
