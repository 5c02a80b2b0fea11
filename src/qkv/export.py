"""Export: a qkv decoder checkpoint written as a Hugging Face model directory that transformers
loads (GPT2LMHeadModel or LlamaForCausalLM, whichever computes the same function); a LoRA
adapter is merged into its base first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qkv.checkpoint import load_model
from qkv.errors import QkvError
from qkv.files import check_new_directory
from qkv.hf import save_hf_directory
from qkv.model import DecoderLM
from qkv.nn.lora import merge_lora


@dataclass
class Exported:
    folder: Path
    hf_class: str  # the transformers class that loads it
    parameters: int


def export_hf(path: str | Path, out: Path) -> Exported:
    """`qkv export --format hf`: the checkpoint at `path` as a Hugging Face directory `out`
    (config.json, model.safetensors, tokenizer.json), written atomically; an `out` that cannot
    be written is refused before the model is loaded, and a write that fails (a full disk)
    leaves nothing behind."""
    check_new_directory(out)
    model, tokenizer = load_model(path)
    if not isinstance(model, DecoderLM):
        raise QkvError(f"{path} holds an {model.config.arch} model; export writes decoders")
    merge_lora(model)
    family = save_hf_directory(model, tokenizer, out)
    return Exported(out, family.hf_class, model.num_parameters())
