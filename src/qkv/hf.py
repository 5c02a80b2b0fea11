"""Hugging Face interop: their model directories, configs and tensors as qkv's, by name.

Each family is one `Family` in `FAMILIES`, read through the same two generic functions and, where
it has `config_to_hf`, written through them too: its `weight_map` renames tensors ("{}" stands
for the layer number), `transposed` lists the ones stored (in, out) and `fused` the ones that pack
several of ours.
GPT-2: learned positions, pre-norm LayerNorm, tanh GELU, biases, head tied to the token embedding.
Its Conv1D layers store weights as (in, out), the transpose of nn.Linear's (out, in), and c_attn
packs W_Q, W_K, W_V side by side.
Llama (also TinyLlama, SmolLM, ...): RoPE (rope_theta, "rotate half" pairs), pre-norm RMSNorm,
SwiGLU, grouped-query attention, no biases, tied or untied head; nn.Linear layouts throughout.
BERT (encoders such as all-MiniLM-L6-v2, import only): post-norm LayerNorm, exact GELU, learned
absolute positions, token-type embeddings and a LayerNorm over the summed embeddings; the pooler
is unused.
A directory holds config.json (with "model_type"), model.safetensors (or shards listed in
model.safetensors.index.json, or pytorch_model.bin, whose pickles qkv.files reads tensors-only)
and tokenizer.json (or BERT's vocab.txt).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor

from qkv import files
from qkv.config import FLAG, MAX_SIZE, ModelConfig, check_fields, check_hf_config, check_token_ids
from qkv.errors import QkvError
from qkv.memory import MORE_MEMORY, check_model_fits
from qkv.model import DecoderLM, Encoder, build_model, model_from_tensors
from qkv.text import model_file, read_model_json, read_model_text
from qkv.tokenizer import Tokenizer


@dataclass(frozen=True, kw_only=True)
class Family:
    """A Hugging Face model family: its configs and tensor names both ways.

    model_type: config.json's "model_type"; name: the family in messages; hf_class: the
    transformers class whose tensors the map names (the one an export loads in);
    weight_map: their tensor name -> ours, "{}" standing for the layer number;
    fused: their tensor -> ours it packs along dim 0, each as many rows as ours has (GPT-2's
    c_attn: Q, K, V; Phi-3's qkv_proj, whose K and V are narrower under grouped-query attention);
    transposed: their tensors stored (in, out), the transpose of nn.Linear's (out, in);
    base_prefix: what task models put before the base model's names ("transformer." in
    GPT2LMHeadModel, none in GPT2Model); names are matched with it removed;
    config_to_hf, misfits: for export, config.json's fields and what in a config the family
    cannot express (None where qkv does not export the family).
    """

    model_type: str
    name: str
    hf_class: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]] | None = None
    misfits: Callable[[ModelConfig], list[str]] | None = None
    weight_map: Mapping[str, str]
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()
    base_prefix: str = ""


def gpt2_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
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


def gpt2_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The GPT-2 config.json fields (as a dict) computing what `config` does."""
    return {
        "vocab_size": config.vocab_size, "n_embd": config.d_model, "n_head": config.n_heads,
        "n_layer": config.n_layers, "n_inner": config.d_ff, "n_positions": config.max_seq_len,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": "gelu_new" if config.feed_forward == "gelu_tanh" else "gelu",
        "tie_word_embeddings": config.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }  # fmt: skip


def _decoder_misfits(config: ModelConfig, needs: dict[str, tuple[object, bool]]) -> list[str]:
    """Each field a pre-norm decoder family cannot express, as "field=value (needs ...)";
    `needs` maps a field to (what the family needs, whether `config` has it)."""
    common = {
        "arch": ("decoder", config.arch == "decoder"),
        "norm_first": (True, config.norm_first),
        "final_norm": (True, bool(config.final_norm)),
        "scale_embeddings": (False, not config.scale_embeddings),
        "type_vocab_size": (0, config.type_vocab_size == 0),
        "embedding_norm": (False, not config.embedding_norm),
        "qk_norm": (False, not config.qk_norm),
        "logit_softcap": (None, config.logit_softcap is None),
        "head_dim": (
            config.d_model // config.n_heads,
            config.head_dim * config.n_heads == config.d_model,
        ),
        "qkv_bias": (config.bias, config.qkv_bias == config.bias),
        "sliding_window": (None, config.sliding_window is None),
        "rope_scaling": (None, config.rope_scaling is None),
        "rope_local_base": (None, config.rope_local_base is None),
        "attention_scale": (None, config.attention_scale is None),
        "attention_softcap": (None, config.attention_softcap is None),
        "norm_unit_offset": (False, not config.norm_unit_offset),
        "post_norms": (False, not config.post_norms),
    }
    return [f"{name}={getattr(config, name)!r} (needs {need})"
            for name, (need, ok) in {**common, **needs}.items() if not ok]  # fmt: skip


def gpt2_misfits(config: ModelConfig) -> list[str]:
    """What in `config` GPT-2 cannot express (empty when it fits)."""
    return _decoder_misfits(config, {
        "position": ("learned", config.position == "learned"),
        "norm": ("layernorm", config.norm == "layernorm"),
        "feed_forward": ("gelu or gelu_tanh", config.feed_forward in ("gelu", "gelu_tanh")),
        "bias": (True, config.bias),
        "n_kv_heads": ("n_heads", config.n_kv_heads == config.n_heads),
    })  # fmt: skip


def _rope(hf: dict[str, Any], name: str) -> dict[str, Any]:
    """RoPE's base and scaling from config.json: transformers 5 writes rope_parameters
    {rope_theta, rope_type, ...}; earlier versions rope_theta and rope_scaling (null, or
    {rope_type or type, factor, ...})."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields: dict[str, Any] = {
        "rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    }
    if kind == "llama3":
        fields |= {
            "rope_scaling": "llama3",
            "rope_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_context": int(rope["original_max_position_embeddings"]),
        }
    elif kind == "linear":
        fields |= {"rope_scaling": "linear", "rope_factor": float(rope["factor"])}
    elif kind != "default":
        raise QkvError(f"{name} RoPE scaling {kind!r} is not supported (default, llama3, linear)")
    return fields


def _sliding(hf: dict[str, Any], name: str, qwen: bool) -> dict[str, Any]:
    """The sliding window and the layers that use it: config.json's layer_types
    ("sliding_attention" / "full_attention" per layer) where written; else Mistral's on every
    layer, and the Qwens' (only with use_sliding_window) on layers >= max_window_layers."""
    window = hf.get("sliding_window")
    if window is None or (qwen and not hf.get("use_sliding_window", False)):
        return {}
    types = hf.get("layer_types")
    if types is None and not qwen:
        return {"sliding_window": int(window)}
    if types is None:
        first = hf.get("max_window_layers", hf["num_hidden_layers"])
        types = ["sliding_attention" if i >= first else "full_attention"
                 for i in range(hf["num_hidden_layers"])]  # fmt: skip
    return _windowed_layers(types, int(window), name)


def _windowed_layers(types: list[str], window: int, name: str) -> dict[str, Any]:
    """sliding_window and sliding_layers from layer_types: the layers of "sliding_attention"."""
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise QkvError(f"{name} layer_types {sorted(unknown)} are not supported")
    layers = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    if not layers:
        return {}
    return {"sliding_window": window, "sliding_layers": layers}


def llama_config_from_hf(
    hf: dict[str, Any], name: str = "Llama", qkv_bias: bool = False, qk_norm: bool = False
) -> ModelConfig:
    """A Llama-family config.json (as a dict) -> the ModelConfig computing the same function;
    Qwen2 adds biases to W_Q, W_K, W_V (`qkv_bias`), Qwen3 RMSNorms each head's q and k
    (`qk_norm`); Mistral and both Qwens may slide their attention windows."""
    if hf.get("hidden_act", "silu") != "silu":
        raise QkvError(f"{name} hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise QkvError(f"{name} attention_bias / mlp_bias is not supported (only no biases)")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        n_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        position="rope",
        **_rope(hf, name),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        feed_forward="swiglu",
        bias=False,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        **_sliding(hf, name, qwen=qkv_bias or qk_norm),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def qwen2_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A Qwen2 config.json: Llama's with biases on W_Q, W_K, W_V."""
    return llama_config_from_hf(hf, "Qwen2", qkv_bias=True)


def _rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """config.json's rope_theta and rope_scaling for `config`."""
    fields: dict[str, Any] = {"rope_theta": config.rope_base, "rope_scaling": None}
    if config.rope_scaling == "llama3":
        fields["rope_scaling"] = {
            "rope_type": "llama3", "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_context,
        }  # fmt: skip
    elif config.rope_scaling == "linear":
        fields["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_factor}
    return fields


def _sliding_to_hf(config: ModelConfig) -> dict[str, Any]:
    """config.json's sliding window and, per layer, layer_types."""
    if config.sliding_window is None:
        return {"use_sliding_window": False, "sliding_window": None}
    return {
        "use_sliding_window": True,
        "sliding_window": config.sliding_window,
        "max_window_layers": 0,
        "layer_types": [
            "sliding_attention" if config.slides(i) else "full_attention"
            for i in range(config.n_layers)
        ],
    }


def llama_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The Llama config.json fields (as a dict) computing what `config` does (Mistral and the
    Qwens add their sliding window)."""
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "num_hidden_layers": config.n_layers, "intermediate_size": config.d_ff,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_len,
        **_rope_to_hf(config), "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
    }  # fmt: skip


def _llama_misfits(config: ModelConfig, **needs: tuple[object, bool]) -> list[str]:
    """What a Llama-shaped family cannot express of `config`; `needs` as _decoder_misfits'."""
    return _decoder_misfits(config, {
        "position": ("rope", config.position == "rope"),
        "norm": ("rmsnorm", config.norm == "rmsnorm"),
        "feed_forward": ("swiglu", config.feed_forward == "swiglu"),
        "bias": (False, not config.bias),
        "head_dim": ("any", True),
        "rope_scaling": ("none, llama3 or linear", True),
        **needs,
    })  # fmt: skip


def llama_misfits(config: ModelConfig) -> list[str]:
    """What in `config` Llama cannot express (empty when it fits)."""
    return _llama_misfits(config)


def mistral_misfits(config: ModelConfig) -> list[str]:
    """Mistral: Llama's design with a sliding window on every layer."""
    window = config.sliding_window is not None and config.sliding_layers is None
    return _llama_misfits(config, sliding_window=("a window on every layer", window))


def qwen2_misfits(config: ModelConfig) -> list[str]:
    """Qwen2: Llama's design with biases on W_Q, W_K, W_V; any sliding layers."""
    return _llama_misfits(
        config, qkv_bias=(True, bool(config.qkv_bias)), sliding_window=("any", True)
    )


def qwen3_misfits(config: ModelConfig) -> list[str]:
    """Qwen3: Llama's design with QK-norm; any sliding layers."""
    return _llama_misfits(config, qk_norm=(True, config.qk_norm), sliding_window=("any", True))


def mistral_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """Llama's config.json fields and Mistral's sliding_window (every layer: no layer_types,
    which transformers reads as Ministral)."""
    return llama_config_to_hf(config) | {"sliding_window": config.sliding_window}


def sliding_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """Llama's config.json fields and the sliding window's, per layer (Qwen2, Qwen3)."""
    return llama_config_to_hf(config) | _sliding_to_hf(config)


def phi3_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A Phi-3 config.json: Llama's design (W_Q, W_K, W_V fused in one qkv_proj, gate and up in
    one gate_up_proj) with a sliding window on every layer; partial RoPE and longrope (Phi-3
    128k, Phi-4-mini) are refused."""
    rope = hf.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise QkvError(
            f"Phi-3 partial_rotary_factor {partial} is not supported (only 1.0: RoPE on all of "
            "each head)"
        )
    return llama_config_from_hf(hf, "Phi-3")


def _gemma_rope(hf: dict[str, Any], name: str, local: bool) -> dict[str, Any]:
    """Gemma's RoPE: Gemma 3 turns its sliding layers by their own base (rope_local_base_freq,
    or rope_parameters["sliding_attention"]), unscaled, its full ones by rope_theta (default
    1e6), maybe scaled; Gemma 2 one base for all."""
    params = hf.get("rope_parameters") or {}
    if not local:
        return _rope(hf, name)
    if "full_attention" in params:
        sliding = params.get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise QkvError(f"{name} sliding-layer RoPE scaling {sliding['rope_type']!r} is not "
                           "supported (only default)")  # fmt: skip
        full = _rope({"rope_parameters": params["full_attention"] or {}}, name)
        return full | {"rope_local_base": float(sliding.get("rope_theta", 10000.0))}
    full = _rope({"rope_theta": 1e6} | hf, name)
    return full | {"rope_local_base": float(hf.get("rope_local_base_freq", 10000.0))}


def gemma_config_from_hf(hf: dict[str, Any], name: str = "Gemma 2", gemma3: bool = False
                         ) -> ModelConfig:  # fmt: skip
    """A Gemma 2 (or, `gemma3`, Gemma 3 text) config.json -> the ModelConfig computing the same
    function: embeddings times sqrt(d_model), RMSNorms of gain (1 + gamma) before and after each
    sublayer, GELU-tanh gating, scores scaled by query_pre_attn_scalar^-1/2 and soft-capped,
    alternating sliding-window layers; Gemma 3 adds QK-norm and a local RoPE base."""
    activation = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    activations = {"gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh", "gelu": "geglu"}
    if activation not in activations:
        raise QkvError(f"{name} hidden_activation {activation!r} is not supported")
    if hf.get("attention_bias"):
        raise QkvError(f"{name} attention_bias is not supported (only no biases)")
    if hf.get("use_bidirectional_attention"):
        raise QkvError(f"{name} use_bidirectional_attention is not supported (only causal)")
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    pattern = 6 if gemma3 else 2
    pattern = hf.get("sliding_window_pattern", pattern)
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ]
    window = hf.get("sliding_window")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        n_layers=layers,
        d_ff=hf["intermediate_size"],
        head_dim=head_dim,
        max_seq_len=hf.get("max_position_embeddings", 8192),
        position="rope",
        **_gemma_rope(hf, name, local=gemma3),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_unit_offset=True,
        post_norms=True,
        feed_forward=activations[activation],
        bias=False,
        qk_norm=gemma3,
        scale_embeddings=True,
        attention_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        attention_softcap=hf.get("attn_logit_softcapping"),
        logit_softcap=hf.get("final_logit_softcapping"),
        **(_windowed_layers(types, int(window), name) if window else {}),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _gemma_misfits(config: ModelConfig, gemma3: bool) -> list[str]:
    """What a Gemma family cannot express of `config`: it needs Gemma's norms, scaled
    embeddings and GELU gating; Gemma 3 QK-norm and a local RoPE base, Gemma 2 neither."""
    return _decoder_misfits(config, {
        "position": ("rope", config.position == "rope"),
        "norm": ("rmsnorm", config.norm == "rmsnorm"),
        "norm_unit_offset": (True, config.norm_unit_offset),
        "post_norms": (True, config.post_norms),
        "scale_embeddings": (True, config.scale_embeddings),
        "feed_forward": ("geglu_tanh or geglu", config.feed_forward in ("geglu_tanh", "geglu")),
        "bias": (False, not config.bias),
        "head_dim": ("any", True),
        "attention_scale": ("n**-0.5, n an integer (query_pre_attn_scalar)",
                            math.isclose(_query_scalar(config) ** -0.5, _scale(config))),
        "attention_softcap": ("any", True),
        "logit_softcap": ("any", True),
        "sliding_window": ("any", True),
        "qk_norm": (gemma3, config.qk_norm == gemma3),
        "rope_local_base": ("a base" if gemma3 else None,
                            (config.rope_local_base is not None) == gemma3),
        "rope_scaling": ("none or linear" if gemma3 else None,
                         config.rope_scaling in ((None, "linear") if gemma3 else (None,))),
    })  # fmt: skip


def _scale(config: ModelConfig) -> float:
    """The factor of the attention scores: attention_scale, default 1 / sqrt(d_k)."""
    return config.attention_scale or config.head_dim**-0.5


def _query_scalar(config: ModelConfig) -> int:
    """Gemma's query_pre_attn_scalar n, the scores' factor being n^-1/2."""
    return round(_scale(config) ** -2)


def gemma_config_to_hf(config: ModelConfig, gemma3: bool = False) -> dict[str, Any]:
    """The Gemma 2 (or Gemma 3 text) config.json fields computing what `config` does."""
    full_rope = _rope_to_hf(config)
    if gemma3:
        rope: dict[str, Any] = {"rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": config.rope_base}
            | (full_rope["rope_scaling"] or {}),
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_base},
        }}  # fmt: skip
    else:
        rope = {"rope_theta": config.rope_base}
    layers = [config.slides(i) for i in range(config.n_layers)]
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "num_hidden_layers": config.n_layers, "intermediate_size": config.d_ff,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_len, **rope,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "hidden_activation": "gelu_pytorch_tanh" if config.feed_forward == "geglu_tanh" else "gelu",
        "query_pre_attn_scalar": _query_scalar(config),
        "attn_logit_softcapping": config.attention_softcap,
        "final_logit_softcapping": config.logit_softcap,
        "sliding_window": config.sliding_window or config.max_seq_len,
        "layer_types": ["sliding_attention" if slides else "full_attention" for slides in layers],
        "attention_bias": False, "attention_dropout": 0.0,
    }  # fmt: skip


def bert_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A BERT config.json (as a dict) -> the encoder ModelConfig computing the same function."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise QkvError(f"BERT hidden_act {hf['hidden_act']!r} is not supported (only gelu)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise QkvError(
            f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported"
        )
    return ModelConfig(
        arch="encoder",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"],
        n_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 512),
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_first=False,
        final_norm=False,
        feed_forward="gelu",
        type_vocab_size=hf.get("type_vocab_size", 2),
        embedding_norm=True,
    )


GPT2 = Family(
    model_type="gpt2",
    name="GPT-2",
    hf_class="GPT2LMHeadModel",
    config_from_hf=gpt2_config_from_hf,
    config_to_hf=gpt2_config_to_hf,
    misfits=gpt2_misfits,
    weight_map={
        "transformer.wte.weight": "embedder.token_embedding.weight",
        "transformer.wpe.weight": "embedder.position.weight",
        "transformer.h.{}.ln_1.weight": "blocks.{}.attention_norm.weight",
        "transformer.h.{}.ln_1.bias": "blocks.{}.attention_norm.bias",
        "transformer.h.{}.attn.c_proj.weight": "blocks.{}.self_attention.o_proj.weight",
        "transformer.h.{}.attn.c_proj.bias": "blocks.{}.self_attention.o_proj.bias",
        "transformer.h.{}.ln_2.weight": "blocks.{}.feed_forward_norm.weight",
        "transformer.h.{}.ln_2.bias": "blocks.{}.feed_forward_norm.bias",
        "transformer.h.{}.mlp.c_fc.weight": "blocks.{}.feed_forward.w1.weight",
        "transformer.h.{}.mlp.c_fc.bias": "blocks.{}.feed_forward.w1.bias",
        "transformer.h.{}.mlp.c_proj.weight": "blocks.{}.feed_forward.w2.weight",
        "transformer.h.{}.mlp.c_proj.bias": "blocks.{}.feed_forward.w2.bias",
        "transformer.ln_f.weight": "final_norm.weight",
        "transformer.ln_f.bias": "final_norm.bias",
        "lm_head.weight": "head.weight",
    },
    fused={
        "transformer.h.{}.attn.c_attn.weight": (
            "blocks.{}.self_attention.q_proj.weight",
            "blocks.{}.self_attention.k_proj.weight",
            "blocks.{}.self_attention.v_proj.weight",
        ),
        "transformer.h.{}.attn.c_attn.bias": (
            "blocks.{}.self_attention.q_proj.bias",
            "blocks.{}.self_attention.k_proj.bias",
            "blocks.{}.self_attention.v_proj.bias",
        ),
    },
    transposed=frozenset(
        {
            "transformer.h.{}.attn.c_attn.weight",
            "transformer.h.{}.attn.c_proj.weight",
            "transformer.h.{}.mlp.c_fc.weight",
            "transformer.h.{}.mlp.c_proj.weight",
        }
    ),
    base_prefix="transformer.",
)

LLAMA_TENSORS = {
    "model.embed_tokens.weight": "embedder.token_embedding.weight",
    "model.layers.{}.input_layernorm.weight": "blocks.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blocks.{}.self_attention.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blocks.{}.self_attention.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blocks.{}.self_attention.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blocks.{}.self_attention.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.feed_forward_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blocks.{}.feed_forward.gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blocks.{}.feed_forward.up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blocks.{}.feed_forward.down.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "head.weight",
}
QKV_BIASES = {
    f"model.layers.{{}}.self_attn.{p}_proj.bias": f"blocks.{{}}.self_attention.{p}_proj.bias"
    for p in "qkv"
}
QK_NORMS = {
    f"model.layers.{{}}.self_attn.{p}_norm.weight": f"blocks.{{}}.self_attention.{p}_norm.weight"
    for p in "qk"
}

LLAMA = Family(
    model_type="llama",
    name="Llama",
    hf_class="LlamaForCausalLM",
    config_from_hf=llama_config_from_hf,
    config_to_hf=llama_config_to_hf,
    misfits=llama_misfits,
    weight_map=LLAMA_TENSORS,
    base_prefix="model.",
)

# Mistral: Llama's design and names, with a sliding window (sliding_window, every layer).
MISTRAL = Family(
    model_type="mistral",
    name="Mistral",
    hf_class="MistralForCausalLM",
    config_from_hf=lambda hf: llama_config_from_hf(hf, "Mistral"),
    config_to_hf=mistral_config_to_hf,
    misfits=mistral_misfits,
    weight_map=LLAMA_TENSORS,
    base_prefix="model.",
)

# Qwen2 and Qwen2.5: Llama's design with biases on W_Q, W_K, W_V.
QWEN2 = Family(
    model_type="qwen2",
    name="Qwen2",
    hf_class="Qwen2ForCausalLM",
    config_from_hf=qwen2_config_from_hf,
    config_to_hf=sliding_config_to_hf,
    misfits=qwen2_misfits,
    weight_map=LLAMA_TENSORS | QKV_BIASES,
    base_prefix="model.",
)

# Qwen3: Llama's design with each head's q and k RMS-normalised (q_norm, k_norm) and its own
# head_dim (128 with hidden_size 1024 in Qwen3-0.6B).
QWEN3 = Family(
    model_type="qwen3",
    name="Qwen3",
    hf_class="Qwen3ForCausalLM",
    config_from_hf=lambda hf: llama_config_from_hf(hf, "Qwen3", qk_norm=True),
    config_to_hf=sliding_config_to_hf,
    misfits=qwen3_misfits,
    weight_map=LLAMA_TENSORS | QK_NORMS,
    base_prefix="model.",
)

# Phi-3 (mini, small, medium; 4k contexts): Llama's design, two fused projections.
PHI3 = Family(
    model_type="phi3",
    name="Phi-3",
    hf_class="Phi3ForCausalLM",
    config_from_hf=phi3_config_from_hf,
    weight_map={
        theirs: ours
        for theirs, ours in LLAMA_TENSORS.items()
        if not re.search(r"\.(q|k|v|gate|up)_proj\.", theirs)
    },
    fused={
        "model.layers.{}.self_attn.qkv_proj.weight": tuple(
            f"blocks.{{}}.self_attention.{p}_proj.weight" for p in "qkv"
        ),
        "model.layers.{}.mlp.gate_up_proj.weight": (
            "blocks.{}.feed_forward.gate.weight",
            "blocks.{}.feed_forward.up.weight",
        ),
    },
    base_prefix="model.",
)

# Gemma 2 and 3: Llama's names, but post_attention_layernorm norms the attention's output (before
# the residual add), and the feed-forward has its own norms before and after.
GEMMA_TENSORS = LLAMA_TENSORS | {
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.attention_post_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "blocks.{}.feed_forward_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "blocks.{}.feed_forward_post_norm.weight",
}

GEMMA2 = Family(
    model_type="gemma2",
    name="Gemma 2",
    hf_class="Gemma2ForCausalLM",
    config_from_hf=gemma_config_from_hf,
    config_to_hf=gemma_config_to_hf,
    misfits=lambda config: _gemma_misfits(config, gemma3=False),
    weight_map=GEMMA_TENSORS,
    base_prefix="model.",
)

# Gemma 3 text (gemma-3-1b and the text towers): Gemma 2's design with QK-norm, a local RoPE base
# for its sliding layers and five of them to each full one.
GEMMA3 = Family(
    model_type="gemma3_text",
    name="Gemma 3",
    hf_class="Gemma3ForCausalLM",
    config_from_hf=lambda hf: gemma_config_from_hf(hf, "Gemma 3", gemma3=True),
    config_to_hf=lambda config: gemma_config_to_hf(config, gemma3=True),
    misfits=lambda config: _gemma_misfits(config, gemma3=True),
    weight_map=GEMMA_TENSORS | QK_NORMS,
    base_prefix="model.",
)

BERT = Family(
    model_type="bert",
    name="BERT",
    hf_class="BertModel",
    config_from_hf=bert_config_from_hf,
    weight_map={
        "embeddings.word_embeddings.weight": "embedder.token_embedding.weight",
        "embeddings.position_embeddings.weight": "embedder.position.weight",
        "embeddings.token_type_embeddings.weight": "embedder.token_type.weight",
        "embeddings.LayerNorm.weight": "embedder.norm.weight",
        "embeddings.LayerNorm.bias": "embedder.norm.bias",
        "encoder.layer.{}.attention.self.query.weight": "blocks.{}.self_attention.q_proj.weight",
        "encoder.layer.{}.attention.self.query.bias": "blocks.{}.self_attention.q_proj.bias",
        "encoder.layer.{}.attention.self.key.weight": "blocks.{}.self_attention.k_proj.weight",
        "encoder.layer.{}.attention.self.key.bias": "blocks.{}.self_attention.k_proj.bias",
        "encoder.layer.{}.attention.self.value.weight": "blocks.{}.self_attention.v_proj.weight",
        "encoder.layer.{}.attention.self.value.bias": "blocks.{}.self_attention.v_proj.bias",
        "encoder.layer.{}.attention.output.dense.weight": "blocks.{}.self_attention.o_proj.weight",
        "encoder.layer.{}.attention.output.dense.bias": "blocks.{}.self_attention.o_proj.bias",
        "encoder.layer.{}.attention.output.LayerNorm.weight": "blocks.{}.attention_norm.weight",
        "encoder.layer.{}.attention.output.LayerNorm.bias": "blocks.{}.attention_norm.bias",
        "encoder.layer.{}.intermediate.dense.weight": "blocks.{}.feed_forward.w1.weight",
        "encoder.layer.{}.intermediate.dense.bias": "blocks.{}.feed_forward.w1.bias",
        "encoder.layer.{}.output.dense.weight": "blocks.{}.feed_forward.w2.weight",
        "encoder.layer.{}.output.dense.bias": "blocks.{}.feed_forward.w2.bias",
        "encoder.layer.{}.output.LayerNorm.weight": "blocks.{}.feed_forward_norm.weight",
        "encoder.layer.{}.output.LayerNorm.bias": "blocks.{}.feed_forward_norm.bias",
    },
    base_prefix="bert.",
)

FAMILIES = {
    family.model_type: family
    for family in (GPT2, LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA2, GEMMA3, BERT)
}


def _pairs(family: Family, n_layers: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(their name, our names, stored transposed) for every tensor the family names, "{}"
    filled in with each layer number 0 .. n_layers - 1."""
    pairs = []
    named = {theirs: (ours,) for theirs, ours in family.weight_map.items()} | dict(family.fused)
    for theirs, ours in named.items():
        for layer in range(n_layers) if "{}" in theirs else [0]:
            names = tuple(name.format(layer) for name in ours)
            pairs.append((theirs.format(layer), names, theirs in family.transposed))
    return pairs


def from_hf_tensors(
    family: Family, tensors: Mapping[str, Tensor], wanted: Mapping[str, Tensor], n_layers: int
) -> dict[str, Tensor]:
    """Their tensors -> the ones of ours named in `wanted` (ours, or meta tensors of their
    shapes; a tied head has no head.weight): renamed by the family's map, (in, out) ones
    transposed to (out, in), fused ones split along dim 0 into as many rows as each of ours."""
    theirs_by_key = {name.removeprefix(family.base_prefix): t for name, t in tensors.items()}
    out: dict[str, Tensor] = {}
    for theirs, ours, transposed in _pairs(family, n_layers):
        if ours[0] not in wanted:
            continue
        tensor = theirs_by_key.get(theirs.removeprefix(family.base_prefix))
        if tensor is None:
            raise QkvError(f"the {family.name} checkpoint has no tensor {theirs!r}")
        tensor = tensor.t() if transposed else tensor
        rows = [wanted[name].shape[0] for name in ours]
        if len(ours) > 1 and sum(rows) != tensor.shape[0]:  # one of ours: files.check_fit's
            raise QkvError(
                f"the {family.name} checkpoint's {theirs!r} has shape {list(tensor.shape)} but "
                f"config.json needs {sum(rows)} rows: the files do not belong together"
            )
        out.update(zip(ours, tensor.split(rows, dim=0) if len(ours) > 1 else [tensor], strict=True))
    return {name: tensor.contiguous() for name, tensor in out.items()}


def to_hf_tensors(family: Family, ours: Mapping[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """Our tensors -> theirs: renamed by the family's map, fused ones concatenated along dim 0,
    (out, in) ones transposed to the (in, out) the family stores."""
    out: dict[str, Tensor] = {}
    covered: set[str] = set()
    for theirs, names, transposed in _pairs(family, n_layers):
        if names[0] not in ours:  # e.g. head.weight of a tied model
            continue
        tensor = ours[names[0]] if len(names) == 1 else torch.cat([ours[n] for n in names])
        out[theirs] = (tensor.t() if transposed else tensor).contiguous()
        covered.update(names)
    if left := sorted(set(ours) - covered):
        raise QkvError(f"{family.name} has no tensor for qkv's {left[:5]}; export cannot write it")
    return out


def from_gpt2(model: torch.nn.Module) -> DecoderLM:
    """A transformers GPT2LMHeadModel -> a qkv DecoderLM with the same weights (eval mode)."""
    config = GPT2.config_from_hf(model.config.to_dict())
    ours = DecoderLM(config)
    wanted = ours.state_dict()
    ours.load_state_dict(from_hf_tensors(GPT2, model.state_dict(), wanted, config.n_layers))
    return ours.eval()


def is_hf_directory(folder: Path) -> bool:
    """A Hugging Face model directory: its config.json names a model_type (a config.json that
    cannot be read, through text.read_model_json, is an error)."""
    has_config = model_file(folder, "config.json") is not None
    return has_config and "model_type" in read_model_json(folder, "config.json")


def read_hf_config(folder: Path) -> dict[str, Any]:
    """A directory's config.json, its model_type one of FAMILIES, each field qkv reads of the
    type and range config.check_hf_config says."""
    config = read_model_json(folder, "config.json")
    check_hf_config(config, str(folder / "config.json"))
    if config.get("model_type") not in FAMILIES:
        model_type = config.get("model_type")
        raise QkvError(
            f"{folder}: model_type {model_type!r} is not supported; qkv imports "
            f"{', '.join(FAMILIES)}"
        )
    return config


def weight_files(folder: Path) -> list[Path]:
    """A directory's weight files: model.safetensors, the shards its index lists, or
    pytorch_model.bin."""
    index = "model.safetensors.index.json"
    if model_file(folder, index) is not None:
        shards = read_model_json(folder, index).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(s, str) for s in shards.values()):
            raise QkvError(f"{folder / index} has no weight_map of tensor names to file names")
        return [
            model_file(folder, shard) or folder / shard for shard in sorted(set(shards.values()))
        ]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if model_file(folder, name) is not None:
            return [folder / name]
    raise QkvError(
        f"{folder} has no weights: looked for model.safetensors, model.safetensors.index.json "
        "and pytorch_model.bin"
    )


def read_hf_weights(folder: Path, shapes_only: bool = False) -> dict[str, Tensor]:
    """Every tensor of a model directory's weight files; with `shapes_only`, safetensors files
    give meta tensors of the shapes their headers list (nothing is read but the headers)."""
    tensors: dict[str, Tensor] = {}
    for path in weight_files(folder):
        if path.suffix == ".bin":
            tensors.update(files.read_pickled_tensors(path))
        elif shapes_only:
            header = files.read_safetensors_header(path)
            tensors.update({n: torch.empty(t.shape, device="meta") for n, t in header.items()})
        else:
            tensors.update(files.read_safetensors(path))
    return tensors


def count_layers(family: Family, names: Collection[str]) -> int:
    """How many layers the tensors `names` hold: the distinct numbers in the place of "{}" in
    the family's per-layer names."""
    template = next(name for name in family.weight_map if "{}" in name)
    pattern = re.compile(
        re.escape(template.removeprefix(family.base_prefix)).replace(r"\{\}", r"(\d+)")
    )
    found = (pattern.fullmatch(name.removeprefix(family.base_prefix)) for name in names)
    return len({match[1] for match in found if match})


def _special(config: dict[str, Any], extra: dict[str, Any], backend: tokenizers.Tokenizer,
             id_field: str, names: tuple[str, ...]) -> str | None:  # fmt: skip
    """A special token by config.json's id field, else by tokenizer_config.json's names."""
    token_id = config.get(id_field)
    token_id = (token_id or [None])[0] if isinstance(token_id, list) else token_id
    if token_id is not None and backend.id_to_token(token_id) is not None:
        return backend.id_to_token(token_id)
    for name in names:
        token = extra.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and backend.token_to_id(token) is not None:
            return token
    return None


def _wordpiece(folder: Path, lowercase: bool) -> tokenizers.Tokenizer:
    """BERT's vocab.txt as a WordPiece tokenizer, [CLS] text [SEP] around every input."""
    lines = read_model_text(folder, "vocab.txt").split("\n")  # as WordPiece.from_file reads it
    vocab = {line.rstrip(): i for i, line in enumerate(lines[:-1] if lines[-1] == "" else lines)}
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise QkvError(f"{folder}/vocab.txt has no [CLS] or [SEP] token")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    return backend


def load_hf_tokenizer(folder: Path, config: dict[str, Any]) -> Tokenizer:
    """The directory's tokenizer.json (or BERT's vocab.txt, lower-cased unless
    tokenizer_config.json says otherwise); its end-of-text token is config.json's eos_token_id
    (or the tokenizer config's eos / sep token)."""
    extra = read_model_json(folder, "tokenizer_config.json", missing_ok=True)
    check_fields(extra, {"do_lower_case": FLAG}, f"{folder / 'tokenizer_config.json'}: ")
    if model_file(folder, "tokenizer.json") is not None:
        backend = Tokenizer.read_backend(folder, "tokenizer.json")
    elif model_file(folder, "vocab.txt") is not None:
        backend = _wordpiece(folder, extra.get("do_lower_case", True))
    else:
        raise QkvError(f"{folder} has no tokenizer.json or vocab.txt")
    end_of_text = _special(config, extra, backend, "eos_token_id", ("eos_token", "sep_token"))
    if end_of_text is None:
        raise QkvError(f"{folder}: neither config.json nor tokenizer_config.json names an "
                       "end-of-text token (eos_token_id) the tokenizer knows")  # fmt: skip
    pad = _special(config, extra, backend, "pad_token_id", ("pad_token",))
    tokenizer = Tokenizer(backend, end_of_text, pad)
    tokenizer.chat_template = _chat_template(folder, extra)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = extra.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            tokenizer.template_tokens[name] = token
    tokenizer.extra_stop_ids = _stop_ids(folder, config, backend)
    return tokenizer


def _chat_template(folder: Path, extra: dict[str, Any]) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's
    chat_template (a string, or a list of named ones: "default")."""
    if model_file(folder, "chat_template.jinja") is not None:
        return read_model_text(folder, "chat_template.jinja")
    template = extra.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _stop_ids(
    folder: Path, config: dict[str, Any], backend: tokenizers.Tokenizer
) -> tuple[int, ...]:
    """Every eos_token_id of generation_config.json and config.json (each an id or a list, of
    ids from 0 to config.json's vocab_size - 1; those the tokenizer lacks are skipped)."""
    generation = read_model_json(folder, "generation_config.json", missing_ok=True)
    check_token_ids(
        generation, config.get("vocab_size", MAX_SIZE), f"{folder / 'generation_config.json'}: "
    )
    ids: list[int] = []
    for source in (generation, config):
        value = source.get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and backend.id_to_token(token_id) is not None:
                ids.append(token_id)
    return tuple(dict.fromkeys(ids))


def load_hf_directory(
    folder: Path, dtype: torch.dtype = torch.float32
) -> tuple[DecoderLM | Encoder, Tokenizer]:
    """(qkv model in eval mode, its weights in `dtype`, tokenizer) from a Hugging Face model
    directory; each tensor is read and converted once, into the model itself."""
    hf = read_hf_config(folder)
    family = FAMILIES[hf["model_type"]]
    try:
        config = family.config_from_hf(hf)
    except KeyError as err:
        raise QkvError(f"{folder}/config.json lacks the field {err}") from None
    except QkvError as err:
        raise QkvError(f"{folder}/config.json: {err}") from None
    stored = read_hf_weights(folder, shapes_only=True)
    layers = count_layers(family, stored)
    if layers != config.n_layers:
        raise QkvError(
            f"{folder}/config.json asks for {config.n_layers} layers but the weights hold "
            f"{layers}: the files do not belong together"
        )
    with torch.device("meta"):
        expected = build_model(config.replace(init_std=None)).state_dict()
    wanted = from_hf_tensors(family, stored, expected, config.n_layers)
    files.check_fit(wanted, expected, f"{folder}:", "config.json")
    check_model_fits(config, str(folder), fix=MORE_MEMORY)
    if any(t.is_meta for t in stored.values()):
        stored = read_hf_weights(folder)
    tensors = from_hf_tensors(family, stored, expected, config.n_layers)
    del stored
    for name, tensor in tensors.items():  # one at a time: the stored one is freed as it goes
        tensors[name] = tensor.to(dtype).contiguous()
    return model_from_tensors(config, tensors).eval(), load_hf_tokenizer(folder, hf)


def hf_family(config: ModelConfig) -> str:
    """The model_type of the first family in FAMILIES that exports `config` (computes the same
    function); a QkvError names, family by family, what fits none."""
    misfits = {}
    for family in FAMILIES.values():
        if family.misfits is None:
            continue
        wrong = family.misfits(config)
        if not wrong:
            return family.model_type
        misfits[family.name] = wrong
    raise QkvError(
        "this model fits no Hugging Face family qkv exports: "
        + "; ".join(f"as {name} it has {', '.join(wrong)}" for name, wrong in misfits.items())
    )


def to_hf(model: DecoderLM, tokenizer: Tokenizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json dict, tensors) of the transformers model computing what `model` does."""
    config = model.config
    family = FAMILIES[hf_family(config)]
    ours = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    hf = {
        "model_type": family.model_type,
        "architectures": [family.hf_class],
        **family.config_to_hf(config),
        "eos_token_id": tokenizer.end_of_text_id,
        "bos_token_id": tokenizer.end_of_text_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
    }
    return hf, to_hf_tensors(family, ours, config.n_layers)


def save_hf_directory(model: DecoderLM, tokenizer: Tokenizer, folder: Path) -> Family:
    """Write `model` as a Hugging Face directory (config.json, model.safetensors,
    tokenizer.json) atomically; returns the family written (`.hf_class`: the transformers class
    that loads it)."""
    config, tensors = to_hf(model, tokenizer)
    with files.atomic_directory(folder, "Hugging Face directory") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
    return FAMILIES[config["model_type"]]
