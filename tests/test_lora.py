"""LoRA: starts as the base model, trains only the adapter, merges into the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qkv.config import ModelConfig
from qkv.model import DecoderLM
from qkv.nn.linear import Linear
from qkv.nn.lora import LoRALinear, UnknownTargets, add_lora, lora_state_dict, merge_lora
from qkv.train import next_token_loss

VOCAB, SEQ = 64, 12
TARGETS = ("q_proj", "v_proj", "w1")


def make_model(**changes) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, **changes)
    return DecoderLM(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def randomise_adapters(model: DecoderLM) -> None:
    """B starts at zero (a no-op update); give it values so the update shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.2)


@torch.no_grad()
def test_a_fresh_adapter_leaves_the_model_unchanged() -> None:
    model = make_model()
    before = model(ids())
    adapted = add_lora(model, rank=4, targets=TARGETS)
    assert len(adapted) == 2 * len(TARGETS)
    torch.testing.assert_close(model(ids()), before, rtol=0, atol=0)


def test_lora_layer_is_the_base_layer_plus_the_scaled_low_rank_update() -> None:
    torch.manual_seed(0)
    base = Linear(16, 24)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 16)
    expected = F.linear(x, base.weight + 2.0 * layer.lora_b @ layer.lora_a, base.bias)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("bias", [True, False])
def test_only_adapter_parameters_receive_gradients(bias: bool) -> None:
    model = make_model(bias=bias)
    add_lora(model, rank=4, targets=TARGETS)
    randomise_adapters(model)
    model.train()
    x = ids()
    next_token_loss(model(x[:, :-1]), x[:, 1:]).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n, _ in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))}
    assert with_grad == trainable == adapters
    assert len(adapters) == 2 * 2 * len(TARGETS)


@pytest.mark.parametrize("position", ["learned", "rope"])
@torch.no_grad()
def test_merged_model_gives_the_logits_of_base_plus_adapter(position: str) -> None:
    model = make_model(position=position)
    add_lora(model, rank=4, alpha=8.0, targets=TARGETS)
    randomise_adapters(model)
    with_adapter = model(ids())
    assert merge_lora(model) == 2 * len(TARGETS)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (model(ids()) - with_adapter).abs().max() <= 1e-5
    # The merged model has the base model's tensor names again (a plain checkpoint).
    assert set(model.state_dict()) == set(make_model(position=position).state_dict())


def test_lora_checkpoint_tensors_are_only_the_adapter() -> None:
    model = make_model()
    add_lora(model, rank=4, targets=("q_proj", "v_proj"))
    adapter = lora_state_dict(model)
    assert all(name.endswith((".lora_a", ".lora_b")) for name in adapter)
    # rank x (in + out) per adapted 32 x 32 projection, 2 projections x 2 layers.
    assert sum(t.numel() for t in adapter.values()) == 4 * 4 * (32 + 32)


def test_training_only_the_adapter_lowers_the_loss() -> None:
    # PyTorch's default init: embeddings of unit scale, so the frozen tied head can express
    # confident predictions (with init_std 0.02 its logits stay within about +-0.1).
    model = make_model(init_std=None)
    add_lora(model, rank=8, targets=TARGETS)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    x = ids()
    losses = []
    for _ in range(40):
        loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_a_target_no_layer_has_is_refused_before_anything_changes() -> None:
    model = make_model()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with pytest.raises(UnknownTargets) as refused:
        add_lora(model, rank=2, targets=("q_proj", "bogus", "nonexistent"))
    assert refused.value.unknown == ["bogus", "nonexistent"]
    assert sorted(refused.value.names) == sorted(names) and len(refused.value.names) == len(names)
    assert str(refused.value).startswith("no linear layer is named bogus, nonexistent; ")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="targets name no layer"):
        add_lora(model, rank=2, targets=())
