"""`qkv explain`: a sentence through a Transformer stage by stage, every number shown: the notes'
untrained worked example, or any trained or Hugging Face model with --model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkv.cli.options import add_command, add_dtype, positive, seed
from qkv.errors import ConfigError, QkvError

EXAMPLES = """examples:
  qkv explain                                   the notes' sentence, d_model = 4, 2 heads
  qkv explain "The quick brown fox jumps over the lazy dog" --heads 1
  qkv explain "Attention is all you need" --d-model 8 --layers 2 --seed 3
  qkv explain --json | python -m json.tool      every stage as one JSON object
  qkv explain --html walkthrough.html           the explorer's views in one file, offline
  qkv explain --plot attention.png              heatmaps of attention weights and positions
  qkv explain --model runs/quickstart "Return the value"        every stage of a trained model
  qkv explain --model gpt2-dir "The fox" --layer 3 --head 5    one block, one head
  qkv explain --model gpt2-dir "The fox" --json --layer 3 --top 10   what POST /v1/explain gives
"""
# Config fields as the explain command's options call them, for error messages.
FIELDS = {"d_model": "--d-model", "n_heads": "--heads", "n_layers": "--layers"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    explain = add_command(
        commands,
        "explain",
        "walk a sentence through a Transformer, stage by stage",
        "Walk a sentence through a decoder the way the notes do: tokens, embeddings,\n"
        "positions, Q/K/V, attention weights, feed-forward, norms, logits and next-word\n"
        "probabilities, each stage with its formula and a table with one row per token.\n"
        "The numbers are what the model's own modules computed. Without --model: a freshly\n"
        "initialised (seeded) model of the notes' size; with --model: a trained qkv\n"
        "checkpoint or a Hugging Face GPT-2, Llama or BERT directory.",
        EXAMPLES,
    )
    explain.add_argument(
        "text", nargs="*", help="the sentence (default: the notes' 'The quick brown fox ...')"
    )
    explain.add_argument("--d-model", type=positive, default=4, help="embedding size (default 4)")
    explain.add_argument("--heads", type=positive, default=2, help="attention heads (default 2)")
    explain.add_argument("--layers", type=positive, default=1, help="decoder blocks (default 1)")
    explain.add_argument(
        "--seed", type=seed, default=0, help="seed for the random weights (default 0)"
    )
    explain.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    explain.add_argument("--plot", metavar="FILE.png", help="also save heatmaps to this image file")
    explain.add_argument(
        "--html",
        metavar="FILE.html",
        help="also save the explorer's views, data included, as one file that opens offline",
    )
    explain.add_argument(
        "--top",
        type=positive,
        help="with --json: each token's K largest logits and probabilities, not the whole "
        "vocabulary (--html keeps 10)",
    )
    explain.add_argument(
        "--model", type=Path, help="a trained or Hugging Face model: walk the text through it"
    )
    add_dtype(explain)
    explain.add_argument(
        "--layer", type=int, help="show this block's stages only (default: every block)"
    )
    explain.add_argument(
        "--head", type=int, help="show this head (default: every head of a model with few)"
    )


def run(args: argparse.Namespace) -> None:
    from qkv import explain
    from qkv.explain.explorer import write_html

    if args.top is not None and not args.json:
        raise QkvError("--top shapes the --json output: add --json")
    if args.model is None and args.dtype != "auto":
        raise QkvError("--dtype sets a loaded model's precision: add --model DIR")
    if args.model is not None:
        if args.plot is not None:
            raise QkvError("--plot draws the worked example; with --model, use --json")
        if not args.text:
            raise QkvError("give the text to explain, e.g. qkv explain --model DIR 'The fox'")
        walkthrough = explain.explain_checkpoint(args.model, " ".join(args.text), args.dtype)
    else:
        text = " ".join(args.text) if args.text else explain.NOTES_SENTENCE
        try:
            walkthrough = explain.explain_text(
                text, args.d_model, args.heads, args.layers, args.seed
            )
        except ConfigError as err:
            message = str(err).replace("invalid config field ", "invalid ")
            for name, option in FIELDS.items():
                message = message.replace(name, option)
            raise QkvError(message) from None
    plotted = None if args.plot is None else explain.plot(walkthrough, args.plot)
    layers = None if args.layer is None else [args.layer]
    heads = None if args.head is None else [args.head]
    page = None
    if args.html is not None:
        data = explain.payload(walkthrough, layers, heads, top=10)
        page = write_html(data, " ".join(args.text) or explain.NOTES_SENTENCE, args.html)
    if args.json:
        print(explain.render_json(walkthrough, layers=layers, heads=heads, top=args.top))
        if page is not None:
            print(f"page saved to {page}", file=sys.stderr)
        return
    print(explain.render_text(walkthrough, args.layer, args.head))
    if plotted is not None:
        print(f"\nplot saved to {plotted}")
    if page is not None:
        print(f"\npage saved to {page} (open it in a browser; it needs no server)")
