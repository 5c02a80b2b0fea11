"""`qkv <command>`: parses arguments, calls the library, prints one line for a user error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qkv import __version__
from qkv.errors import ConfigError, QkvError

EXPLAIN_EXAMPLES = """examples:
  qkv explain                                   the notes' sentence, d_model = 4, 2 heads
  qkv explain "The quick brown fox jumps over the lazy dog" --heads 1
  qkv explain "Attention is all you need" --d-model 8 --layers 2 --seed 3
  qkv explain --json | python -m json.tool      every stage as one JSON object
  qkv explain --plot attention.png              heatmaps of attention weights and positions
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
        description="Walk a sentence through a freshly initialised (seeded) decoder, the way the "
        "notes do: tokens, embeddings, positions, Q/K/V, attention weights, feed-forward, norms, "
        "logits and next-word probabilities; each stage prints its formula and a table with one "
        "row per word.",
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
        "--seed", type=int, default=0, help="seed for the random weights (default 0)"
    )
    explain.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    explain.add_argument("--plot", metavar="FILE.png", help="also save heatmaps to this image file")
    return parser


def _explain(args: argparse.Namespace) -> None:
    from qkv import explain

    if args.d_model > 1024 or args.layers > 48:
        raise QkvError("explain prints every number: keep --d-model <= 1024 and --layers <= 48")
    text = " ".join(args.text) if args.text else explain.NOTES_SENTENCE
    try:
        walkthrough = explain.explain_text(text, args.d_model, args.heads, args.layers, args.seed)
    except ConfigError as err:
        message = str(err)
        for name, option in EXPLAIN_OPTIONS.items():
            message = message.replace(f"field {name}:", f"option {option}:")
        raise QkvError(message) from None
    if args.plot:
        explain.plot(walkthrough, args.plot)
    if args.json:
        print(explain.render_json(walkthrough))
    else:
        print(explain.render_text(walkthrough))
        if args.plot:
            print(f"\nplot saved to {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        {"explain": _explain}[args.command](args)
    except QkvError as err:
        print(f"qkv {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    return 0
