"""`qkv <command>`: one module per command; each parses its arguments, calls one library
function and prints. Building the parser imports neither PyTorch nor the library: a command's
module imports the library when that command runs."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence

from qkv import __version__
from qkv.cli import (
    chat,
    embed,
    evaluate,
    explain,
    explore,
    export,
    finetune,
    generate,
    quickstart,
    serve,
    train,
)
from qkv.cli.options import Parser, warnings_to_stderr
from qkv.errors import QkvError

# Each command's parser and what runs it.
COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable]] = {
    "explain": (explain.add_parser, explain.run),
    "train": (train.add_parser, train.run),
    "eval": (evaluate.add_parser, evaluate.run),
    "generate": (generate.add_parser, generate.run),
    "finetune": (finetune.add_parser, finetune.run),
    "merge": (finetune.add_merge_parser, finetune.run_merge),
    "chat": (chat.add_parser, chat.run),
    "embed": (embed.add_parser, embed.run),
    "export": (export.add_parser, export.run),
    "quickstart": (quickstart.add_parser, quickstart.run),
    "serve": (serve.add_parser, serve.run),
    "explore": (explore.add_parser, explore.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qkv",
        description="qkv: the Transformer as readable, tested code.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'qkv COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add_parser, _ in COMMANDS.values():
        add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from qkv.distributed import launched_world  # the library, now that a command runs

    name, main_process = f"qkv {args.command}", True
    try:
        world = launched_world()
        main_process = world.is_main
        name += f" (process {world.rank})" if world.rank else ""
        if world.size > 1 and args.command != "train":
            raise QkvError(f"torchrun runs qkv train only; run qkv {args.command} on its own")
        with warnings_to_stderr(args.command, repeat=False):
            COMMANDS[args.command][1](args)
    except QkvError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        if main_process:
            print(f"{name}: interrupted; nothing was saved", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    return 0


def entry() -> None:
    """The `qkv` command: main(), then exit with its code; a Ctrl-C that lands while the
    interpreter shuts down (after the run is done and saved) is ignored, not a traceback from
    an atexit hook."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
