"""Recording: the modules keep what they computed only inside `recording`, without changing it."""

from __future__ import annotations

import pytest
import torch

from qkv.config import ModelConfig
from qkv.model import DecoderLM
from qkv.nn.recording import Recordable, recording

CONFIG = ModelConfig(
    vocab_size=32, d_model=16, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=32, max_seq_len=16,
    position="rope", norm="rmsnorm", feed_forward="swiglu",
)  # fmt: skip


@torch.no_grad()
def test_recording_gives_the_numbers_of_the_explicit_formulas_unchanged() -> None:
    torch.manual_seed(0)
    fused = DecoderLM(CONFIG).eval()
    explicit = DecoderLM(CONFIG.replace(kernels="explicit")).eval()
    explicit.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 32, (2, 7))
    with recording(fused) as records:
        recorded = fused(ids)
    assert torch.equal(recorded, explicit(ids))
    assert torch.equal(records[-1].value, recorded)
    torch.testing.assert_close(recorded, fused(ids), atol=1e-5, rtol=0)


@torch.no_grad()
def test_records_come_in_order_with_their_formulas_filled_in() -> None:
    torch.manual_seed(0)
    model = DecoderLM(CONFIG).eval()
    with recording(model) as records:
        model(torch.randint(0, 32, (1, 5)))
    first = [(r.module, r.name) for r in records[:6]]
    assert first == [
        ("embedder.token_embedding", "embeddings"),
        ("embedder.rotary", "positional_encoding"),
        ("blocks.0.attention_norm", "layer_norm"),
        ("blocks.0.self_attention", "query"),
        ("blocks.0.self_attention", "key"),
        ("blocks.0.self_attention", "value"),
    ]
    key = records[4]
    assert key.value.shape == (1, 2, 5, 4)  # n_kv_heads heads, as computed
    assert "split into 2 key heads for 4 query heads" in key.formula
    assert all("{" not in r.formula for r in records)
    residuals = [r.sublayer for r in records if r.name == "residual"]
    assert residuals == ["attention", "feed_forward"] * 2
    assert (records[-1].module, records[-1].name) == ("head", "logits")


def test_after_recording_no_module_records_even_after_an_error() -> None:
    model = DecoderLM(CONFIG).eval()
    with pytest.raises(RuntimeError), recording(model):
        raise RuntimeError("interrupted")
    recordable = [m for m in model.modules() if isinstance(m, Recordable)]
    assert len(recordable) > 10
    assert all(m.recorder is None and "recorder" not in vars(m) for m in recordable)
