"""The families beyond GPT-2, Llama and BERT: a random-init transformers model of each, with its
special features switched on, saved to a temporary directory, gives transformers' logits on a
left-padded batch (1e-4) and the same 32 greedy tokens once loaded by qkv."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_hf import TOLERANCE, padded_batch, save_hf

from qkv.checkpoint import load_model
from qkv.generate import GenerationConfig, decode

VOCAB = 97
SHAPE = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": VOCAB - 1,
    "bos_token_id": None, "pad_token_id": None,
}  # fmt: skip
# (transformers config class, its fields beyond SHAPE, what qkv must have read from them)
FAMILIES = {
    "llama3-rope-scaling": (
        "LlamaConfig",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
         "rope_theta": 5000.0},
        {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_context": 64},
    ),
    "mistral-sliding-window": (
        "MistralConfig",
        {"sliding_window": 5, "rope_theta": 5000.0},
        {"sliding_window": 5, "sliding_layers": None},
    ),
    "qwen2-qkv-biases": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
        {"qkv_bias": True, "bias": False, "sliding_window": 5, "sliding_layers": (1,)},
    ),
    "qwen3-qk-norm": (
        "Qwen3Config",
        {"head_dim": 32, "tie_word_embeddings": True},
        {"qk_norm": True, "head_dim": 32, "tie_embeddings": True},
    ),
    "phi3-fused-projections": (
        "Phi3Config",
        {"sliding_window": 5, "rope_theta": 5000.0, "pad_token_id": 0},
        {"sliding_window": 5, "sliding_layers": None, "n_kv_heads": 2},
    ),
    "gemma2-softcaps-sandwich-norms": (
        "Gemma2Config",
        {"head_dim": 24, "query_pre_attn_scalar": 20, "attn_logit_softcapping": 0.5,
         "final_logit_softcapping": 3.0, "sliding_window": 5, "tie_word_embeddings": True,
         "hidden_activation": "gelu_pytorch_tanh", "pad_token_id": 0},
        {"attention_softcap": 0.5, "logit_softcap": 3.0, "attention_scale": 20**-0.5,
         "sliding_layers": (0,), "post_norms": True, "norm_unit_offset": True,
         "feed_forward": "geglu_tanh", "scale_embeddings": True, "head_dim": 24},
    ),
    "gemma3-local-rope-qk-norm": (
        "Gemma3TextConfig",
        {"head_dim": 24, "query_pre_attn_scalar": 24, "sliding_window": 5,
         "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": 0,
         "rope_parameters": {
             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}},
        {"qk_norm": True, "rope_local_base": 100.0, "rope_base": 50000.0, "rope_factor": 4.0,
         "rope_scaling": "linear", "sliding_layers": (0,), "norm_unit_offset": True},
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    import transformers

    config_class, fields, expected = FAMILIES[request.param]
    config = getattr(transformers, config_class)(**(SHAPE | fields))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # away from init, so biases and norm gains count
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model, save_hf(model, tmp_path_factory.mktemp(request.param) / "model"), expected


@torch.no_grad()
def test_logits_match_transformers_on_a_left_padded_batch(family) -> None:
    hf, folder, expected = family
    ours, _ = load_model(folder)
    for name, value in expected.items():
        assert getattr(ours.config, name) == value, name
    ids, mask, positions = padded_batch(VOCAB)  # 12 tokens: longer than the sliding windows
    theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    actual = ours(ids, mask, positions)
    real = mask.bool()
    assert (actual[real] - theirs[real]).abs().max() <= TOLERANCE


@torch.no_grad()
def test_greedy_tokens_match_transformers_generate(family) -> None:
    hf, folder, _ = family
    ours, _ = load_model(folder)
    prompt = torch.randint(0, VOCAB - 1, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
        do_sample=False, pad_token_id=0,
    )[0, 6:]  # fmt: skip
    steps = decode(ours, prompt.tolist(), GenerationConfig(temperature=0), pad_id=0)
    tokens = [int(token) for _, (token, _) in zip(range(32), steps, strict=False)]
    assert tokens == expected.tolist()


def test_a_config_json_round_trip_keeps_every_new_field(tmp_path: Path) -> None:
    from qkv.config import ModelConfig

    config = ModelConfig(d_model=64, n_heads=4, head_dim=32, qkv_bias=True, bias=False,
                         sliding_window=5, sliding_layers=(1,), n_layers=2,
                         rope_scaling="llama3", rope_factor=8.0, position="rope")  # fmt: skip
    assert ModelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "model_type, change, message",
    [
        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
         "Qwen2 RoPE scaling 'yarn' is not supported"),
        ("mistral", {"hidden_act": "gelu"}, "Mistral hidden_act 'gelu' is not supported"),
        ("qwen3", {"attention_bias": True}, "Qwen3 attention_bias / mlp_bias is not supported"),
        ("phi3", {"rope_scaling": {"type": "longrope", "long_factor": [1.0]}},
         "Phi-3 RoPE scaling 'longrope' is not supported"),
        ("phi3", {"partial_rotary_factor": 0.75}, "Phi-3 partial_rotary_factor 0.75 is not"),
        ("gemma3_text", {"use_bidirectional_attention": True},
         "Gemma 3 use_bidirectional_attention is not supported"),
        ("gemma2", {"hidden_activation": "relu"}, "Gemma 2 hidden_activation 'relu' is not"),
        ("falcon", {}, "model_type 'falcon' is not supported"),
    ],
)  # fmt: skip
def test_what_is_not_supported_is_named_in_one_line(model_type, change, message, tmp_path):
    import json

    from qkv.errors import QkvError

    config = SHAPE | {"model_type": model_type} | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QkvError, match=message) as refused:
        load_model(tmp_path)
    assert "\n" not in str(refused.value)


def test_generate_says_what_runs_and_in_which_dtype(tmp_path: Path) -> None:
    import transformers
    from test_cli_generate import qkv

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**SHAPE)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)  # stored in bfloat16
    folder = save_hf(model, tmp_path / "qwen2")
    asked = qkv("generate", "--model", str(folder), "w1 w2", "--dtype", "float32",
                "--max-new-tokens", "4")  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    count = sum(p.numel() for p in model.parameters())
    line = asked.stderr.splitlines()[0]
    assert line.startswith(f"model: Qwen2, {count / 1e3:.2f}K parameters, float32 (as asked), ")
    assert f"{count * 4 / 2**20:.1f} MiB on cpu" in line  # float32: 4 bytes a parameter
    auto = qkv("generate", "--model", str(folder), "w1 w2", "--max-new-tokens", "4")
    assert auto.returncode == 0, auto.stderr
    chosen = auto.stderr.splitlines()[0]  # bfloat16 only where this CPU runs it as fast
    assert re.search(r", (bfloat16|float32) \(auto: this CPU multiplies bfloat16 at \d+ GFLOP/s, "
                     r"float32 at \d+\)", chosen), chosen  # fmt: skip


@pytest.mark.parametrize(
    "fields, sliding",
    [
        ({"sliding_window": 16}, {}),  # use_sliding_window defaults to off
        ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
         {"sliding_window": 16, "sliding_layers": (1,)}),  # layers >= max_window_layers slide
        ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, {}),
    ],
)  # fmt: skip
def test_qwen_slides_the_layers_transformers_slides(fields, sliding) -> None:
    import transformers

    from qkv.hf import qwen2_config_from_hf

    hf = SHAPE | {"model_type": "qwen2"} | fields
    ours = qwen2_config_from_hf(hf)
    theirs = transformers.Qwen2Config(**hf)
    slid = tuple(i for i, kind in enumerate(theirs.layer_types) if kind == "sliding_attention")
    assert (ours.sliding_window, ours.sliding_layers) == (
        sliding.get("sliding_window"),
        sliding.get("sliding_layers"),
    ) and slid == (sliding.get("sliding_layers") or ())


def test_a_head_dim_of_its_own_needs_no_divisible_d_model() -> None:
    from qkv.config import ModelConfig

    assert ModelConfig(d_model=96, n_heads=5, head_dim=32).head_dim == 32
