"""Hugging Face interop: a random-init transformers model and its qkv import compute the same."""

from __future__ import annotations

import pytest
import torch

from qkv.generate import GenerationConfig, decode, positions_of
from qkv.hf import from_gpt2

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def test_gpt2_logits_match_transformers_on_a_left_padded_batch(gpt2) -> None:
    ours = from_gpt2(gpt2)
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    positions = positions_of(mask)
    expected = gpt2(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    actual = ours(ids, mask, positions)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max() <= TOLERANCE


@torch.no_grad()
def test_gpt2_greedy_tokens_match_transformers_generate(gpt2) -> None:
    ours = from_gpt2(gpt2)
    prompt = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = gpt2.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
        do_sample=False, pad_token_id=0,
    )[0, 6:]  # fmt: skip
    steps = decode(ours, prompt.tolist(), GenerationConfig(temperature=0), pad_id=0)
    tokens = [int(token) for _, (token, _) in zip(range(32), steps, strict=False)]
    assert tokens == expected.tolist()
