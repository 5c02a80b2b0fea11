"""`qkv embed`: sentence embeddings from an encoder, and their cosine similarities."""

from __future__ import annotations

import argparse
import json

from qkv.cli.options import add_command, add_device, add_dtype, add_model, positive, say
from qkv.errors import QkvError

EXAMPLES = """examples:
  qkv embed --model ~/models/all-MiniLM-L6-v2 "A man is eating food." "Someone eats."
  qkv embed --model ~/models/all-MiniLM-L6-v2 --file sentences.txt --json > vectors.json
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    embed = add_command(
        commands,
        "embed",
        "sentence embeddings from an encoder (mean pooling + L2 normalisation)",
        "Sentence embeddings from an encoder such as a BERT / sentence-transformers\n"
        "directory: the mean of the final hidden states over each text's tokens, scaled to\n"
        "length 1. Prints each vector's start and the texts' cosine similarities, or --json.",
        EXAMPLES,
    )
    embed.add_argument("text", nargs="*", help="texts to embed")
    add_model(embed, "encoder directory")
    embed.add_argument("--file", help="also embed every line of this file ('-': standard input)")
    embed.add_argument(
        "--max-tokens", type=positive, help="truncate longer texts (default: the model's context)"
    )
    embed.add_argument("--json", action="store_true", help="print a JSON list of vectors")
    add_device(embed)
    add_dtype(embed)


def run(args: argparse.Namespace) -> None:
    from qkv.embed import embed_texts
    from qkv.generate import read_prompts

    texts = list(args.text) + (read_prompts(args.file) if args.file else [])
    if not texts:
        raise QkvError("give texts to embed, or --file FILE")
    vectors = embed_texts(args.model, texts, args.max_tokens, args.device, args.dtype, say)
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
