"""Token selection: parity with Hugging Face's logits processors, allowed sets over many draws."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qkv.errors import QkvError
from qkv.sampling import (
    SamplingConfig,
    distribution,
    penalize_repetition,
    select,
    top_k_filter,
    top_p_filter,
)

VOCAB = 24
DRAWS = 6000


def random_logits(rows: int = 4, seed: int = 0) -> torch.Tensor:
    return 2.0 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 3, 10, VOCAB])
def test_top_k_filter_matches_hugging_face(k: int) -> None:
    logits = random_logits()
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    torch.testing.assert_close(top_k_filter(logits, k), expected, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_filter_matches_hugging_face(p: float) -> None:
    logits = random_logits()
    expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
    torch.testing.assert_close(top_p_filter(logits, p), expected, rtol=0, atol=0)


def test_repetition_penalty_matches_hugging_face() -> None:
    logits = random_logits()
    history = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(4, VOCAB, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty=1.3)(history, logits.clone())
    torch.testing.assert_close(penalize_repetition(logits, seen, 1.3), expected)


def nucleus(probs: torch.Tensor, p: float) -> set[int]:
    """The smallest set of likeliest tokens whose probability reaches p, by a plain loop."""
    chosen, mass = set(), 0.0
    for token in probs.argsort(descending=True).tolist():
        chosen.add(token)
        mass += probs[token].item()
        if mass >= p:
            break
    return chosen


@pytest.mark.parametrize(
    "top_k, top_p, temperature", [(5, 1.0, 1.0), (None, 0.7, 1.0), (8, 0.8, 0.7)]
)
def test_draws_stay_in_the_allowed_set_with_the_renormalised_frequencies(
    top_k: int | None, top_p: float, temperature: float
) -> None:
    logits = random_logits(1)[0]
    probs = torch.softmax(logits / temperature, -1)
    allowed = set(probs.argsort(descending=True)[: top_k or VOCAB].tolist())
    kept = torch.zeros(VOCAB).index_fill(0, torch.tensor(sorted(allowed)), 1.0) * probs
    allowed &= nucleus(kept / kept.sum(), top_p)

    torch.manual_seed(0)
    draws = select(logits.expand(DRAWS, VOCAB), SamplingConfig(temperature, top_k, top_p))

    assert set(draws.tolist()) <= allowed
    target = torch.zeros(VOCAB)
    index = torch.tensor(sorted(allowed))
    target[index] = probs[index] / probs[index].sum()
    frequency = torch.bincount(draws, minlength=VOCAB).float() / DRAWS
    assert (frequency - target).abs().max() < 0.03  # ~5 standard errors at 6,000 draws


def test_temperature_zero_is_greedy() -> None:
    logits = random_logits(16)
    greedy = SamplingConfig(temperature=0, top_k=3, top_p=0.5)
    assert torch.equal(select(logits, greedy), logits.argmax(-1))


def test_each_row_draws_from_its_own_seeded_generator() -> None:
    logits = random_logits(3)

    def generators(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    plain = SamplingConfig(temperature=1.0, top_k=None)
    together = select(logits, plain, generators=generators(7, 8, 9))
    alone = select(logits[1:2], plain, generators=generators(8))
    assert together[1] == alone[0]
    runs = torch.stack([select(logits, plain, generators=generators(7, 8, 9)) for _ in range(2)])
    assert torch.equal(runs[0], runs[1])


def test_tiny_temperatures_and_penalties_still_pick_the_likeliest_token() -> None:
    logits = random_logits(8)
    greedy = logits.argmax(-1)
    try:
        for flush_denormal in (False, True):  # the trainer turns flushing on process-wide
            torch.set_flush_denormal(flush_denormal)
            for temperature in (1e-45, 1e-30):
                assert torch.equal(select(logits, SamplingConfig(temperature)), greedy)
    finally:
        torch.set_flush_denormal(False)
    seen = torch.ones_like(logits, dtype=torch.bool)
    penalized = penalize_repetition(logits, seen, 1e-40)  # positive logits become inf
    drawn = select(logits, SamplingConfig(1.0, None, repetition_penalty=1e-40), seen)
    assert bool(torch.isinf(penalized.gather(1, drawn[:, None])).all())  # one of the inf ones


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.7, 1)])
def test_select_applies_the_repetition_penalty_first_as_hugging_face_does(
    temperature: float, top_k: int | None
) -> None:
    logits = random_logits(6, seed=3)
    history = logits.topk(2, dim=-1).indices  # penalize each row's two likeliest tokens
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty=3.0)(history, logits.clone()).argmax(-1)
    config = SamplingConfig(temperature, top_k, repetition_penalty=3.0)
    chosen = select(logits, config, seen)
    assert torch.equal(chosen, expected) and not torch.equal(chosen, logits.argmax(-1))


@pytest.mark.parametrize(
    "temperature, top_k, top_p, penalty",
    [(1.0, None, 1.0, 1.0), (0.7, 5, 0.8, 1.3), (2.0, 12, 0.5, 1.0)],
)
def test_the_distribution_shown_is_hugging_faces_chain_of_processors(
    temperature: float, top_k: int | None, top_p: float, penalty: float
) -> None:
    logits = random_logits(5, seed=7)
    history = logits.topk(3, dim=-1).indices
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty=penalty)(history, logits.clone())
    expected = TemperatureLogitsWarper(temperature)(history, expected)
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(history, expected)
    expected = torch.softmax(TopPLogitsWarper(top_p)(history, expected), dim=-1)
    config = SamplingConfig(temperature, top_k, top_p, penalty)
    torch.testing.assert_close(distribution(logits, config, seen), expected, atol=1e-6, rtol=0)


def test_a_greedy_distribution_is_one_hot_on_the_argmax() -> None:
    logits = random_logits(3, seed=2)
    probs = distribution(logits, SamplingConfig(temperature=0.0))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(
        probs.sum(-1), torch.ones(3)
    )
    assert torch.equal(select(logits, SamplingConfig(temperature=0.0)), logits.argmax(-1))


def test_sampling_options_out_of_range_are_refused() -> None:
    for bad in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"repetition_penalty": 0}):
        with pytest.raises(QkvError, match=next(iter(bad)).replace("_", "-")):
            SamplingConfig(**bad)


@pytest.mark.parametrize("p", [1e-146, 1e-12, 5e-324])
def test_a_tiny_top_p_keeps_the_likeliest_token(p: float) -> None:
    """The nucleus always holds the top token, however small p (rounding in the cumulative sum
    once dropped it too, leaving nothing to sample)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 97)
    kept = top_p_filter(logits, p)
    assert torch.equal(kept.argmax(-1), logits.argmax(-1))
    assert bool((torch.isfinite(kept).sum(-1) == 1).all())
    assert torch.equal(select(logits, SamplingConfig(temperature=1.0, top_p=p)), logits.argmax(-1))
