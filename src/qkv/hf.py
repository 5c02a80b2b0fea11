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
    hf = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
          for k, v in hf.items()}  # fmt: skip

    def take(name: str) -> Tensor:
        if name not in hf:
            raise QkvError(f"the GPT-2 checkpoint has no tensor {name!r}")
        return hf[name]

    out = {}
    for theirs, (ours, transposed) in gpt2_names(config).items():
        out[ours] = take(theirs).t() if transposed else take(theirs)
    for i in range(config.n_layers):
        src, dst = f"transformer.h.{i}.attn.c_attn.", f"blocks.{i}.self_attention."
        weights = take(f"{src}weight").t().chunk(3, dim=0)
        biases = take(f"{src}bias").chunk(3, dim=0)
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
            out[f"{dst}{name}.weight"], out[f"{dst}{name}.bias"] = weight, bias
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
    for field_name in ("rope_parameters", "rope_scaling"):
        rope = hf.get(field_name) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise QkvError(f"Llama {field_name} {rope} is not supported (only plain RoPE)")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
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


LLAMA_LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "feed_forward_norm",
    "self_attn.q_proj": "self_attention.q_proj",
    "self_attn.k_proj": "self_attention.k_proj",
    "self_attn.v_proj": "self_attention.v_proj",
    "self_attn.o_proj": "self_attention.o_proj",
    "mlp.gate_proj": "feed_forward.gate",
    "mlp.up_proj": "feed_forward.up",
    "mlp.down_proj": "feed_forward.down",
}


def llama_state_dict(hf: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """LlamaForCausalLM tensors -> DecoderLM tensors (the same layouts, other names)."""
    out = {}
    for theirs, ours in llama_names(config).items():
        if theirs not in hf:
            raise QkvError(f"the Llama checkpoint has no tensor {theirs!r}")
        out[ours] = hf[theirs]
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


def _special(config: dict[str, Any], extra: dict[str, Any], backend: tokenizers.Tokenizer,
             id_field: str, names: tuple[str, ...]) -> str | None:  # fmt: skip
    """A special token by config.json's id field, else by tokenizer_config.json's names."""
    token_id = config.get(id_field)
    token_id = token_id[0] if isinstance(token_id, list) else token_id
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
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    backend = tokenizers.Tokenizer(
        models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]")
    )
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
    try:
        extra = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        extra = {}
    extra = extra if isinstance(extra, dict) else {}
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:
            raise QkvError(f"{path} is not a valid tokenizer.json ({err})") from None
    elif (folder / "vocab.txt").is_file():
        backend = _wordpiece(folder, extra.get("do_lower_case", True))
    else:
        raise QkvError(f"{folder} has no tokenizer.json or vocab.txt")
    end_of_text = _special(config, extra, backend, "eos_token_id", ("eos_token", "sep_token"))
    if end_of_text is None:
        raise QkvError(f"{folder}: neither config.json nor tokenizer_config.json names an "
                       "end-of-text token (eos_token_id) the tokenizer knows")  # fmt: skip
    pad = _special(config, extra, backend, "pad_token_id", ("pad_token",))
    return Tokenizer(backend, end_of_text, pad)


def load_hf_directory(folder: Path) -> tuple[DecoderLM | Encoder, Tokenizer]:
    """(qkv model in eval mode, tokenizer) from a Hugging Face model directory."""
    hf = read_hf_config(folder)
    make_config, convert = FAMILIES[hf["model_type"]]
    try:
        config = make_config(hf)
    except KeyError as err:
        raise QkvError(f"{folder}/config.json lacks the field {err}") from None
    from qkv.checkpoint import check_fit

    model = build_model(config)
    tensors = convert(read_hf_weights(folder), config)
    check_fit(tensors, model.state_dict(), f"{folder}:", "config.json")
    model.load_state_dict({k: v.float().contiguous() for k, v in tensors.items()})
    return model.eval(), load_hf_tokenizer(folder, hf)


def hf_family(config: ModelConfig) -> str:
    """Which Hugging Face family computes the same function as `config`: "gpt2" or "llama";
    a QkvError names what fits neither."""
    common = {
        "arch": ("decoder", config.arch == "decoder"),
        "norm_first": (True, config.norm_first),
        "final_norm": (True, bool(config.final_norm)),
        "scale_embeddings": (False, not config.scale_embeddings),
        "type_vocab_size": (0, config.type_vocab_size == 0),
        "embedding_norm": (False, not config.embedding_norm),
    }
    gpt2 = {
        "position": ("learned", config.position == "learned"),
        "norm": ("layernorm", config.norm == "layernorm"),
        "feed_forward": ("gelu or gelu_tanh", config.feed_forward in ("gelu", "gelu_tanh")),
        "bias": (True, config.bias),
        "n_kv_heads": ("n_heads", config.n_kv_heads == config.n_heads),
    }
    llama = {
        "position": ("rope", config.position == "rope"),
        "norm": ("rmsnorm", config.norm == "rmsnorm"),
        "feed_forward": ("swiglu", config.feed_forward == "swiglu"),
        "bias": (False, not config.bias),
    }
    misfits = {}
    for family, needs in (("gpt2", gpt2), ("llama", llama)):
        wrong = [f"{k}={getattr(config, k)!r} (needs {v})" for k, (v, ok) in
                 {**common, **needs}.items() if not ok]  # fmt: skip
        if not wrong:
            return family
        misfits[family] = wrong
    raise QkvError(
        "this model fits no Hugging Face family qkv exports: as GPT-2 it has "
        f"{', '.join(misfits['gpt2'])}; as Llama it has {', '.join(misfits['llama'])}"
    )


def to_hf(model: DecoderLM, tokenizer: Tokenizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json dict, tensors) of the transformers model computing what `model` does."""
    config = model.config
    family = hf_family(config)
    ours = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    specials = {"eos_token_id": tokenizer.end_of_text_id, "bos_token_id": tokenizer.end_of_text_id,
                "pad_token_id": tokenizer.pad_id}  # fmt: skip
    tensors: dict[str, Tensor] = {}
    if family == "gpt2":
        hf = {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": config.vocab_size, "n_embd": config.d_model, "n_head": config.n_heads,
            "n_layer": config.n_layers, "n_inner": config.d_ff, "n_positions": config.max_seq_len,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": "gelu_new" if config.feed_forward == "gelu_tanh" else "gelu",
            "tie_word_embeddings": config.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }  # fmt: skip
        reverse = {ours: (theirs, t) for theirs, (ours, t) in gpt2_names(config).items()}
        for name, tensor in ours.items():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                              "q_proj.bias", "k_proj.bias", "v_proj.bias")):  # fmt: skip
                continue
            theirs, transpose = reverse[name]
            tensors[theirs] = tensor.t() if transpose else tensor
        for i in range(config.n_layers):
            attention = f"blocks.{i}.self_attention."
            w = [ours[f"{attention}{p}_proj.weight"] for p in "qkv"]
            b = [ours[f"{attention}{p}_proj.bias"] for p in "qkv"]
            tensors[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(w).t()
            tensors[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(b)
    else:
        hf = {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": config.vocab_size, "hidden_size": config.d_model,
            "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
            "num_hidden_layers": config.n_layers, "intermediate_size": config.d_ff,
            "max_position_embeddings": config.max_seq_len, "rope_theta": config.rope_base,
            "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
            "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
            "mlp_bias": False,
        }  # fmt: skip
        names = {ours: theirs for theirs, ours in llama_names(config).items()}
        tensors = {names[name]: tensor for name, tensor in ours.items()}
    hf.update(specials, torch_dtype="float32")
    return hf, {name: tensor.contiguous() for name, tensor in tensors.items()}


def gpt2_names(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """GPT-2 tensor name -> (qkv name, stored transposed), for all but c_attn."""
    names = {
        "transformer.wte.weight": ("embedder.token_embedding.weight", False),
        "transformer.wpe.weight": ("embedder.position.weight", False),
        "transformer.ln_f.weight": ("final_norm.weight", False),
        "transformer.ln_f.bias": ("final_norm.bias", False),
    }
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("head.weight", False)
    for i in range(config.n_layers):
        src, dst = f"transformer.h.{i}.", f"blocks.{i}."
        for theirs, ours, transposed in [
            ("ln_1", "attention_norm", False), ("ln_2", "feed_forward_norm", False),
            ("attn.c_proj", "self_attention.o_proj", True), ("mlp.c_fc", "feed_forward.w1", True),
            ("mlp.c_proj", "feed_forward.w2", True),
        ]:  # fmt: skip
            names[f"{src}{theirs}.weight"] = (f"{dst}{ours}.weight", transposed)
            names[f"{src}{theirs}.bias"] = (f"{dst}{ours}.bias", False)
    return names


def llama_names(config: ModelConfig) -> dict[str, str]:
    """Llama tensor name -> qkv name."""
    names = {"model.embed_tokens.weight": "embedder.token_embedding.weight",
             "model.norm.weight": "final_norm.weight"}  # fmt: skip
    if not config.tie_embeddings:
        names["lm_head.weight"] = "head.weight"
    for i in range(config.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        for theirs, ours in LLAMA_LAYER_NAMES.items():
            names[f"{src}{theirs}.weight"] = f"{dst}{ours}.weight"
    return names


def save_hf_directory(model: DecoderLM, tokenizer: Tokenizer, folder: Path) -> Path:
    """Write `model` as a Hugging Face directory (config.json, model.safetensors,
    tokenizer.json) atomically: temp dir + rename."""
    import os
    import shutil

    from safetensors.torch import save_file

    config, tensors = to_hf(model, tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(tmp / "tokenizer.json")
    os.replace(tmp, folder)
    return folder
