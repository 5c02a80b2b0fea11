"""What several commands share: the parser class, value types, and the option groups for the
device, model loading and token sampling. Nothing here imports PyTorch or the library (but
`server`, when a command asks for it)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from qkv.errors import QkvError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: the problem and where to get help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {value}")
    return value


def add_command(
    commands: argparse._SubParsersAction, name: str, help: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """A sub-command whose --help shows its description and examples as written."""
    return commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model(parser: argparse.ArgumentParser, what: str = "run or checkpoint directory") -> None:
    parser.add_argument("--model", type=Path, required=True, help=what)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="precision to run in (default auto: the stored dtype on a GPU; on a CPU, float32 "
        "unless a short measurement finds its half-precision matmuls as fast)",
    )  # fmt: skip


def add_sampling(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty and --seed, with
    the command's defaults (config.GENERATION or config.CHAT)."""
    options = [
        ("--max-new-tokens", positive, "tokens to add at most"),
        ("--temperature", float, "0 = greedy, higher = more random"),
        ("--top-k", int, "sample among the k likeliest; 0 = all"),
        ("--top-p", float, "nucleus: the likeliest tokens up to this probability mass; 1 = all"),
        ("--repetition-penalty", float, "> 1 discourages tokens already in the text; 1 = off"),
    ]
    for flag, kind, text in options:
        default = defaults[flag[2:].replace("-", "_")]
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default:g})")
    parser.add_argument("--seed", type=seed, default=0, help="sampling seed (default 0)")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options as GenerationConfig's fields."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }


def say(message: str) -> None:
    """A progress message: on standard error, so that standard output stays the result."""
    print(message, file=sys.stderr)


@contextlib.contextmanager
def warnings_to_stderr(command: str, repeat: bool = True) -> Iterator[None]:
    """Python warnings inside the block as one line each: 'qkv COMMAND: warning: ...'; a
    UserWarning (qkv's own) each time it is raised, or (`repeat` False) once per message and
    place; other categories as Python's filters say (deprecations stay hidden)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always" if repeat else "default", category=UserWarning)
        warnings.showwarning = lambda message, *_: print(
            f"qkv {command}: warning: {message}", file=sys.stderr
        )
        yield


def server(command: str) -> ModuleType:
    """qkv.server, or one line naming the missing serve extra and how to install it."""
    try:
        return importlib.import_module("qkv.server")
    except ImportError as err:
        raise QkvError(
            f"qkv {command} needs the serve extra ({err.name} is missing): pip install 'qkv[serve]'"
        ) from None
