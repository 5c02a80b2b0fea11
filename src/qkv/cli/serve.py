"""`qkv serve`: an OpenAI-compatible HTTP server for a decoder, batching concurrent requests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkv.cli.options import add_command, add_device, add_dtype, add_model, positive, server
from qkv.errors import QkvError

EXAMPLES = """examples:
  qkv serve --model runs/quickstart                       http://127.0.0.1:8000/v1
  qkv serve --model runs/qa --port 8080 --api-key-file key.txt --max-batch 16
  qkv serve --model ~/models/all-MiniLM-L6-v2                embeddings
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Return the", "max_tokens": 20, "stream": true}'
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    serve = add_command(
        commands,
        "serve",
        "serve a model over OpenAI's HTTP API (completions, chat, embeddings, models)",
        "Serve a decoder (qkv run or checkpoint, LoRA adapter, Hugging Face directory) over\n"
        "OpenAI's HTTP API: POST /v1/completions, POST /v1/chat/completions (models fine-tuned\n"
        "by `qkv finetune`), GET /v1/models, GET /health, GET /metrics, POST /tokenize and\n"
        "/detokenize; or an encoder (BERT, sentence-transformers) for POST /v1/embeddings.\n"
        "Concurrent requests decode together (continuous batching, up to --max-batch at a\n"
        "time); streaming is server-sent events.\n"
        "Ctrl-C or SIGTERM stops taking requests and gives running ones --shutdown-grace\n"
        "seconds to finish; the rest end with finish_reason 'length'.\n"
        "Needs the serve extra: pip install 'qkv[serve]'.",
        EXAMPLES,
    )
    add_model(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (8000)")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY'")
    keys.add_argument("--api-key-file", type=Path, help="read the API key from this file")
    serve.add_argument("--max-batch", type=positive, default=8, help="rows decoded together (8)")
    serve.add_argument("--max-queue", type=positive, default=64, help="requests waiting (64)")
    serve.add_argument("--served-model-name", help="the model's name in the API (default: dir)")
    serve.add_argument(
        "--shutdown-grace", type=float, default=3.0, metavar="SECONDS",
        help="on Ctrl-C / SIGTERM, seconds running requests get to finish (3)",
    )  # fmt: skip
    serve.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="also answer requests for this host name (repeatable); by default only "
        "127.0.0.1, localhost, ::1 and --host, or any name when --host is 0.0.0.0",
    )  # fmt: skip
    serve.add_argument(
        "--request-timeout", type=float, default=10.0, metavar="SECONDS",
        help="close a connection whose request (headers and body) has not all come in this "
        "time (10)",
    )  # fmt: skip
    serve.add_argument(
        "--max-connections", type=positive, default=256,
        help="requests handled at once; more get a 503 (256)",
    )  # fmt: skip
    serve.add_argument(
        "--special-tokens-in-content", action="store_true",
        help="with a model's own chat template, let message text spell special tokens "
        "(<|im_start|>...) as transformers does; by default they are plain text, so a user "
        "cannot forge a turn",
    )  # fmt: skip
    add_device(serve)
    add_dtype(serve)


def run(args: argparse.Namespace) -> None:
    serving = server("serve")
    from qkv.text import read_text_file

    serving.check_port(args.port)
    if not 0 <= args.shutdown_grace <= 600:
        raise QkvError(f"--shutdown-grace must be 0 to 600 seconds, got {args.shutdown_grace}")
    key = args.api_key
    if args.api_key_file is not None:
        key = read_text_file(args.api_key_file, "API key file").strip()
    served = serving.load_served(
        args.model, args.device, args.served_model_name, key, args.max_batch, args.max_queue,
        args.dtype,
    )  # fmt: skip
    served.special_in_content = args.special_tokens_in_content
    print(served.summary, file=sys.stderr)
    url = f"http://{args.host}:{args.port}"
    auth = ' -H "Authorization: Bearer $KEY"' if key else ""
    page = f"{url}/?key=KEY" if key else f"{url}/"
    print(
        f"serving {served.name} ({served.model.num_parameters():,} parameters, context "
        f"{served.window}) at {url}/v1, the explorer at {page}; Ctrl-C stops\n"
        f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
        f"""-d '{{"prompt": "Hello", "max_tokens": 16}}'""",
        file=sys.stderr,
        flush=True,
    )
    serving.serve(
        served, args.host, args.port, args.shutdown_grace, more_hosts=args.allowed_host,
        request_timeout=args.request_timeout, max_connections=args.max_connections,
    )  # fmt: skip
