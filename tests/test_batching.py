"""Continuous batching: requests that join and leave a running batch generate exactly what each
generates alone (qkv.generate's Generator, itself tested against full recomputation)."""

from __future__ import annotations

import pytest
import torch

from qkv.batching import Batcher
from qkv.config import ModelConfig
from qkv.generate import GenerationConfig, Generator
from qkv.model import DecoderLM
from qkv.nn.kv_cache import KVCache
from qkv.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"
WINDOW = 48
FLAVOURS = {
    "learned": dict(position="learned"),
    "rope-gqa": dict(position="rope", norm="rmsnorm", feed_forward="swiglu", n_kv_heads=2,
                     bias=False, tie_embeddings=False),
}  # fmt: skip
CONFIGS = [
    GenerationConfig(max_new_tokens=12, temperature=0),
    GenerationConfig(max_new_tokens=9, temperature=1.0, top_k=0, seed=3),
    GenerationConfig(max_new_tokens=15, temperature=0.8, top_k=5, top_p=0.9, seed=7),
    GenerationConfig(max_new_tokens=6, temperature=1.2, repetition_penalty=1.3, seed=11),
    GenerationConfig(max_new_tokens=10, temperature=0.7, stop=("o",), seed=5),
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_char([TEXT])


def make_model(tokenizer: Tokenizer, flavour: str) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                         max_seq_len=WINDOW, init_std=0.1, **FLAVOURS[flavour])  # fmt: skip
    return DecoderLM(config).eval()


def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """Prompts of 3 to 30 tokens: joiners both shorter and longer than the running rows."""
    words = TEXT.split()
    return [tokenizer.encode(" ".join(words[i : i + n])) for i, n in enumerate([1, 6, 3, 2, 4])]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("max_batch", [1, 2, 8])
def test_joining_and_leaving_rows_generate_what_each_does_alone(tokenizer, flavour, max_batch):
    """Requests arrive at different steps (two at once, one while the batch runs, one after an
    earlier one ended), with mixed sampling settings and lengths."""
    model = make_model(tokenizer, flavour)
    alone = Generator(model, tokenizer)
    batcher = Batcher(model, tokenizer, max_batch)
    arrivals = {0: [0, 1], 2: [2], 5: [3], 9: [4]}  # step -> requests that arrive then
    sequences = {}
    step = 0
    while batcher.busy or step <= max(arrivals):
        for i in arrivals.get(step, []):
            sequences[i] = batcher.add(prompts(tokenizer)[i], CONFIGS[i])
        batcher.step()
        assert len(batcher.running) <= max_batch
        step += 1
    for i, sequence in sequences.items():
        expected = alone.generate(prompts(tokenizer)[i], CONFIGS[i])
        got = sequence.continuation.completion()
        assert got.token_ids == expected.token_ids, i
        assert got.text == expected.text and got.stop_reason == expected.stop_reason


def test_a_cancelled_row_leaves_and_the_others_are_unchanged(tokenizer):
    model = make_model(tokenizer, "rope-gqa")
    batcher = Batcher(model, tokenizer, 4)
    ids = prompts(tokenizer)
    kept = [batcher.add(ids[i], CONFIGS[i]) for i in (0, 2)]
    gone = batcher.add(ids[1], GenerationConfig(max_new_tokens=40, seed=2))
    for _ in range(3):
        batcher.step()
    batcher.cancel(gone)
    batcher.step()
    assert gone not in batcher.running and len(gone.continuation.token_ids) == 3
    while batcher.busy:
        batcher.step()
    alone = Generator(model, tokenizer)
    for sequence, i in zip(kept, (0, 2), strict=True):
        assert sequence.continuation.token_ids == alone.generate(ids[i], CONFIGS[i]).token_ids


def test_a_row_that_fills_the_context_window_ends_with_length(tokenizer):
    """Where the Generator would slide its window, a batched row ends: the tokens before that
    point are the same."""
    model = make_model(tokenizer, "learned")
    prompt = tokenizer.encode(TEXT)[: WINDOW - 5]
    config = GenerationConfig(max_new_tokens=30, temperature=0)
    batcher = Batcher(model, tokenizer, 2)
    sequence = batcher.add(prompt, config)
    while batcher.busy:
        batcher.step()
    got = sequence.continuation.completion()
    assert got.stop_reason == "length" and len(got.token_ids) == WINDOW - len(prompt) + 1
    expected = Generator(model, tokenizer).generate(prompt, config).token_ids
    assert got.token_ids == expected[: len(got.token_ids)]


def test_cache_rows_can_be_kept_shifted_and_stacked():
    cache = KVCache(3, 2, 8, 4)
    keys = torch.randn(3, 2, 5, 4)
    cache.update(keys, -keys)
    cache.keep(torch.tensor([2, 0]))
    cache.shift(2)
    assert cache.length == 7
    torch.testing.assert_close(cache.keys[:, :, 2:7], keys[[2, 0]], rtol=0, atol=0)
    cache.shift(-3)
    torch.testing.assert_close(cache.values[:, :, :4], -keys[[2, 0], :, 1:], rtol=0, atol=0)
    other = KVCache(1, 2, 8, 4)
    other.update(keys[:1, :, :4], keys[:1, :, :4])
    cache.stack(other)
    assert cache.keys.shape[0] == 3 and cache.length == 4
    with pytest.raises(ValueError):
        cache.shift(5)


def test_a_cache_grows_past_its_capacity_keeping_what_it_holds():
    cache = KVCache(2, 2, 3, 4)
    keys = torch.randn(2, 2, 11, 4)
    cache.update(keys[:, :, :2], -keys[:, :, :2])
    for t in range(2, 11):  # 3 -> 6 -> 12 positions
        held_keys, held_values = cache.update(keys[:, :, t : t + 1], -keys[:, :, t : t + 1])
    assert cache.capacity == 12 and cache.length == 11
    torch.testing.assert_close(held_keys, keys, rtol=0, atol=0)
    torch.testing.assert_close(held_values, -keys, rtol=0, atol=0)
