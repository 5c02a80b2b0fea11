"""ModelConfig validates itself, names the field and the fix, and round-trips through JSON."""

import json

import pytest

from qkv import PRESETS, ConfigError, ModelConfig, build_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    config = ModelConfig.preset(name)
    assert ModelConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["d_model"] == config.d_model


def test_required_presets_have_their_shapes():
    assert ModelConfig.preset("notes-demo").d_model == 4
    gpt2 = ModelConfig.preset("gpt2-small")
    assert (gpt2.d_model, gpt2.n_heads, gpt2.n_layers, gpt2.vocab_size) == (768, 12, 12, 50257)
    llama = ModelConfig.preset("llama-small")
    assert (llama.position, llama.norm, llama.feed_forward) == ("rope", "rmsnorm", "swiglu")
    assert llama.n_kv_heads < llama.n_heads


def test_gpt2_small_preset_has_124m_parameters():
    model = build_model(ModelConfig.preset("gpt2-small", n_layers=12))
    assert round(model.num_parameters() / 1e6) == 124


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"d_model": 10, "n_heads": 3}, "n_heads", "not divisible"),
        ({"n_kv_heads": 3}, "n_kv_heads", "not divisible"),
        ({"dropout": 1.5}, "dropout", "[0, 1)"),
        ({"position": "absolute"}, "position", "sinusoidal"),
        ({"norm": "batchnorm"}, "norm", "rmsnorm"),
        ({"feed_forward": "tanh"}, "feed_forward", "swiglu"),
        ({"vocab_size": 0}, "vocab_size", "at least 1"),
        ({"d_model": "128"}, "d_model", "must be int"),
        ({"norm_first": 1}, "norm_first", "must be bool"),
        ({"position": "rope", "d_model": 12, "n_heads": 4}, "position", "even"),
        ({"norm_eps": 0.0}, "norm_eps", "positive"),
        ({"init_std": float("inf")}, "init_std", "finite"),
    ],
)
def test_invalid_config_names_field_and_fix(changes, field, hint):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**changes)
    assert f"field {field}:" in str(info.value)
    assert hint in str(info.value)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="d_modle"):
        ModelConfig.from_dict({"d_modle": 4})


def test_replace_recomputes_derived_fields_but_keeps_chosen_ones():
    config = ModelConfig(d_model=64, n_heads=8)
    assert config.d_ff == 256 and config.n_kv_heads == 8
    wider = config.replace(d_model=128, n_heads=4)
    assert wider.d_ff == 512 and wider.n_kv_heads == 4
    assert config.replace(d_ff=100).d_ff == 100
    llama = ModelConfig.preset("llama-small", n_heads=4)
    assert llama.n_kv_heads == 2 and llama.d_ff == 1408
    assert ModelConfig(norm_first=True).replace(norm_first=False).final_norm is False


def test_config_is_frozen():
    import dataclasses

    config = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_heads = 3


def test_load_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{d_model: 4}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(bad)
    good = tmp_path / "good.json"
    good.write_text(ModelConfig.preset("tiny").to_json())
    assert ModelConfig.load(good) == ModelConfig.preset("tiny")


def test_a_step_of_more_sequences_than_can_be_drawn_is_refused() -> None:
    from qkv.config import MAX_WINDOWS_PER_STEP, TrainConfig
    from qkv.errors import QkvError

    with pytest.raises(QkvError, match="sequences a step; at most"):
        TrainConfig(batch_size=2, grad_accum=MAX_WINDOWS_PER_STEP).validate()
    TrainConfig(batch_size=2, grad_accum=MAX_WINDOWS_PER_STEP // 2).validate()
