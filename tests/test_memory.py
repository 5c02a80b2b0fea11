"""Memory estimates: exact parameter counts, activations that are a lower bound of what autograd
really keeps, and the memory available as the operating system limits it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.evaluation import next_token_loss
from qkv.memory import (
    available_memory,
    check_fits,
    parameter_count,
    scoring_parts,
    training_parts,
)
from qkv.model import build_model
from qkv.nn.lora import add_lora

CONFIGS = {
    "gpt": ModelConfig(vocab_size=300, d_model=32, n_heads=4, n_layers=3, max_seq_len=32),
    "llama": ModelConfig(
        vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=32,
        position="rope", norm="rmsnorm", feed_forward="swiglu", bias=False, tie_embeddings=False,
    ),
    "post-norm": ModelConfig(vocab_size=97, d_model=48, n_heads=4, n_layers=2, max_seq_len=32,
                             norm_first=False, feed_forward="relu", position="sinusoidal"),
    "encoder": ModelConfig(arch="encoder", vocab_size=200, d_model=32, n_heads=2, n_layers=2,
                           type_vocab_size=2, embedding_norm=True),
    "encoder-decoder": ModelConfig(arch="encoder-decoder", vocab_size=64, d_model=32, n_heads=2,
                                   n_layers=3),
}  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_count_is_what_pytorch_counts_on_the_built_model(name):
    config = CONFIGS[name]
    assert parameter_count(config) == sum(p.numel() for p in build_model(config).parameters())


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once, weights excluded)
    plus the logits, measured on a real forward pass."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(ids)
        next_token_loss(logits, ids)
    return sum(kept.values()) + logits.numel() * logits.element_size()


@pytest.mark.parametrize("name", ["gpt", "llama", "post-norm"])
@pytest.mark.parametrize("shape", [(8, 32), (2, 16)])
@pytest.mark.parametrize("lora", [False, True])
def test_activations_are_a_lower_bound_of_what_autograd_keeps(name, shape, lora):
    model = build_model(CONFIGS[name]).train()
    if lora:
        add_lora(model, 2, 4.0, 0.0, ("q_proj", "v_proj"))
    batch, context = shape
    ids = torch.randint(0, model.config.vocab_size, shape)
    parts = training_parts(model, batch, context, torch.float32, on_device=True)
    assert 0 < parts["activations of one step"] <= saved_bytes(model, ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert parts["gradients and optimizer state"] == 3 * 4 * trainable  # grad + 2 AdamW moments


def test_scoring_counts_the_logits_and_their_log_softmax():
    config = CONFIGS["gpt"]
    assert scoring_parts(config, 4, 32) == {"logits": 4 * 32 * 2 * 300 * 4}


def test_a_need_beyond_what_is_available_is_one_line_with_both_figures():
    free = available_memory()
    check_fits({"small": 1000}, "a tiny job", "do less")
    with pytest.raises(QkvError) as refused:
        check_fits({"a": free, "b": free}, "a big job", "do less")
    message = str(refused.value)
    assert message.startswith("a big job needs at least ") and message.endswith("; do less")
    assert "\n" not in message and "of memory is available" in message


def test_the_address_space_limit_bounds_the_memory_available():
    """Under `ulimit -v` (RLIMIT_AS) the figure is at most what the limit leaves."""
    script = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)); "
        "from qkv.memory import available_memory; print(available_memory())"
    )
    free = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              check=True).stdout)  # fmt: skip
    assert 0 < free < 3 * 2**30
