"""Hugging Face interop: their model directories, configs and tensors as qkv's, by name.

GPT-2: learned positions, pre-norm LayerNorm, tanh GELU, biases, head tied to the token embedding.
Its Conv1D layers store weights as (in, out), the transpose of nn.Linear's (out, in), and c_attn
packs W_Q, W_K, W_V side by side.
Llama (also TinyLlama, SmolLM, ...): RoPE (rope_theta, "rotate half" pairs), pre-norm RMSNorm,
SwiGLU, grouped-query attention, no biases, tied or untied head; nn.Linear layouts throughout.
BERT (encoders such as all-MiniLM-L6-v2): post-norm LayerNorm, exact GELU, learned absolute
positions, token-type embeddings and a LayerNorm over the summed embeddings; the pooler is unused.
A directory holds config.json (with "model_type"), model.safetensors (or shards listed in
model.safetensors.index.json, or pytorch_model.bin read with torch.load(weights_only=True), which
refuses pickled objects other than tensors) and tokenizer.json.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.model import DecoderLM, Encoder, build_model
from qkv.tokenizer import Tokenizer


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
    config = gpt2_config(model.config.to_dict())
    ours = DecoderLM(config)
    ours.load_state_dict(gpt2_state_dict(model.state_dict(), config))
    return ours.eval()


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    """A Llama-family config.json (as a dict) -> the ModelConfig computing the same function."""
    if hf.get("hidden_act", "silu") != "silu":
        raise QkvError(f"Llama hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; earlier versions
    # rope_theta and rope_scaling (null, or {rope_type, factor, ...}).
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise QkvError(f"Llama RoPE scaling {rope} is not supported (only plain RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise QkvError("Llama attention_bias / mlp_bias is not supported (only no biases)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise QkvError(
            f"Llama head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}: "
            "not supported"
        )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        n_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        position="rope",
        rope_base=float(theta),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        feed_forward="swiglu",
        bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def llama_state_dict(hf: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """LlamaForCausalLM tensors -> DecoderLM tensors (the same layouts, other names)."""

    def take(name: str) -> Tensor:
        if name not in hf:
            raise QkvError(f"the Llama checkpoint has no tensor {name!r}")
        return hf[name]

    out = {
        "embedder.token_embedding.weight": take("model.embed_tokens.weight"),
        "final_norm.weight": take("model.norm.weight"),
    }
    if not config.tie_embeddings:
        out["head.weight"] = take("lm_head.weight")
    for i in range(config.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        names = {
            "input_layernorm": "attention_norm",
            "post_attention_layernorm": "feed_forward_norm",
            **{f"self_attn.{n}": f"self_attention.{n}" for n in ("q_proj", "k_proj", "v_proj",
                                                                  "o_proj")},
            "mlp.gate_proj": "feed_forward.gate",
            "mlp.up_proj": "feed_forward.up",
            "mlp.down_proj": "feed_forward.down",
        }  # fmt: skip
        for theirs, ours in names.items():
            out[f"{dst}{ours}.weight"] = take(f"{src}{theirs}.weight")
    return out


def bert_config(hf: dict[str, Any]) -> ModelConfig:
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


def bert_state_dict(hf: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """BertModel (or BertFor*'s "bert." part) tensors -> Encoder tensors."""
    hf = {name.removeprefix("bert."): tensor for name, tensor in hf.items()}

    def take(name: str) -> Tensor:
        if name not in hf:
            raise QkvError(f"the BERT checkpoint has no tensor {name!r}")
        return hf[name]

    out = {
        "embedder.token_embedding.weight": take("embeddings.word_embeddings.weight"),
        "embedder.position.weight": take("embeddings.position_embeddings.weight"),
        "embedder.token_type.weight": take("embeddings.token_type_embeddings.weight"),
        "embedder.norm.weight": take("embeddings.LayerNorm.weight"),
        "embedder.norm.bias": take("embeddings.LayerNorm.bias"),
    }
    for i in range(config.n_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        names = {
            "attention.self.query": "self_attention.q_proj",
            "attention.self.key": "self_attention.k_proj",
            "attention.self.value": "self_attention.v_proj",
            "attention.output.dense": "self_attention.o_proj",
            "attention.output.LayerNorm": "attention_norm",
            "intermediate.dense": "feed_forward.w1",
            "output.dense": "feed_forward.w2",
            "output.LayerNorm": "feed_forward_norm",
        }
        for theirs, ours in names.items():
            for part in ("weight", "bias"):
                out[f"{dst}{ours}.{part}"] = take(f"{src}{theirs}.{part}")
    return out


FAMILIES = {
    "gpt2": (gpt2_config, gpt2_state_dict),
    "llama": (llama_config, llama_state_dict),
    "bert": (bert_config, bert_state_dict),
}


def is_hf_directory(folder: Path) -> bool:
    """A Hugging Face model directory: its config.json names a model_type."""
    try:
        return "model_type" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def read_hf_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QkvError(f"{folder}/config.json is unreadable ({err})") from None
    if config.get("model_type") not in FAMILIES:
        raise QkvError(
            f"{folder}: model_type {config.get('model_type')!r} is not supported; qkv imports "
            f"{', '.join(FAMILIES)}"
        )
    return config


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a model directory: model.safetensors, its shards, or pytorch_model.bin."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise QkvError(f"{index} is unreadable ({err})") from None
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(_read_safetensors(folder / shard))
        return tensors
    if (folder / "model.safetensors").is_file():
        return _read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _read_pickled_tensors(folder / "pytorch_model.bin")
    raise QkvError(
        f"{folder} has no weights: looked for model.safetensors, model.safetensors.index.json "
        "and pytorch_model.bin"
    )


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise QkvError(f"weight file {path} is missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise QkvError(f"weight file {path} is corrupt or unreadable ({err})") from None


def _read_pickled_tensors(path: Path) -> dict[str, Tensor]:
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary code."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unknown object"
        raise QkvError(
            f"{path} holds pickled objects other than tensors, which could run code when "
            f"loaded; refusing it ({first}). Convert it to safetensors where you trust it"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise QkvError(f"weight file {path} is corrupt or unreadable ({err})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise QkvError(f"{path} does not hold a dictionary of tensors")
    return tensors


def _special(folder: Path, config: dict[str, Any], backend: tokenizers.Tokenizer,
             id_field: str, names: tuple[str, ...]) -> str | None:  # fmt: skip
    """A special token by config.json's id field, else by tokenizer_config.json's names."""
    token_id = config.get(id_field)
    token_id = token_id[0] if isinstance(token_id, list) else token_id
    if token_id is not None and backend.id_to_token(token_id) is not None:
        return backend.id_to_token(token_id)
    try:
        extra = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        extra = {}
    for name in names:
        token = extra.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and backend.token_to_id(token) is not None:
            return token
    return None


def _wordpiece(folder: Path) -> tokenizers.Tokenizer:
    """BERT's vocab.txt as a WordPiece tokenizer: lower-cased unless tokenizer_config.json
    says otherwise, [CLS] text [SEP] around every input."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    try:
        extra = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        extra = {}
    backend = tokenizers.Tokenizer(
        models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]")
    )
    backend.normalizer = normalizers.BertNormalizer(lowercase=extra.get("do_lower_case", True))
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
    """The directory's tokenizer.json (or BERT's vocab.txt); its end-of-text token is
    config.json's eos_token_id (or the tokenizer config's eos / sep token)."""
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:
            raise QkvError(f"{path} is not a valid tokenizer.json ({err})") from None
    elif (folder / "vocab.txt").is_file():
        backend = _wordpiece(folder)
    else:
        raise QkvError(f"{folder} has no tokenizer.json or vocab.txt")
    end_of_text = _special(folder, config, backend, "eos_token_id", ("eos_token", "sep_token"))
    if end_of_text is None:
        raise QkvError(f"{folder}: neither config.json nor tokenizer_config.json names an "
                       "end-of-text token (eos_token_id) the tokenizer knows")  # fmt: skip
    pad = _special(folder, config, backend, "pad_token_id", ("pad_token",))
    return Tokenizer(backend, end_of_text, pad)


def load_hf_directory(folder: Path) -> tuple[DecoderLM | Encoder, Tokenizer]:
    """(qkv model in eval mode, tokenizer) from a Hugging Face model directory."""
    hf = read_hf_config(folder)
    make_config, convert = FAMILIES[hf["model_type"]]
    try:
        config = make_config(hf)
    except KeyError as err:
        raise QkvError(f"{folder}/config.json lacks the field {err}") from None
    model = build_model(config)
    tensors = convert(read_hf_weights(folder), config)
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise QkvError(
                f"{folder}: tensor for {name} has shape {list(tensor.shape)} but config.json "
                f"needs {list(expected[name].shape)}"
            )
    model.load_state_dict({k: v.float().contiguous() for k, v in tensors.items()})
    return model.eval(), load_hf_tokenizer(folder, hf)
