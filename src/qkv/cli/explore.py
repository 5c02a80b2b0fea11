"""`qkv explore`: the explorer page in the browser, served by this process: the notes' example,
or any model qkv loads with --model."""

from __future__ import annotations

import argparse
import sys
import webbrowser
from pathlib import Path

from qkv.cli.options import add_command, add_device, server

EXAMPLES = """examples:
  qkv explore                                  the notes' 4-dimensional example, untrained
  qkv explore --model runs/quickstart          your own model: type a text, see every stage
  qkv explore --model gpt2-dir --port 8080 --no-browser
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    explore = add_command(
        commands,
        "explore",
        "see inside a model in the browser: attention, logit lens, next token, chat",
        "Serve the explorer page and open it in the default browser. For a text you type it\n"
        "shows the model's real tokens, embeddings and positions, every head's attention\n"
        "scores and weights, the feed-forward's most active units, the residual stream, the\n"
        "logit lens (each layer's guess at the next token) and the next-token distribution\n"
        "under temperature, top-k and top-p, each panel with its formula. The same process\n"
        "serves the HTTP API of `qkv serve` (the page's chat tab uses it). Without --model:\n"
        "the notes' untrained example, d_model = 4. Ctrl-C stops.\n"
        "Needs the serve extra: pip install 'qkv[serve]'.",
        EXAMPLES,
    )
    explore.add_argument(
        "--model", type=Path, help="a qkv run or checkpoint, LoRA adapter or Hugging Face directory"
    )
    explore.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    explore.add_argument("--port", type=int, default=8000, help="port (8000)")
    explore.add_argument(
        "--no-browser", action="store_true", help="print the address; do not open a browser"
    )
    add_device(explore)


def run(args: argparse.Namespace) -> None:
    serving = server("explore")
    serving.check_port(args.port)
    if args.model is None:
        served = serving.notes_served()
    else:
        served = serving.load_served(args.model, args.device)
    url = f"http://{args.host}:{args.port}/"
    what = "the notes' example" if args.model is None else served.name
    print(f"exploring {what} at {url}; Ctrl-C stops", file=sys.stderr, flush=True)
    opened = None if args.no_browser else (lambda: webbrowser.open(url))
    serving.serve(served, args.host, args.port, on_ready=opened)
