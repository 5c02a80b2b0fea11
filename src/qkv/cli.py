"""`qkv <command>`: parses arguments, calls the library, prints one line for a user error."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qkv import __version__
from qkv.config import PRESETS, ModelConfig
from qkv.distributed import ONE_PROCESS, STRATEGIES, World, launched_world
from qkv.errors import ConfigError, QkvError
from qkv.tokenizer import KINDS
from qkv.train import (
    EvalResult,
    Run,
    StepInfo,
    TrainConfig,
    Trainer,
    evaluate,
    plot_loss,
    prepare_run,
    resolve_device,
    write_metrics,
)

# The main job: a small BPE model of the standard library's docstrings in about 5 minutes.
QUICKSTART = TrainConfig(
    data=["builtin:stdlib-docs"],
    tokenizer="bpe",
    vocab_size=4096,
    steps=1500,
    batch_size=16,
    context=128,
    lr=2e-3,
    warmup_steps=100,
    eval_every=500,
)
QUICKSTART_MODEL = ModelConfig.preset("tiny")
# Encoder-decoder runs (steps and batch size per task: seq2seq.SCHEDULES).
SEQ2SEQ = TrainConfig(lr=2e-3, warmup_steps=100, eval_every=500, save_every=500, dtype="float32")
QUICKSTART_MINUTES = 4.0
QUICKSTART_RESERVE_S = 20  # evaluations, the final save and the samples
QUICKSTART_PROMPTS = ["Return the", "This module provides", "If the file", "Raise ValueError if"]

EXPLAIN_EXAMPLES = """examples:
  qkv explain                                   the notes' sentence, d_model = 4, 2 heads
  qkv explain "The quick brown fox jumps over the lazy dog" --heads 1
  qkv explain "Attention is all you need" --d-model 8 --layers 2 --seed 3
  qkv explain --json | python -m json.tool      every stage as one JSON object
  qkv explain --plot attention.png              heatmaps of attention weights and positions
  qkv explain --model runs/quickstart "Return the value"   a trained model's real attention
"""

# Config fields as the explain command's options call them, for error messages.
EXPLAIN_OPTIONS = {"d_model": "--d-model", "n_heads": "--heads", "n_layers": "--layers"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: the problem and where to get help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qkv",
        description="qkv: the Transformer as readable, tested code.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'qkv COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    explain = commands.add_parser(
        "explain",
        help="walk a sentence through a fresh Transformer, stage by stage",
        description="Walk a sentence through a freshly initialised (seeded) decoder, the way\n"
        "the notes do: tokens, embeddings, positions, Q/K/V, attention weights,\n"
        "feed-forward, norms, logits and next-word probabilities. Each stage prints\n"
        "its formula and a table with one row per word.",
        epilog=EXPLAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument(
        "text", nargs="*", help="the sentence (default: the notes' 'The quick brown fox ...')"
    )
    explain.add_argument("--d-model", type=_positive, default=4, help="embedding size (default 4)")
    explain.add_argument("--heads", type=_positive, default=2, help="attention heads (default 2)")
    explain.add_argument("--layers", type=_positive, default=1, help="decoder blocks (default 1)")
    explain.add_argument(
        "--seed", type=_seed, default=0, help="seed for the random weights (default 0)"
    )
    explain.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    explain.add_argument("--plot", metavar="FILE.png", help="also save heatmaps to this image file")
    explain.add_argument(
        "--model",
        type=Path,
        help="a trained or Hugging Face model: show its real attention for the text instead",
    )
    explain.add_argument(
        "--head", type=int, help="with --model: show this head (default: the mean over heads)"
    )
    _add_train_parser(commands)
    _add_eval_parser(commands)
    _add_generate_parser(commands)
    _add_finetune_parser(commands)
    _add_merge_parser(commands)
    _add_chat_parser(commands)
    _add_embed_parser(commands)
    _add_export_parser(commands)
    _add_quickstart_parser(commands)
    return parser


TRAIN_EXAMPLES = """examples:
  qkv train --data notes/ --out runs/notes                      a BPE model of your text folder
  qkv train --data ../shared/data/tinyshakespeare.txt --tokenizer char --context 64 \\
            --batch-size 12 --steps 2000 --out runs/shakespeare  nanoGPT's CPU benchmark
  qkv train --data "docs/**/*.md" --preset llama-small --set n_layers=4 --out runs/llama
  qkv train --resume runs/notes --steps 4000                    continue a run (or after Ctrl-C)
  torchrun --nproc-per-node 4 -m qkv train --data notes/ --batch-size 8 --grad-accum 4 \\
            --out runs/notes4                         4 processes (GPUs), 32 sequences a step
  torchrun --nproc-per-node 8 -m qkv train --strategy fsdp ...  shard the model (FSDP2)
"""


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a decoder language model on your text",
        description="Train a decoder-only language model on text files, folders, globs or "
        "builtin:stdlib-docs. Checkpoints go to OUT/checkpoints (OUT/latest is the newest), with "
        "metrics.jsonl and loss.png beside them. Ctrl-C saves a checkpoint before exiting. "
        "Started by torchrun, it trains on all of torchrun's processes (see README: "
        "Distributed training).",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="files, folders, globs or builtin:stdlib-docs (default: builtin:stdlib-docs)",
    )
    train.add_argument("--out", type=Path, help="run directory (default: runs/train)")
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
        type=_positive,
        default=4,
        help="encoder-decoder: beams in the final beam-search evaluation (default 4; 1: none)",
    )
    train.add_argument("--tokenizer", choices=KINDS, help="bpe (default) or char")
    train.add_argument("--vocab-size", type=_positive, help="BPE vocabulary size (default 4096)")
    train.add_argument(
        "--resume", type=Path, metavar="DIR", help="continue from a run directory or checkpoint"
    )
    defaults = TrainConfig()
    options = [
        ("--steps", _positive, "optimizer steps"),
        ("--batch-size", _positive, "sequences per micro-batch"),
        ("--context", _positive, "tokens per sequence"),
        ("--grad-accum", _positive, "micro-batches per step"),
        ("--lr", float, "peak learning rate"),
        ("--warmup-steps", int, "linear warmup steps"),
        ("--weight-decay", float, "AdamW weight decay on matrices"),
        ("--beta2", float, "AdamW beta2"),
        ("--grad-clip", float, "clip the gradient norm to this"),
        ("--eval-every", _positive, "evaluate every N steps"),
        ("--eval-windows", _positive, "validation windows per evaluation"),
        ("--save-every", _positive, "checkpoint every N steps"),
        ("--seed", int, "random seed"),
        ("--device", str, "auto, cpu, cuda or cuda:N"),
        ("--dtype", str, "auto, float32 or bfloat16 (autocast)"),
    ]
    for flag, kind, text in options:
        default = getattr(defaults, flag[2:].replace("-", "_"))
        train.add_argument(flag, type=kind, help=f"{text} (default {default})")
    train.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    train.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="ddp",
        help="under torchrun: ddp copies the model to every process (default); fsdp shards "
        "parameters, gradients and optimizer state over them (FSDP2)",
    )
    train.add_argument(
        "--val-fraction",
        type=float,
        help="share of documents held out for validation (default 0.05)",
    )


def _add_eval_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a model on a corpus",
        description="Evaluate a checkpoint on text: mean next-token loss, perplexity and bits per "
        "byte. Without --data: the validation split of builtin:stdlib-docs.",
        epilog="examples:\n  qkv eval --model runs/quickstart\n"
        "  qkv eval --model runs/notes --data notes/ --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", type=Path, required=True, help="run or checkpoint directory")
    evaluate.add_argument("--data", nargs="+", metavar="PATH", help="files, folders, globs")
    evaluate.add_argument("--context", type=_positive, help="tokens per window (default: model's)")
    evaluate.add_argument(
        "--batch-size", type=_positive, default=16, help="windows per forward pass (default 16)"
    )
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")


GENERATE_EXAMPLES = """examples:
  qkv generate --model runs/quickstart "Return the"
  qkv generate --model runs/quickstart "Return the" --temperature 0 --max-new-tokens 40
  qkv generate --model runs/quickstart "If the file" --top-p 0.9 --stop "." --seed 3
  qkv generate --model runs/quickstart --prompts prompts.txt --json > completions.jsonl
"""


def _add_generate_parser(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate",
        help="continue prompts with a trained decoder (streamed, KV-cached)",
        description="Continue each prompt with a decoder checkpoint, token by token, using a\n"
        "key/value cache. Text is streamed as it is produced; --json prints one object per\n"
        "prompt instead (text, token_ids, ...), decoding --batch-size prompts at a time.\n"
        "Prompts longer than the model's context are cut from the left (with a warning),\n"
        "and generation goes on past the context by sliding the window.",
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("prompt", nargs="*", help="text to continue (several are allowed)")
    generate.add_argument("--model", type=Path, required=True, help="run or checkpoint directory")
    generate.add_argument(
        "--prompts",
        metavar="FILE",
        help='more prompts: one per line, or JSON Lines with a "prompt" field; - for stdin',
    )
    generate.add_argument(
        "--max-new-tokens", type=_positive, default=128, help="tokens to add (default 128)"
    )
    generate.add_argument(
        "--temperature", type=float, default=0.8, help="0 = greedy, higher = more random (0.8)"
    )
    generate.add_argument(
        "--top-k", type=int, default=50, help="sample among the k likeliest; 0 = all (50)"
    )
    generate.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus: likeliest tokens up to this mass (1)"
    )
    generate.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages tokens already in the text (default 1: off)",
    )
    generate.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)"
    )
    generate.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    generate.add_argument(
        "--no-cache", action="store_true", help="recompute every step instead of the KV cache"
    )
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt")
    generate.add_argument(
        "--batch-size", type=_positive, default=8, help="prompts decoded together with --json (8)"
    )
    generate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


FINETUNE_EXAMPLES = """examples:
  qkv finetune --model runs/quickstart --data builtin:stdlib-qa --out runs/qa
  qkv finetune --model runs/quickstart --lora-rank 8 --out runs/qa-lora    adapter only
  qkv finetune --model runs/notes --data pairs.jsonl --steps 500 --out runs/notes-chat
  qkv finetune --resume runs/qa --steps 600                    continue a run (or after Ctrl-C)
  qkv chat --model runs/qa
"""
FINETUNE_DEFAULTS = {"steps": 300, "batch_size": 16, "eval_every": 100, "save_every": 100}
FINETUNE_LR, LORA_LR = 3e-4, 1e-3
# Options a resumed fine-tuning run may change; the rest come from its checkpoint.
FINETUNE_OPTIONS = ("steps", "batch_size", "context", "lr", "eval_every", "save_every", "seed",
                    "device")  # fmt: skip


def _add_finetune_parser(commands: argparse._SubParsersAction) -> None:
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a trained decoder on prompt/response pairs (fully or with LoRA)",
        description="Fine-tune a decoder checkpoint on prompt/response examples: JSON Lines of\n"
        '{"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}]},\n'
        "or builtin:stdlib-qa (questions about the standard library answered by its\n"
        "docstrings). The chat tokens <|system|>, <|user|>, <|assistant|> are added to the\n"
        "tokenizer and embedding; the loss counts response tokens only. With --lora-rank\n"
        "the base weights stay frozen and checkpoints hold only the adapter (see qkv merge).\n"
        "Reports the held-out response loss before and after, with sample answers.",
        epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("--model", type=Path, help="run or checkpoint directory to start from")
    finetune.add_argument("--data", default=None, help="JSONL file or builtin:stdlib-qa (default)")
    finetune.add_argument("--out", type=Path, help="run directory for the result")
    finetune.add_argument(
        "--resume", type=Path, metavar="RUN", help="continue a fine-tuning run from its checkpoint"
    )
    options = [
        ("--steps", _positive, "optimizer steps", "300"),
        ("--batch-size", _positive, "examples per step", "16"),
        ("--context", _positive, "longest example in tokens", "the model's"),
        ("--lr", float, "peak learning rate", "3e-4; 1e-3 with LoRA"),
        ("--eval-every", _positive, "evaluate every N steps", "100"),
        ("--save-every", _positive, "checkpoint every N steps", "100"),
        ("--seed", _seed, "random seed", "0"),
        ("--lora-rank", _positive, "train a LoRA adapter of this rank, not all weights", None),
        ("--lora-alpha", float, "LoRA scale alpha (the update is scaled by alpha / rank)",
         "2 x rank"),
        ("--lora-dropout", float, "dropout on the adapter's input", "0"),
    ]  # fmt: skip
    for flag, kind, text, default in options:
        shown = "" if default is None else f" (default {default})"
        finetune.add_argument(flag, type=kind, default=None, help=text + shown)
    finetune.add_argument(
        "--lora-targets",
        help="comma-separated linear layers to adapt: q_proj, k_proj, v_proj, o_proj, w1, w2, "
        "gate, up, down (default q_proj,v_proj)",
    )
    finetune.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


MERGE_EXAMPLES = """examples:
  qkv merge --model runs/qa-lora --out runs/qa-merged
  qkv chat --model runs/qa-merged
"""


def _add_merge_parser(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model's weights",
        description="Fold a LoRA adapter (a checkpoint of `qkv finetune --lora-rank`) into its\n"
        "base model: W' = W + (alpha / r) B A. The result is a plain checkpoint that computes\n"
        "the same logits as base + adapter, at the base model's speed.",
        epilog=MERGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("--model", type=Path, required=True, help="the adapter's run or checkpoint")
    merge.add_argument("--out", type=Path, required=True, help="directory for the merged model")


CHAT_EXAMPLES = """examples:
  qkv chat --model runs/qa                            interactive: /reset, /exit, Ctrl-D
  qkv chat --model runs/qa -p "What does json.dumps do?"    one question, one answer
  printf 'hello\\nwhat next?\\n' | qkv chat --model runs/qa   one reply per input line
"""


def _add_chat_parser(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser(
        "chat",
        help="chat with a fine-tuned model in the terminal",
        description="Chat with a model fine-tuned by `qkv finetune`. Replies stream as they are\n"
        "generated; the conversation so far is part of each prompt, the oldest exchanges\n"
        "dropped when it outgrows the context window. /reset forgets the history, /exit or\n"
        "Ctrl-D ends, Ctrl-C stops a reply. With piped input every line is a message.",
        epilog=CHAT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--model", type=Path, required=True, help="run or checkpoint directory")
    chat.add_argument("-p", "--prompt", help="answer this one message and exit")
    chat.add_argument("--system", help="a system message kept at the start of the conversation")
    chat.add_argument(
        "--max-new-tokens", type=_positive, default=200, help="longest reply in tokens (200)"
    )
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    chat.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest (50)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    chat.add_argument(
        "--repetition-penalty", type=float, default=1.1, help="CTRL's penalty (default 1.1)"
    )
    chat.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    chat.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


EMBED_EXAMPLES = """examples:
  qkv embed --model ~/models/all-MiniLM-L6-v2 "A man is eating food." "Someone eats."
  qkv embed --model ~/models/all-MiniLM-L6-v2 --file sentences.txt --json > vectors.json
"""


def _add_embed_parser(commands: argparse._SubParsersAction) -> None:
    embed = commands.add_parser(
        "embed",
        help="sentence embeddings from an encoder (mean pooling + L2 normalisation)",
        description="Sentence embeddings from an encoder such as a BERT / sentence-transformers\n"
        "directory: the mean of the final hidden states over each text's tokens, scaled to\n"
        "length 1. Prints each vector's start and the texts' cosine similarities, or --json.",
        epilog=EMBED_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument("text", nargs="*", help="texts to embed")
    embed.add_argument("--model", type=Path, required=True, help="encoder directory")
    embed.add_argument("--file", help="also embed every line of this file ('-': standard input)")
    embed.add_argument(
        "--max-tokens", type=_positive, help="truncate longer texts (default: the model's context)"
    )
    embed.add_argument("--json", action="store_true", help="print a JSON list of vectors")
    embed.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


EXPORT_EXAMPLES = """examples:
  qkv export --model runs/quickstart --out exported/quickstart
  then in Python: AutoModelForCausalLM.from_pretrained("exported/quickstart")
"""


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a trained decoder as a Hugging Face model directory",
        description="Write a qkv decoder as a Hugging Face directory (config.json,\n"
        "model.safetensors, tokenizer.json) that transformers loads as GPT2LMHeadModel\n"
        "(learned positions, LayerNorm, GELU, biases) or LlamaForCausalLM (RoPE, RMSNorm,\n"
        "SwiGLU, no biases), computing the same logits. A LoRA adapter is merged first.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--model", type=Path, required=True, help="run or checkpoint directory")
    export.add_argument("--out", type=Path, required=True, help="directory to write")
    export.add_argument("--format", choices=["hf"], default="hf", help="hf (the default)")


def _add_quickstart_parser(commands: argparse._SubParsersAction) -> None:
    quickstart = commands.add_parser(
        "quickstart",
        help="train a small model on the standard library's docstrings in about 5 minutes",
        description="The whole life of a language model on 2 CPU cores: build builtin:stdlib-docs "
        "from this Python's standard library, train a BPE tokenizer and a small decoder, report "
        "validation loss and bits per byte, and generate samples. Everything goes to OUT.",
        epilog="examples:\n  qkv quickstart\n  qkv quickstart --out runs/qs2 --steps 300\n"
        "  qkv quickstart --minutes 10                 more steps on a slow machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quickstart.add_argument(
        "--out",
        type=Path,
        default=Path("runs/quickstart"),
        help="run directory (default %(default)s)",
    )
    quickstart.add_argument(
        "--steps",
        type=_positive,
        help=f"training steps (default: as many as fit in --minutes, at most {QUICKSTART.steps})",
    )
    quickstart.add_argument(
        "--minutes",
        type=float,
        default=QUICKSTART_MINUTES,
        help="time for the whole job; sets the steps on a slow machine (default %(default)s)",
    )
    quickstart.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _explain(args: argparse.Namespace) -> None:
    from qkv import explain

    if args.model is not None:
        _explain_model(args)
        return
    if args.d_model > 256 or args.layers > 12:
        raise QkvError("explain prints every number: keep --d-model <= 256 and --layers <= 12")
    text = " ".join(args.text) if args.text else explain.NOTES_SENTENCE
    try:
        walkthrough = explain.explain_text(text, args.d_model, args.heads, args.layers, args.seed)
    except ConfigError as err:
        message = str(err).replace("invalid config field ", "invalid ")
        for name, option in EXPLAIN_OPTIONS.items():
            message = message.replace(name, option)
        raise QkvError(message) from None
    plotted = None if args.plot is None else explain.plot(walkthrough, args.plot)
    if args.json:
        print(explain.render_json(walkthrough))
    else:
        print(explain.render_text(walkthrough))
        if plotted is not None:
            print(f"\nplot saved to {plotted}")


def _explain_model(args: argparse.Namespace) -> None:
    from qkv.checkpoint import load_model
    from qkv.explain import attention_maps, render_attention

    if args.plot is not None:
        raise QkvError("--plot draws the worked example; with --model, use --json for the weights")
    if not args.text:
        raise QkvError("give the text to explain, e.g. qkv explain --model DIR 'The fox'")
    model, tokenizer = load_model(args.model)
    if args.head is not None and not 0 <= args.head < model.config.n_heads:
        raise QkvError(f"--head must be in 0..{model.config.n_heads - 1}; got {args.head}")
    maps = attention_maps(model, tokenizer, " ".join(args.text))
    if args.json:
        print(json.dumps(maps.to_json()))
    else:
        print(render_attention(maps, args.head))


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
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


def _train_config(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(base, **given)


class _Progress:
    """A tqdm bar for training: loss, tokens/s and ETA; evaluations and saves as lines above it."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.write = self.bar.write

    def step(self, info: StepInfo) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{info.loss:.3f}", tok_s=f"{info.tokens_per_second:,.0f}", refresh=False
        )

    def eval(self, step: int, result: EvalResult) -> None:
        exact = getattr(result, "exact_match", None)
        self.write(
            f"step {step}: val loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
            + (
                f"bits/byte {result.bits_per_byte:.3f}"
                if exact is None
                else f"exact match {exact:.1%}"
            )
        )


class Interrupted(QkvError):
    """Ctrl-C or SIGTERM: exit status 128 + the signal's number (130, 143), as shells expect."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class LostProcess(QkvError):
    """Another process of a torchrun job died: this one stops too (exit status 1)."""

    exit_code = 1


def _run_training(run: Run, out: Path, command: str = "train") -> None:
    """Train with a progress bar; metrics.jsonl and loss.png follow every evaluation and save.
    Processes other than rank 0 train silently and write nothing."""
    trainer = run.trainer
    if not trainer.world.is_main:
        with contextlib.suppress(KeyboardInterrupt):  # rank 0 reports the stop and checkpoint
            trainer.run()
        return
    progress = _Progress(trainer.cfg.steps, trainer.step)

    def record() -> None:
        write_metrics(trainer.history, out / "metrics.jsonl")
        if trainer.history:
            plot_loss(trainer.history, out / "loss.png")

    def evaluated(step: int, result: EvalResult) -> None:
        progress.eval(step, result)
        record()

    def saved(path: Path) -> None:
        progress.bar.set_description(f"train (saved {path.name})")
        record()

    trainer.on_step, trainer.on_eval, trainer.on_save = progress.step, evaluated, saved
    try:
        trainer.run()
    except KeyboardInterrupt:
        saved_at = (
            "no checkpoint saved"
            if trainer.saved_step is None
            else (f"checkpoint at step {trainer.saved_step}")
        )
        how = "interrupted" if trainer.stop_signal == signal.SIGINT else "stopped by SIGTERM"
        raise Interrupted(
            f"{how} at step {trainer.step}; {saved_at}. Continue with: "
            f"qkv {command} --resume {out}",
            trainer.stop_signal,
        ) from None
    finally:
        progress.bar.close()
        record()


def _summary(run: Run) -> str:
    trainer, corpus = run.trainer, run.corpus
    config, cfg = trainer.model.config, trainer.cfg
    tokens = cfg.steps * trainer.tokens_per_step
    return "\n".join(
        [
            f"model: {trainer.model.num_parameters():,} parameters; decoder "
            f"d_model={config.d_model}, heads={config.n_heads}, layers={config.n_layers}, "
            f"{config.position} positions, {config.norm}, {config.feed_forward}",
            f"data: {corpus.documents:,} documents; train {len(corpus.train.tokens):,} tokens, "
            f"validation {len(corpus.val.tokens):,} tokens; vocabulary "
            f"{corpus.tokenizer.vocab_size:,}, "
            f"{corpus.train.bytes_per_token:.2f} bytes/token",
            f"training: {cfg.steps:,} steps x {trainer.tokens_per_step:,} tokens "
            f"({cfg.batch_size} x {cfg.context} x {cfg.grad_accum}) = {tokens:,} tokens "
            f"({tokens / max(1, len(corpus.train.tokens)):.1f} epochs); "
            f"{trainer.flops_per_step / 1e9:,.1f} GFLOP/step; {trainer.dtype} on {trainer.device}"
            + _processes(trainer)
            + (f"; resuming at step {trainer.step}" if run.resumed_from else ""),
        ]
    )


def _processes(trainer: Trainer) -> str:
    """How the global batch is split when torchrun started several processes."""
    world = trainer.world
    if world.size == 1:
        return ""
    return (
        f" x {world.size} processes ({trainer.strategy.upper()}, "
        f"{'NCCL' if trainer.device.type == 'cuda' else 'Gloo'}), each {trainer.accum} x "
        f"{trainer.micro_batch} sequences a step"
    )


def _train(args: argparse.Namespace) -> None:
    from qkv.checkpoint import load_config, load_training_state, resolve, run_directory
    from qkv.seq2seq import seq2seq_model_config

    model_config = None
    base = TrainConfig()
    out = args.out
    seq2seq = args.task is not None or args.arch == "encoder-decoder"
    if args.resume is not None:
        model_options = (args.preset, args.config, args.set, args.tokenizer, args.vocab_size)
        if any(model_options) or args.task or args.arch:
            raise QkvError(
                "--resume continues a run with its own model, tokenizer and data: drop "
                "--preset/--config/--set/--tokenizer/--vocab-size/--task/--arch"
            )
        folder = resolve(args.resume)
        state = load_training_state(folder)[1]
        if state.get("kind") == "finetune":
            raise QkvError(f"{folder} is a fine-tuning run: continue it with qkv finetune --resume")
        try:
            base = TrainConfig(**state["train_config"])
        except (KeyError, TypeError):
            raise QkvError(
                f"{folder}/trainer_state.json was not written by this version of qkv train"
            ) from None
        seq2seq = load_config(folder).arch == "encoder-decoder"
        if out is None:
            out = run_directory(folder)
    else:
        if args.config is not None:
            model_config = ModelConfig.load(args.config)
        elif args.preset or not seq2seq:
            model_config = ModelConfig.preset(args.preset or "tiny")
        if args.set:
            if model_config is None:  # vocabulary and length are set from the data later
                model_config = seq2seq_model_config(vocab_size=16, longest=17)
            model_config = model_config.replace(**_parse_overrides(args.set))
        if seq2seq:
            base = SEQ2SEQ
    out = out or Path("runs/train")
    if args.data:  # absolute, so a resumed run finds its files from any directory
        args.data = [d if d.startswith("builtin:") else os.path.abspath(d) for d in args.data]
    if seq2seq:
        _train_seq2seq(args, _train_config(args, base), model_config, out)
        return
    cfg = _train_config(args, base)
    world = launched_world()
    if world.size > 1:
        _train_distributed(world, args, cfg, model_config, out)
        return
    run = prepare_run(
        out, cfg, model_config, args.resume, lambda message: print(message, file=sys.stderr)
    )
    print(_summary(run))
    _run_training(run, out)
    _done(run, out)


def _done(run: Run, out: Path) -> None:
    last = [h for h in run.trainer.history if "val_loss" in h][-1]
    print(
        f"done: validation loss {last['val_loss']:.4f}, bits/byte {last['val_bits_per_byte']:.3f};"
        f" checkpoint {out / 'latest'}, metrics {out / 'metrics.jsonl'}, plot {out / 'loss.png'}"
    )


def _train_distributed(
    world: World, args: argparse.Namespace, cfg: TrainConfig, model_config: ModelConfig | None,
    out: Path,
) -> None:  # fmt: skip
    """One of torchrun's processes: join the group, train on this rank's share, leave."""
    from qkv.checkpoint import LATEST
    from qkv.distributed import device_for, peer_failure, split_batch, start, stop

    split_batch(cfg.batch_size, cfg.grad_accum, world)  # before any work: it may not divide
    start(world, device_for(world, cfg.device))
    try:
        main = world.is_main
        run = prepare_run(
            out,
            cfg,
            model_config,
            args.resume,
            (lambda message: print(message, file=sys.stderr)) if main else None,
            world,
            args.strategy,
        )
        if main:
            print(_summary(run), flush=True)
        _run_training(run, out)
        if main:
            _done(run, out)
    except RuntimeError as err:
        why = peer_failure(err)
        if why is None:
            raise
        kept = (
            f"its last checkpoint {(out / LATEST).resolve()} is intact: continue with "
            f"--resume {out}"
            if (out / LATEST).exists()
            else "no checkpoint was saved yet"
        )
        raise LostProcess(f"{why}; {kept}") from None
    finally:
        stop()


def _train_seq2seq(
    args: argparse.Namespace, cfg: TrainConfig, model_config: ModelConfig | None, out: Path
) -> None:
    """qkv train --task NAME | --arch encoder-decoder --data PAIRS.jsonl."""
    from qkv.seq2seq import SCHEDULES, evaluate_pairs, prepare_seq2seq_run

    if launched_world().size > 1:
        raise QkvError(
            "torchrun trains decoder language models; run an encoder-decoder in one process"
        )
    if args.tokenizer or args.vocab_size:
        raise QkvError("an encoder-decoder uses a character tokenizer of its data: drop "
                       "--tokenizer/--vocab-size")  # fmt: skip
    if args.resume is None:
        if args.task is not None and args.data:
            raise QkvError("give --task (a built-in task) or --data (a JSONL file), not both")
        if args.task is None and (not args.data or len(args.data) != 1):
            raise QkvError(
                "an encoder-decoder trains on --task reverse|sort|add or on one --data file of "
                '{"source": ..., "target": ...} lines'
            )
        cfg.data = [f"task:{args.task}"] if args.task else args.data
        steps, batch_size = SCHEDULES[args.task or "file"]
        cfg.steps = args.steps or steps
        cfg.batch_size = args.batch_size or batch_size
    if model_config is not None and model_config.arch != "encoder-decoder":
        raise QkvError("--task trains an encoder-decoder: drop --preset/--set arch=... or use "
                       "an encoder-decoder preset such as transformer-base")  # fmt: skip
    started = time.perf_counter()
    trainer = prepare_seq2seq_run(out, cfg, model_config, args.resume)
    config, source = trainer.model.config, trainer.source
    print(
        f"model: {trainer.model.num_parameters():,} parameters; encoder-decoder "
        f"d_model={config.d_model}, heads={config.n_heads}, layers={config.n_layers}+"
        f"{config.n_layers}, {config.position} positions, "
        f"{'pre' if config.norm_first else 'post'}-norm, {config.feed_forward}\n"
        f"data: {cfg.data[0]}; {len(source.held_out):,} held-out pairs never trained on; "
        f"{cfg.steps:,} steps x {cfg.batch_size} pairs on {trainer.device}"
        + (f"; resuming at step {trainer.step}" if args.resume else "")
    )
    _run_training(Run(trainer, None, None), out)  # type: ignore[arg-type]
    greedy, predictions = evaluate_pairs(trainer.model, source.held_out, trainer.tokenizer)
    line = f"held-out exact match: greedy {greedy.exact_match:.1%}"
    if args.beam > 1:
        beam = evaluate_pairs(trainer.model, source.held_out, trainer.tokenizer, args.beam)[0]
        line += f", beam search ({args.beam} beams) {beam.exact_match:.1%}"
    print(f"{line} ({len(source.held_out):,} pairs)")
    for (src, target), predicted in list(zip(source.held_out, predictions, strict=True))[:5]:
        mark = "ok" if predicted == target else f"wrong, expected {target}"
        print(f"  {src} -> {predicted}  ({mark})")
    print(f"done in {time.perf_counter() - started:.0f} s; checkpoint {out / 'latest'}")


def _eval(args: argparse.Namespace) -> None:
    from qkv.checkpoint import load_model, load_training_state, resolve
    from qkv.data import prepare_eval_data

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device)
    if model.config.arch != "decoder":
        raise QkvError(
            f"qkv eval scores decoder language models; {args.model} holds an "
            f"{model.config.arch} model (an encoder-decoder run reports its exact match at the "
            "end of qkv train)"
        )
    context = args.context or model.config.max_seq_len
    if context > model.config.max_seq_len:
        raise QkvError(f"--context must be at most the model's {model.config.max_seq_len}")
    training = None
    if not args.data and (resolve(args.model) / "trainer_state.json").is_file():
        run_config = load_training_state(resolve(args.model))[1]["train_config"]
        training = (run_config["data"], run_config["val_fraction"])
    data = prepare_eval_data(
        args.data, tokenizer, training, progress=lambda m: print(m, file=sys.stderr)
    )
    from tqdm import tqdm

    windows = (len(data.tokens) - 1) // context
    with tqdm(total=windows, desc="eval", unit="window", disable=args.json) as bar:
        result = evaluate(model, data, context, args.batch_size, progress=bar.update)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(
            f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
            f"bits/byte {result.bits_per_byte:.3f}  ({result.tokens:,} tokens)"
        )


@contextlib.contextmanager
def _warnings_to_stderr(command: str) -> Iterator[None]:
    """Python warnings inside the block as one line each: 'qkv COMMAND: warning: ...'."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_: print(
            f"qkv {command}: warning: {message}", file=sys.stderr
        )
        yield


def _generate(args: argparse.Namespace) -> None:
    from qkv.generate import GenerationConfig, Generator, read_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise QkvError("give a prompt to continue, or --prompts FILE")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    generator = Generator.load(args.model, resolve_device(args.device))
    with _warnings_to_stderr("generate"):
        generator.check(prompts)  # every prompt's errors and warnings before any output
    started, produced = time.perf_counter(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported above, numbered over all the prompts
        if args.json:
            for first in range(0, len(prompts), args.batch_size):
                for completion in generator.generate(
                    prompts[first : first + args.batch_size], config
                ):
                    produced += len(completion.token_ids)
                    print(json.dumps(completion.to_dict()), flush=True)
        else:
            for number, prompt in enumerate(prompts):
                print(("\n" if number else "") + prompt, end="", flush=True)
                completion = generator.generate(
                    prompt, config, on_text=lambda _, text: print(text, end="", flush=True)
                )
                produced += len(completion.token_ids)
                print(flush=True)
    seconds = time.perf_counter() - started
    if not args.json:
        print(
            f"({produced} tokens in {seconds:.1f} s, {produced / seconds:.1f} tokens/s)",
            file=sys.stderr,
        )


def _finetune(args: argparse.Namespace) -> None:
    from qkv.chat import answer_prompt
    from qkv.checkpoint import ADAPTER, load_training_state, resolve, run_directory
    from qkv.finetune import LoRASettings, prepare_finetune
    from qkv.generate import Generator

    given = {k: v for k, v in vars(args).items() if v is not None}
    lora = None
    if args.resume is not None:
        if args.model or args.data or args.lora_rank:
            raise QkvError(
                "--resume continues a run with its own model and data: drop "
                "--model/--data/--lora-rank"
            )
        folder = resolve(args.resume)
        state = load_training_state(folder)[1]
        if state.get("kind", "train") != "finetune":
            raise QkvError(
                f"{folder} is not a fine-tuning run: continue it with qkv train --resume"
            )
        base = TrainConfig(**state["train_config"])
        out, spec = args.out or run_directory(folder), base.data[0]
    else:
        if args.model is None or args.out is None:
            raise QkvError("give --model (the checkpoint to start from) and --out, or --resume RUN")
        out, spec = args.out, args.data or "builtin:stdlib-qa"
        lora_options = (args.lora_alpha, args.lora_dropout, args.lora_targets)
        if args.lora_rank is None and any(o is not None for o in lora_options):
            raise QkvError("--lora-alpha, --lora-dropout and --lora-targets need --lora-rank")
        if args.lora_rank is not None:
            targets = tuple(
                t.strip() for t in (args.lora_targets or "q_proj,v_proj").split(",") if t.strip()
            )
            alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
            dropout = args.lora_dropout or 0.0
            if not 0.0 <= dropout < 1.0:
                raise QkvError(f"--lora-dropout must be in [0, 1); got {dropout}")
            if not alpha > 0:
                raise QkvError(f"--lora-alpha must be positive; got {alpha}")
            lora = LoRASettings(args.lora_rank, alpha, dropout, targets)
        lr = LORA_LR if lora else FINETUNE_LR
        base = TrainConfig(data=[spec], context=10**9, lr=lr, **FINETUNE_DEFAULTS)
    cfg = dataclasses.replace(base, **{k: given[k] for k in FINETUNE_OPTIONS if k in given})
    if args.resume is None:
        cfg.warmup_steps = min(100, cfg.steps // 10)
    try:
        trainer, held_out = prepare_finetune(
            args.model, spec, cfg, out, lambda m: print(m, file=sys.stderr), lora, args.resume
        )
    except ValueError as err:  # add_lora: no layer of that name, a rank too large
        raise QkvError(f"LoRA: {err}") from None
    train, val = trainer.train_examples, trainer.val_examples
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"data: {len(train.rows):,} training and {len(val.rows):,} validation examples"
        f" ({train.skipped + val.skipped:,} longer than the context of {cfg.context} tokens "
        f"skipped); {model.num_parameters():,} parameters, {trainable:,} trained; "
        f"{cfg.steps:,} steps x {cfg.batch_size} examples"
        + (f"; resuming at step {trainer.step}" if args.resume else "")
    )
    if trainer.adapter is not None:
        a = trainer.adapter
        print(
            f"LoRA: rank {a['rank']}, alpha {a['alpha']:g}, dropout {a['dropout']:g} on "
            f"{', '.join(a['targets'])}; base model {a['base']} stays frozen"
        )
    before = trainer.evaluate()
    print(f"{'now' if args.resume else 'before'}: held-out response loss {before.loss:.4f}")
    _run_training(Run(trainer, None, None), out, "finetune")  # type: ignore[arg-type]
    after = [h for h in trainer.history if "val_loss" in h][-1]["val_loss"]
    print(
        f"after: held-out response loss {after:.4f} ({1 - after / before.loss:.0%} lower); "
        f"checkpoint {out / 'latest'}"
    )
    if trainer.adapter is not None:
        size = (out / "latest" / ADAPTER).stat().st_size
        print(
            f"adapter: {out / 'latest' / ADAPTER}, {size / 1024:,.0f} KiB ({trainable:,} "
            f"parameters); fold it into the base with: qkv merge --model {out} --out DIR"
        )
    generator = Generator(model.eval(), trainer.tokenizer)
    questions = [e.turns[-2][1] for e in held_out if len(e.turns) > 1 and e.turns[-2][0] == "user"]
    for question in questions[:3]:
        prompt = answer_prompt([("user", question)], trainer.tokenizer.end_of_text)
        answer = generator.generate(prompt, max_new_tokens=48, temperature=0)
        print(f"--- Q: {question}\n    A: {answer.text.strip()}")


def _merge(args: argparse.Namespace) -> None:
    import torch

    from qkv.checkpoint import ADAPTER_CONFIG, load_model, resolve, write_checkpoint
    from qkv.nn.lora import merge_lora

    folder = resolve(args.model)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise QkvError(
            f"{folder} is not a LoRA adapter (it has no {ADAPTER_CONFIG}): nothing to merge"
        )
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise QkvError(f"{args.out} already exists and is not empty; choose another --out")
    model, tokenizer = load_model(folder)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(
        0, model.config.vocab_size, (2, min(16, model.config.max_seq_len)), generator=generator
    )
    with torch.no_grad():
        before = model(probe)
        layers = merge_lora(model)
        difference = float((model(probe) - before).abs().max())
    write_checkpoint(args.out, model, tokenizer)
    print(
        f"merged {layers} LoRA layers into the base model: {args.out} "
        f"({model.num_parameters():,} parameters); logits on a random probe differ from base + "
        f"adapter by at most {difference:.1e}"
    )


def _chat(args: argparse.Namespace) -> None:
    from qkv.chat import ROLE_TOKENS, Conversation
    from qkv.generate import GenerationConfig, Generator

    generator = Generator.load(args.model, resolve_device(args.device))
    window = generator.model.config.max_seq_len
    reserve = min(args.max_new_tokens, window // 2)
    conversation = Conversation(generator.tokenizer, window, reserve, args.system)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(ROLE_TOKENS.values()),
        seed=args.seed,
    )
    interactive = sys.stdin.isatty() and args.prompt is None

    def reply(message: str) -> None:
        try:
            message.encode("utf-8")
        except UnicodeEncodeError:
            raise QkvError("the message is not valid UTF-8 text") from None
        prompt, dropped = conversation.prompt(message)
        if dropped:
            print(
                f"(the {dropped} oldest exchange(s) no longer fit the context window of "
                f"{window} tokens and were left out)",
                file=sys.stderr,
            )
        if interactive:
            print("assistant> ", end="", flush=True)
        turn = dataclasses.replace(config, seed=config.seed + len(conversation.exchanges))
        with _warnings_to_stderr("chat"):
            completion = generator.generate(
                prompt, turn, on_text=lambda _, text: print(text, end="", flush=True)
            )
        print(flush=True)
        conversation.add(message, completion.text)

    if args.prompt is not None:
        if not args.prompt.strip():
            raise QkvError("the message (-p) is empty")
        reply(args.prompt)
        return
    if interactive:
        print(
            f"chatting with {args.model} ({window}-token context). /reset forgets the "
            "conversation, /exit or Ctrl-D ends, Ctrl-C stops a reply.",
            file=sys.stderr,
        )
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
            print(file=sys.stderr)
            continue
        except UnicodeDecodeError as err:
            raise QkvError(f"standard input is not UTF-8 text (byte {err.start})") from None
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            return
        if message == "/reset":
            conversation.reset()
            print("(the conversation is forgotten)", file=sys.stderr)
        elif message.startswith("/"):
            print(
                f"unknown command {message}: /reset forgets the conversation, /exit ends",
                file=sys.stderr,
            )
        else:
            try:
                reply(message)
            except KeyboardInterrupt:
                print("\n(reply stopped)", file=sys.stderr)
            except QkvError as err:  # this message only: the conversation goes on
                print(f"qkv chat: error: {err}", file=sys.stderr)


def _embed(args: argparse.Namespace) -> None:
    from qkv.checkpoint import load_model
    from qkv.embed import embed
    from qkv.generate import read_prompts

    texts = list(args.text) + (read_prompts(args.file) if args.file else [])
    if not texts:
        raise QkvError("give texts to embed, or --file FILE")
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise QkvError(f"text {number} is empty")
    model, tokenizer = load_model(args.model, resolve_device(args.device))
    vectors = embed(model, tokenizer, texts, args.max_tokens)
    if args.json:
        print(json.dumps([[round(x, 7) for x in v] for v in vectors.tolist()]))
        return
    for number, (text, vector) in enumerate(zip(texts, vectors.tolist(), strict=True), 1):
        start = ", ".join(f"{x:+.4f}" for x in vector[:6])
        print(f"{number}: [{start}, ...] ({len(vector)} dims)  {text[:60]}")
    if len(texts) > 1:
        similarity = vectors @ vectors.T
        print("cosine similarity:")
        print("     " + "".join(f"{j:>7}" for j in range(1, len(texts) + 1)))
        for i, row in enumerate(similarity.tolist(), 1):
            print(f"{i:>4} " + "".join(f"{x:7.3f}" for x in row))


def _export(args: argparse.Namespace) -> None:
    from qkv.checkpoint import load_model
    from qkv.hf import hf_family, save_hf_directory
    from qkv.model import DecoderLM
    from qkv.nn.lora import merge_lora

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise QkvError(f"{args.out} already exists and is not empty; choose another --out")
    model, tokenizer = load_model(args.model)
    if not isinstance(model, DecoderLM):
        raise QkvError(f"{args.model} holds an {model.config.arch} model; export writes decoders")
    merge_lora(model)
    family = hf_family(model.config)
    save_hf_directory(model, tokenizer, args.out)
    kind = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    print(f"wrote {args.out} as {kind} ({model.num_parameters():,} parameters): config.json, "
          "model.safetensors, tokenizer.json")  # fmt: skip


def _quickstart(args: argparse.Namespace) -> None:
    from qkv.checkpoint import load_model
    from qkv.generate import Generator

    if (args.out / "latest").exists():
        raise QkvError(
            f"{args.out} already holds a quickstart run; delete it or pass another --out"
        )
    if args.minutes <= 0:
        raise QkvError("--minutes must be positive")
    cfg = dataclasses.replace(QUICKSTART, steps=args.steps or QUICKSTART.steps, device=args.device)
    started = time.perf_counter()
    run = prepare_run(
        args.out, cfg, QUICKSTART_MODEL, progress=lambda message: print(message, file=sys.stderr)
    )
    if args.steps is None:
        per_step = run.trainer.seconds_per_step()
        budget = 60 * args.minutes - (time.perf_counter() - started) - QUICKSTART_RESERVE_S
        cfg.steps = max(1, min(QUICKSTART.steps, int(budget / per_step)))
        if cfg.steps < QUICKSTART.steps:
            print(
                f"this machine takes {1000 * per_step:.0f} ms a step: {cfg.steps} steps fit in "
                f"{args.minutes:g} minutes (--minutes, --steps)",
                file=sys.stderr,
            )
    cfg.eval_every = min(cfg.eval_every, cfg.steps)
    print(_summary(run))
    _run_training(run, args.out)
    model, tokenizer = load_model(args.out)
    final = [h for h in run.trainer.history if "val_loss" in h][-1]
    print(
        f"\nvalidation: loss {final['val_loss']:.4f}, perplexity {final['val_perplexity']:.2f}, "
        f"bits/byte {final['val_bits_per_byte']:.3f}"
    )
    print("\nsamples (temperature 0.8, top-k 50):")
    generator = Generator(model, tokenizer)
    for seed, prompt in enumerate(QUICKSTART_PROMPTS):
        text = generator.generate(prompt, max_new_tokens=60, seed=seed).text
        print(f"--- {prompt}{text}")
    print(
        f"\ndone in {time.perf_counter() - started:.0f} s; everything is in {args.out}/ "
        f"(checkpoint: {args.out}/latest, metrics.jsonl, loss.png)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    commands = {
        "explain": _explain,
        "train": _train,
        "eval": _eval,
        "generate": _generate,
        "finetune": _finetune,
        "merge": _merge,
        "chat": _chat,
        "embed": _embed,
        "export": _export,
        "quickstart": _quickstart,
    }
    name, world = f"qkv {args.command}", ONE_PROCESS
    try:
        world = launched_world()
        name += f" (process {world.rank})" if world.rank else ""
        if world.size > 1 and args.command != "train":
            raise QkvError(f"torchrun runs qkv train only; run qkv {args.command} on its own")
        commands[args.command](args)
    except QkvError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        if world.is_main:
            print(f"{name}: interrupted; nothing was saved", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    return 0
