"""Hugging Face interop: their model configs and tensors as qkv's, by name.

GPT-2: learned positions, pre-norm LayerNorm, tanh GELU, biases, head tied to the token embedding.
Its Conv1D layers store weights as (in, out), the transpose of nn.Linear's (out, in), and c_attn
packs W_Q, W_K, W_V side by side.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qkv.config import ModelConfig
from qkv.errors import QkvError


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    """A GPT-2 config.json (as a dict) -> the ModelConfig computing the same function."""
    activation = hf.get("activation_function", "gelu_new")
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if activation not in activations:
        raise QkvError(f"GPT-2 activation_function {activation!r} is not supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["n_embd"],
        n_heads=hf["n_head"],
        n_layers=hf["n_layer"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        max_seq_len=hf["n_positions"],
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        feed_forward=activations[activation],
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def gpt2_state_dict(hf: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """GPT2Model / GPT2LMHeadModel tensors -> DecoderLM tensors (Conv1D weights transposed)."""
    hf = {name.removeprefix("transformer."): tensor for name, tensor in hf.items()}

    def take(name: str) -> Tensor:
        if name not in hf:
            raise QkvError(f"the GPT-2 checkpoint has no tensor {name!r}")
        return hf[name]

    out = {
        "embedder.token_embedding.weight": take("wte.weight"),
        "embedder.position.weight": take("wpe.weight"),
        "final_norm.weight": take("ln_f.weight"),
        "final_norm.bias": take("ln_f.bias"),
    }
    if not config.tie_embeddings:
        out["head.weight"] = take("lm_head.weight")
    for i in range(config.n_layers):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for theirs, ours in [("ln_1", "attention_norm"), ("ln_2", "feed_forward_norm")]:
            out[f"{dst}{ours}.weight"] = take(f"{src}{theirs}.weight")
            out[f"{dst}{ours}.bias"] = take(f"{src}{theirs}.bias")
        q, k, v = take(f"{src}attn.c_attn.weight").t().chunk(3, dim=0)
        qb, kb, vb = take(f"{src}attn.c_attn.bias").chunk(3, dim=0)
        for name, weight, bias in [("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)]:
            out[f"{dst}self_attention.{name}.weight"] = weight
            out[f"{dst}self_attention.{name}.bias"] = bias
        pairs = [
            ("attn.c_proj", "self_attention.o_proj"),
            ("mlp.c_fc", "feed_forward.w1"),
            ("mlp.c_proj", "feed_forward.w2"),
        ]
        for theirs, ours in pairs:
            out[f"{dst}{ours}.weight"] = take(f"{src}{theirs}.weight").t()
            out[f"{dst}{ours}.bias"] = take(f"{src}{theirs}.bias")
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_gpt2(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers GPT2LMHeadModel -> a qkv DecoderLM with the same weights (eval mode)."""
    from qkv.model import DecoderLM

    config = gpt2_config(model.config.to_dict())
    ours = DecoderLM(config)
    ours.load_state_dict(gpt2_state_dict(model.state_dict(), config))
    return ours.eval()
