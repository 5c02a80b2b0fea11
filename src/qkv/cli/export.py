"""`qkv export`: a trained decoder as a Hugging Face model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.cli.options import add_command, add_model

EXAMPLES = """examples:
  qkv export --model runs/quickstart --out exported/quickstart
  then in Python: AutoModelForCausalLM.from_pretrained("exported/quickstart")
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    export = add_command(
        commands,
        "export",
        "write a trained decoder as a Hugging Face model directory",
        "Write a qkv decoder as a Hugging Face directory (config.json,\n"
        "model.safetensors, tokenizer.json) that transformers loads as GPT2LMHeadModel\n"
        "(learned positions, LayerNorm, GELU, biases) or LlamaForCausalLM (RoPE, RMSNorm,\n"
        "SwiGLU, no biases), computing the same logits. A LoRA adapter is merged first.",
        EXAMPLES,
    )
    add_model(export)
    export.add_argument("--out", type=Path, required=True, help="directory to write")
    export.add_argument("--format", choices=["hf"], default="hf", help="hf (the default)")


def run(args: argparse.Namespace) -> None:
    from qkv.export import export_hf

    done = export_hf(args.model, args.out)
    print(f"wrote {done.folder} as {done.hf_class} ({done.parameters:,} parameters): "
          "config.json, model.safetensors, tokenizer.json")  # fmt: skip
