"""The two configurations: ModelConfig describes every model qkv builds (its presets and JSON
form); TrainConfig everything a training run needs besides the model.

Field names follow the notes: d_model, n_heads, n_layers, d_ff, n_kv_heads, vocab_size,
max_seq_len, dropout. A config is frozen and validated on construction, so an invalid one never
exists; each error names the field and the fix. Change one with `replace(...)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkv.errors import ConfigError, QkvError
from qkv.text import read_text_file

ARCHS = ("decoder", "encoder", "encoder-decoder")
POSITIONS = ("sinusoidal", "learned", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
FEED_FORWARDS = ("relu", "relu2", "gelu", "gelu_tanh", "swiglu", "geglu", "geglu_tanh")
KERNELS = ("fused", "explicit")
TOKENIZERS = ("bpe", "char")
STRATEGIES = ("ddp", "fsdp")  # under torchrun: copy the model to every process, or shard it
DTYPES = ("auto", "float32", "bfloat16")
OPTIMIZERS = ("adamw", "muon")  # muon: Muon for the blocks' matrices, AdamW for the rest
SCHEDULES = ("cosine", "wsd")  # after warmup: cosine decay, or warmup-stable-decay
MAX_WINDOWS_PER_STEP = 2**24  # sequences in an accumulated step (batch_size x grad_accum)
ROPE_SCALINGS = ("llama3", "linear")  # Llama 3.1+'s per-frequency scaling; positions / factor
MAX_SIZE = 1 << 26  # the most of any size (vocab_size, d_model, max_seq_len, n_heads x head_dim)
SIZES = ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "n_kv_heads", "head_dim",
         "max_seq_len", "rope_original_context")  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Shape and choices of a Transformer; `d_ff` and `n_kv_heads` default from the others."""

    arch: str = "decoder"
    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int | None = None
    n_kv_heads: int | None = None
    max_seq_len: int = 256
    dropout: float = 0.0
    position: str = "learned"
    rope_base: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_first: bool = True
    final_norm: bool | None = None
    feed_forward: str = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    scale_embeddings: bool = False
    type_vocab_size: int = 0  # BERT's segment (token type) embeddings; 0 = none
    embedding_norm: bool = False  # BERT: a norm over the summed embeddings
    kernels: str = "fused"
    init_std: float | None = 0.02
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before the scores
    head_dim: int | None = None  # d_k; default d_model / n_heads (Qwen3 and Gemma set their own)
    qkv_bias: bool | None = None  # biases on W_Q, W_K, W_V; default `bias` (Qwen2: only these)
    sliding_window: int | None = None  # a query sees its last `sliding_window` keys only
    sliding_layers: tuple[int, ...] | None = None  # the layers that slide; default all of them
    rope_scaling: str | None = None  # llama3 | linear: stretch RoPE past its trained context
    rope_factor: float = 1.0  # how many times the trained context
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above context / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below context / this are kept
    rope_original_context: int = 8192  # llama3: the context the model was first trained for
    rope_local_base: float | None = None  # sliding layers' own RoPE base, unscaled (Gemma 3)
    logit_softcap: float | None = None  # logits = c tanh(logits / c)
    attention_softcap: float | None = None  # scores = c tanh(scores / c) (Gemma 2)
    attention_scale: float | None = None  # scores = Q K^T * this; None: 1 / sqrt(d_k)
    norm_unit_offset: bool = False  # norms scale by (1 + gamma), gamma starting at 0 (Gemma)
    post_norms: bool = False  # x + Norm(Sublayer(Norm(x))): sublayer outputs normed too (Gemma)
    zero_init: bool = False  # output projections (and an untied head) start at zero

    def __post_init__(self) -> None:
        if isinstance(self.sliding_layers, list):  # as read from JSON
            object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))
        for derived, value in self._derived().items():
            if getattr(self, derived) is None:
                object.__setattr__(self, derived, value)
        self.validate()

    def _derived(self) -> dict[str, Any]:
        """Defaults computed from other fields: d_ff = 4 d_model, n_kv_heads = n_heads, final
        norm when pre-norm, d_k = d_model / n_heads, Q/K/V biases as the others."""
        ints = isinstance(self.d_model, int) and isinstance(self.n_heads, int) and self.n_heads
        return {
            "d_ff": 4 * self.d_model if isinstance(self.d_model, int) else None,
            "n_kv_heads": self.n_heads,
            "final_norm": self.norm_first,
            "head_dim": self.d_model // self.n_heads if ints else None,
            "qkv_bias": self.bias,
        }

    def slides(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window (the last sliding_window keys)."""
        if self.sliding_window is None:
            return False
        return self.sliding_layers is None or layer in self.sliding_layers

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and how to fix it."""
        _check_type(self)
        for name in SIZES:
            value = getattr(self, name)
            _require(
                1 <= value <= MAX_SIZE,
                name,
                f"must be at least 1 and at most {MAX_SIZE:,}, got {value}",
            )
        _require(
            self.n_heads * self.head_dim <= MAX_SIZE,
            "head_dim",
            f"n_heads x head_dim must be at most {MAX_SIZE:,}, got {self.n_heads * self.head_dim}",
        )
        _choice(self, "arch", ARCHS)
        _choice(self, "position", POSITIONS)
        _choice(self, "norm", NORMS)
        _choice(self, "feed_forward", FEED_FORWARDS)
        _choice(self, "kernels", KERNELS)
        if self.d_model % self.n_heads and self.head_dim == self.d_model // self.n_heads:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            _require(
                False,
                "n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads from {divisors[:12]} or change d_model",
            )
        if self.n_heads % self.n_kv_heads:
            _require(
                False,
                "n_kv_heads",
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "each key/value head must serve a whole group of query heads",
            )
        _require(
            0 <= self.type_vocab_size <= MAX_SIZE,
            "type_vocab_size",
            f"must be 0 (none) to {MAX_SIZE:,}, got {self.type_vocab_size}",
        )
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(
            1 < self.rope_base < math.inf,
            "rope_base",
            f"must be greater than 1 and finite, got {self.rope_base}",
        )
        if self.position == "rope" and self.head_dim % 2:
            _require(
                False,
                "position",
                f"rope rotates pairs of dimensions, so d_model/n_heads must be even "
                f"(got {self.head_dim}); change d_model or n_heads",
            )
        if self.sliding_window is not None:
            _require(
                self.sliding_window >= 1,
                "sliding_window",
                f"must be at least 1, or null, got {self.sliding_window}",
            )
        _require(
            self.sliding_layers is None or isinstance(self.sliding_layers, tuple),
            "sliding_layers",
            f"must be a list of layer numbers, or null, got {self.sliding_layers!r}",
        )
        for layer in self.sliding_layers or ():
            _require(
                isinstance(layer, int) and 0 <= layer < self.n_layers,
                "sliding_layers",
                f"{layer!r} is not a layer (0..{self.n_layers - 1})",
            )
        if self.rope_scaling is not None:
            _choice(self, "rope_scaling", ROPE_SCALINGS)
            _require(
                1 <= self.rope_factor < math.inf,
                "rope_factor",
                f"must be >= 1 and finite, got {self.rope_factor}",
            )
            _require(
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor < math.inf,
                "rope_low_freq_factor",
                "must be positive and below rope_high_freq_factor, got "
                f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}",
            )
        positive = ("norm_eps", "logit_softcap", "attention_softcap", "attention_scale")
        for name in (*positive, "rope_local_base"):
            value = getattr(self, name)
            _require(
                value is None or 0 < value < math.inf,
                name,
                f"must be positive and finite, or null, got {value}",
            )
        if self.init_std is not None:
            _require(
                0 < self.init_std < math.inf,
                "init_std",
                f"must be positive and finite, or null, got {self.init_std}",
            )

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied, validated. A derived field that still had its default
        (e.g. d_ff = 4 d_model) follows the change; one set on purpose (GQA's n_kv_heads) stays."""
        data = self.to_dict()
        for derived, default in self._derived().items():
            if derived not in changes and data[derived] == default:
                data[derived] = None
        data.update(changes)
        return ModelConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON ({err}); fix the file's syntax") from None
        except RecursionError:
            raise ConfigError("config JSON is nested too deeply to read; fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object of field: value pairs")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            text = read_text_file(Path(path), "config file")
        except QkvError as err:  # a config's error, whatever the reason
            raise ConfigError(str(err)) from None
        return cls.from_json(text)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**changes) if changes else PRESETS[name].replace()


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _check_type(config: ModelConfig) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        base, optional = str(f.type).replace(" | None", ""), " | None" in str(f.type)
        if value is None and optional:
            continue
        allowed = _TYPES.get(base)
        if allowed is None:
            continue
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            _require(False, f.name, f"must be {base}, got {value!r} ({type(value).__name__})")
        if base == "float":
            object.__setattr__(config, f.name, float(value))


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config field {name}: {message}")


def _choice(config: ModelConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    _require(value in choices, name, f"{value!r} is not one of {list(choices)}")


@dataclass(frozen=True)
class Kind:
    """What a field of a model directory's JSON file may hold: whether it `accepts` a value,
    and what it `must` be."""

    must: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int = MAX_SIZE, null: bool = False) -> Kind:
    """An integer from `low` to `high` (not 2.5, not true), or null if `null`."""
    return Kind(f"an integer from {low} to {high:,}" + " or null" * null,
                lambda v: (null and v is None) or (_is_int(v) and low <= v <= high))  # fmt: skip


def number(low: float, null: bool = False, at_least: bool = False) -> Kind:
    """A finite number above `low` (or `at_least` it), or null if `null`: not Infinity, NaN,
    a string or a boolean."""
    return Kind(
        f"a finite number {'of at least' if at_least else 'above'} {low:g}" + " or null" * null,
        lambda v: (null and v is None) or (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v >= low if at_least else v > low)
        ),
    )  # fmt: skip


def typed(kind: type, must: str, null: bool = False) -> Kind:
    """A value of type `kind` (str, bool, dict), or null if `null`."""
    return Kind(must + " or null" * null, lambda v: (null and v is None) or isinstance(v, kind))


SIZE, SIZE_OR_NULL, EPS, BASE = integer(1), integer(1, null=True), number(0), number(1)
LAYERS = integer(1, 100_000)  # a layer list (Gemma's layer_types) is built before any weight
TEXT, FLAG = typed(str, "a string"), typed(bool, "true or false")
OBJECT, TEXT_OR_NULL = typed(dict, "an object", True), typed(str, "a string", True)
STRINGS = Kind(
    "a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
)
# The fields of a Hugging Face config.json that qkv reads (each family's *_config_from_hf).
HF_FIELDS: dict[str, Kind] = {
    "model_type": TEXT, "vocab_size": SIZE, "n_embd": SIZE, "n_head": SIZE, "n_layer": LAYERS,
    "n_inner": SIZE_OR_NULL, "n_positions": SIZE, "hidden_size": SIZE,
    "intermediate_size": SIZE, "num_attention_heads": SIZE, "num_hidden_layers": LAYERS,
    "num_key_value_heads": SIZE_OR_NULL, "head_dim": SIZE_OR_NULL,
    "max_position_embeddings": SIZE, "type_vocab_size": integer(0), "layer_norm_epsilon": EPS,
    "layer_norm_eps": EPS, "rms_norm_eps": EPS, "rope_theta": BASE, "rope_local_base_freq": BASE,
    "rope_scaling": OBJECT, "rope_parameters": OBJECT, "partial_rotary_factor": number(0),
    "sliding_window": SIZE_OR_NULL, "use_sliding_window": FLAG, "max_window_layers": integer(0),
    "sliding_window_pattern": SIZE, "layer_types": STRINGS, "query_pre_attn_scalar": number(0),
    "attn_logit_softcapping": number(0, True), "final_logit_softcapping": number(0, True),
    "tie_word_embeddings": FLAG, "attention_bias": FLAG, "mlp_bias": FLAG,
    "use_bidirectional_attention": typed(bool, "true or false", True), "hidden_act": TEXT,
    "activation_function": TEXT, "hidden_activation": TEXT_OR_NULL, "dtype": TEXT_OR_NULL,
    "position_embedding_type": TEXT, "torch_dtype": TEXT_OR_NULL,
}  # fmt: skip
# rope_scaling / rope_parameters, and Gemma 3's per kind of layer inside them.
ROPE_FIELDS: dict[str, Kind] = {
    "rope_type": TEXT, "type": TEXT, "rope_theta": BASE, "factor": number(1, at_least=True),
    "low_freq_factor": number(0), "high_freq_factor": number(0),
    "original_max_position_embeddings": SIZE, "partial_rotary_factor": number(0),
    "full_attention": OBJECT, "sliding_attention": OBJECT,
}  # fmt: skip
TOKEN_IDS = ("eos_token_id", "pad_token_id")  # the ids qkv reads (an id, a list of them, null)


def check_fields(data: Mapping[str, Any], kinds: Mapping[str, Kind], source: str) -> None:
    """Raise a ConfigError naming `source` (the file, and where in it) and the first field of
    `data` that `kinds` names whose value does not fit; other fields are not looked at."""
    for name, kind in kinds.items():
        if name in data and not kind.accepts(data[name]):
            raise ConfigError(
                f"{source}{name} must be {kind.must}, got {repr(data[name])[:40]}; fix it, or put "
                "the model's own file back"
            )


def check_token_ids(data: Mapping[str, Any], vocab_size: int, source: str) -> None:
    """TOKEN_IDS of `data` are ids of the vocabulary (0 .. vocab_size - 1), lists of them or
    null: an id outside it (-1 included) is a ConfigError, not ignored."""
    for name in TOKEN_IDS:
        value = data.get(name)
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and not (_is_int(token_id) and 0 <= token_id < vocab_size):
                raise ConfigError(
                    f"{source}{name} must be a token id from 0 to {vocab_size - 1} (or a list "
                    f"of them, or null), got {repr(value)[:40]}; fix it, or put the model's own "
                    "file back"
                )


def check_hf_config(hf: Mapping[str, Any], source: str) -> None:
    """Every field of a Hugging Face config.json that qkv reads, by type and range (HF_FIELDS,
    ROPE_FIELDS, token ids of its vocabulary): a ConfigError naming `source` and the field."""
    check_fields(hf, HF_FIELDS, f"{source}: ")
    for name in ("rope_scaling", "rope_parameters"):
        rope = hf.get(name) or {}
        check_fields(rope, ROPE_FIELDS, f"{source}: {name}.")
        for part in ("full_attention", "sliding_attention"):
            check_fields(rope.get(part) or {}, ROPE_FIELDS, f"{source}: {name}.{part}.")
    check_token_ids(hf, hf.get("vocab_size", MAX_SIZE), f"{source}: ")


# The original paper's (and the notes') design: Norm(x + Sublayer(x)), sinusoids, ReLU FFN.
ORIGINAL: dict[str, Any] = {"position": "sinusoidal", "norm_first": False, "feed_forward": "relu"}

PRESETS: dict[str, ModelConfig] = {
    # The notes' worked example: 4-dimensional embeddings, post-norm, ReLU FFN, sinusoids.
    "notes-demo": ModelConfig(
        d_model=4,
        n_heads=2,
        n_layers=1,
        d_ff=16,
        vocab_size=16,
        max_seq_len=64,
        init_std=None,
        **ORIGINAL,
    ),
    # A model that trains in minutes on 2 CPU cores.
    "tiny": ModelConfig(d_model=128, n_heads=4, n_layers=4, max_seq_len=256, vocab_size=256),
    # GPT-2 small (124M with its 50257-token vocabulary).
    "gpt2-small": ModelConfig(
        vocab_size=50257,
        d_model=768,
        n_heads=12,
        n_layers=12,
        max_seq_len=1024,
        feed_forward="gelu_tanh",
    ),
    # Llama-style: RoPE + RMSNorm + SwiGLU + grouped-query attention, no biases, untied head.
    "llama-small": ModelConfig(
        vocab_size=32000,
        d_model=512,
        n_heads=8,
        n_kv_heads=2,
        n_layers=8,
        d_ff=1408,
        max_seq_len=2048,
        position="rope",
        norm="rmsnorm",
        feed_forward="swiglu",
        bias=False,
        tie_embeddings=False,
    ),
    # "Attention Is All You Need", base model: encoder-decoder, post-norm, sinusoids, ReLU.
    "transformer-base": ModelConfig(
        arch="encoder-decoder",
        vocab_size=37000,
        d_model=512,
        n_heads=8,
        n_layers=6,
        d_ff=2048,
        max_seq_len=512,
        dropout=0.1,
        scale_embeddings=True,
        **ORIGINAL,
    ),
}


@dataclass
class TrainConfig:
    """Everything a run needs besides the model config. It is saved in every checkpoint, so
    `--resume` continues the same run; most fields are `qkv train` options."""

    data: list[str] = field(default_factory=lambda: ["builtin:stdlib-docs"])
    val_data: list[str] | None = None  # validation files (all of them scored) instead of a share
    val_fraction: float = 0.05
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    steps: int = 1000
    batch_size: int = 16
    context: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    schedule: str = "cosine"
    decay_fraction: float = 0.3  # wsd: the last share of the steps, decayed linearly
    eval_every: int = 250
    eval_windows: int = 256
    target_loss: float | None = None  # stop at the first evaluation at or below it
    save_every: int = 500
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    keep_checkpoints: int = 2

    def validate(self) -> None:
        positive = ("steps", "batch_size", "context", "grad_accum", "eval_every", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise QkvError(f"--{name.replace('_', '-')} must be at least 1")
        if self.grad_accum > 1 and self.batch_size * self.grad_accum > MAX_WINDOWS_PER_STEP:
            raise QkvError(
                f"--batch-size {self.batch_size} x --grad-accum {self.grad_accum} is "
                f"{self.batch_size * self.grad_accum:,} sequences a step; at most "
                f"{MAX_WINDOWS_PER_STEP:,} (each step draws their starts at once): lower either"
            )
        if not 0 < self.lr < math.inf:
            raise QkvError(f"--lr must be positive and finite, got {self.lr}")
        if not 0 < self.grad_clip < math.inf:
            raise QkvError(f"--grad-clip must be positive and finite, got {self.grad_clip}")
        if not 0 <= self.weight_decay < math.inf:
            raise QkvError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise QkvError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise QkvError("--warmup-steps must be 0 or more")
        if not 0 <= self.seed < 2**63:
            raise QkvError(f"--seed must be between 0 and 2**63 - 1, got {self.seed}")
        if not 0 < self.val_fraction < 1:
            raise QkvError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.dtype not in DTYPES:
            raise QkvError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.tokenizer not in TOKENIZERS:
            raise QkvError(f"--tokenizer must be bpe or char, got {self.tokenizer!r}")
        if self.optimizer not in OPTIMIZERS:
            raise QkvError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise QkvError(f"--schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.muon_lr < math.inf:
            raise QkvError(f"--muon-lr must be positive and finite, got {self.muon_lr}")
        if not 0 < self.decay_fraction <= 1:
            raise QkvError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        if self.target_loss is not None and not 0 < self.target_loss < math.inf:
            raise QkvError(f"--target-loss must be positive, got {self.target_loss}")


# Defaults the command line shows in its help, kept here because this module loads no PyTorch.
# Token selection: `qkv generate` (GenerationConfig) and `qkv chat` (chat.Chat).
GENERATION: dict[str, Any] = {
    "max_new_tokens": 128,
    "temperature": 0.8,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}
CHAT = {**GENERATION, "max_new_tokens": 200, "temperature": 0.7, "repetition_penalty": 1.1}
# A new fine-tuning run (finetune.finetune): 300 steps of 16 examples at lr 3e-4 (1e-3 measured
# worse on held-out stdlib-qa: 2% vs 8% lower response loss), 1e-3 for a LoRA adapter.
FINETUNE = {"steps": 300, "batch_size": 16, "eval_every": 100, "save_every": 100}
FINETUNE_LR, LORA_LR = 3e-4, 1e-3
# The main job (quickstart.quickstart): as many steps as fit in QUICKSTART_MINUTES, at most these.
QUICKSTART = TrainConfig(
    data=["builtin:stdlib-docs"],
    tokenizer="bpe",
    vocab_size=4096,
    steps=1500,
    batch_size=16,
    context=128,
    lr=3e-3,
    warmup_steps=100,
    eval_every=500,
    optimizer="muon",
)
QUICKSTART_MINUTES = 4.0

# Training recipes (`qkv train --recipe NAME`): model fields and TrainConfig fields, which
# --preset / --set and the training options still override.
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # nanoGPT's config/train_shakespeare_char.py with its README's CPU overrides. One
    # difference: nanoGPT also decays the embedding tables; qkv never does.
    "nanogpt": (
        {"d_model": 128, "n_heads": 4, "n_layers": 4, "position": "learned",
         "norm": "layernorm", "feed_forward": "gelu", "bias": False, "tie_embeddings": True,
         "dropout": 0.0},
        {"tokenizer": "char", "steps": 2000, "batch_size": 12, "context": 64, "lr": 1e-3,
         "min_lr_ratio": 0.1, "warmup_steps": 100, "weight_decay": 0.1, "beta1": 0.9,
         "beta2": 0.99, "grad_clip": 1.0, "eval_every": 250, "save_every": 2000},
    ),
    # The fastest found to nanoGPT's loss on Shakespeare characters (README: Speedrun): Muon
    # for the blocks' matrices, RoPE, ReLU^2, QK-norm and 2.7x the tokens per step, for 150
    # steps. Measured and not kept: zero-initialised projections, an untied head, logit
    # soft-capping, warmup-stable-decay (each as fast or slower to the target).
    "speedrun": (
        {"d_model": 128, "n_heads": 4, "n_layers": 4, "position": "rope", "norm": "rmsnorm",
         "feed_forward": "relu2", "bias": False, "tie_embeddings": True, "qk_norm": True},
        {"tokenizer": "char", "steps": 150, "batch_size": 32, "context": 64, "lr": 3e-3,
         "min_lr_ratio": 0.1, "warmup_steps": 15, "weight_decay": 0.0, "beta1": 0.9,
         "beta2": 0.95, "grad_clip": 1.0, "optimizer": "muon", "muon_lr": 0.02,
         "eval_every": 75, "save_every": 2000},
    ),
}  # fmt: skip


def recipe(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The model config and training settings of recipe `name` (RECIPES)."""
    if name not in RECIPES:
        raise QkvError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    model, train = RECIPES[name]
    return ModelConfig.preset("tiny", **model), TrainConfig(**train)
