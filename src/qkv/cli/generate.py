"""`qkv generate`: continue prompts with a decoder, streamed, KV-cached."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from qkv.cli.options import (
    add_command,
    add_device,
    add_dtype,
    add_model,
    add_sampling,
    positive,
    sampling,
    warnings_to_stderr,
)
from qkv.config import GENERATION
from qkv.errors import QkvError

EXAMPLES = """examples:
  qkv generate --model runs/quickstart "Return the"
  qkv generate --model runs/quickstart "Return the" --temperature 0 --max-new-tokens 40
  qkv generate --model runs/quickstart "If the file" --top-p 0.9 --stop "." --seed 3
  qkv generate --model runs/quickstart --prompts prompts.txt --json > completions.jsonl
  qkv generate --model ~/models/Qwen2.5-0.5B-Instruct --chat "What is a list?"
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    generate = add_command(
        commands,
        "generate",
        "continue prompts with a trained decoder (streamed, KV-cached)",
        "Continue each prompt with a decoder checkpoint, token by token, using a\n"
        "key/value cache. Text is streamed as it is produced; --json prints one object per\n"
        "prompt instead (text, token_ids, ...), decoding --batch-size prompts at a time.\n"
        "Prompts longer than the model's context are cut from the left (with a warning),\n"
        "and generation goes on past the context by sliding the window.",
        EXAMPLES,
    )
    generate.add_argument("prompt", nargs="*", help="text to continue (several are allowed)")
    add_model(generate)
    generate.add_argument(
        "--prompts",
        metavar="FILE",
        help='more prompts: one per line, or JSON Lines with a "prompt" field; - for stdin',
    )
    add_sampling(generate, GENERATION)
    generate.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)"
    )
    generate.add_argument(
        "--no-cache", action="store_true", help="recompute every step instead of the KV cache"
    )
    generate.add_argument(
        "--chat", action="store_true",
        help="each prompt is a user message in the model's chat template; the reply is printed",
    )  # fmt: skip
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt")
    generate.add_argument(
        "--batch-size", type=positive, default=8, help="prompts decoded together with --json (8)"
    )
    add_device(generate)
    add_dtype(generate)


def run(args: argparse.Namespace) -> None:
    from qkv.chat_template import chat_prompt, chat_stops, has_chat_template, role_ids
    from qkv.device import resolve_device
    from qkv.generate import GenerationConfig, Generator, read_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise QkvError("give a prompt to continue, or --prompts FILE")
    generator = Generator.load(args.model, resolve_device(args.device), args.dtype)
    stop = tuple(args.stop)
    texts = list(prompts)
    if args.chat:
        tokenizer = generator.tokenizer
        if not has_chat_template(tokenizer):
            role_ids(tokenizer)  # refuses it, naming what is missing
        prompts = [chat_prompt([("user", text)], tokenizer) for text in texts]
        stop += chat_stops(tokenizer)
    config = GenerationConfig(**sampling(args), stop=stop, use_cache=not args.no_cache)
    with warnings_to_stderr("generate"):
        generator.check(prompts)  # every prompt's errors and warnings before any output
    print(generator.summary, file=sys.stderr)
    started, produced = time.perf_counter(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported above, numbered over all the prompts
        if args.json:
            for first in range(0, len(prompts), args.batch_size):
                batch = prompts[first : first + args.batch_size]
                for completion in generator.generate(batch, config):
                    produced += len(completion.token_ids)
                    print(json.dumps(completion.to_dict()), flush=True)
        else:
            for number, prompt in enumerate(prompts):
                shown = "" if args.chat else texts[number]  # --chat prints the reply alone
                print(("\n" if number else "") + shown, end="", flush=True)
                try:
                    completion = generator.generate(
                        prompt, config, on_text=lambda _, text: print(text, end="", flush=True)
                    )
                except QkvError:  # a broken model: end the streamed line before the error
                    print(flush=True)
                    raise
                produced += len(completion.token_ids)
                print(flush=True)
    seconds = time.perf_counter() - started
    if not args.json:
        print(
            f"({produced} tokens in {seconds:.1f} s, {produced / seconds:.1f} tokens/s)",
            file=sys.stderr,
        )
