"""Decoding that must not fall over: stop strings checked in linear time (however long the text
and the stops), broken (NaN/inf) logits ending their own sequence with a clear error, and a
batcher that can be emptied after a failed step and used again."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv.batching import Batcher
from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.generate import MAX_STOP_CHARS, MAX_STOPS, Continuation, GenerationConfig, Generator
from qkv.model import DecoderLM
from qkv.sampling import SamplingConfig, draw, finite_rows, select
from qkv.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"
GREEDY = GenerationConfig(max_new_tokens=8, temperature=0)
SAMPLED = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=0, seed=4)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_char([TEXT])


@pytest.fixture(scope="module")
def ab_bpe() -> Tokenizer:
    """A byte-level BPE over the letters a and b: its tokens are pieces of 1 to several letters,
    so a step's new text can hold a whole stop string, or two."""
    words = torch.randint(0, 2, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    return Tokenizer.train_bpe(["".join("ab"[w] for w in words)], vocab_size=300)


def decoder(tokenizer: Tokenizer, extra_ids: int = 1) -> DecoderLM:
    """A small decoder whose vocabulary has `extra_ids` ids past the tokenizer's (never chosen),
    with an untied head, so an input embedding set to NaN leaves the choice of tokens alone."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size + extra_ids, d_model=32, n_heads=4,
                         n_layers=2, max_seq_len=48, init_std=0.1, position="rope",
                         norm="rmsnorm", bias=False, tie_embeddings=False)  # fmt: skip
    return DecoderLM(config).eval()


def poisoned(tokenizer: Tokenizer, token: int) -> DecoderLM:
    """The decoder with `token`'s input embedding NaN: any row that reads it gets NaN logits."""
    model = decoder(tokenizer)
    with torch.no_grad():
        model.embedder.token_embedding.weight[token] = float("nan")
    return model


def run(batcher: Batcher) -> None:
    while batcher.busy:
        batcher.step()


# Stop strings


def test_stop_strings_are_bounded_in_length_and_number() -> None:
    GenerationConfig(stop=("z" * MAX_STOP_CHARS,) + ("y",) * (MAX_STOPS - 1))
    with pytest.raises(QkvError, match=f"at most {MAX_STOP_CHARS} characters; one has 1,000,000"):
        GenerationConfig(stop="z" * 1_000_000)
    with pytest.raises(QkvError, match=f"give at most {MAX_STOPS} stop strings; got 17"):
        GenerationConfig(stop=tuple("abcdefghijklmnopq"))
    with pytest.raises(QkvError, match="stop strings must be text"):
        GenerationConfig(stop=(3,))  # type: ignore[arg-type]


def reference(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], str, str | None]:
    """What a continuation must show after each piece, its text and stop reason, by brute
    force over the whole text: it ends before the earliest stop string, and while running shows
    all but the longest end of the text that is a proper start of some stop string."""
    shown, text = [], ""
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            text = text[: min(hits)]
            shown.append(text)
            return shown, text, "stop"
        held = [n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])]
        shown.append(text[: len(text) - max(held, default=0)])
    return shown, text, None


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text("ab", max_size=60),
    stops=st.lists(st.text("ab", min_size=1, max_size=7), min_size=1, max_size=4),
)
def test_stops_and_held_back_text_are_what_brute_force_finds(
    ab_bpe: Tokenizer, text: str, stops: list[str]
) -> None:
    row = Continuation("", [], 0, tuple(stops))
    pieces, shown = [], []
    for token in ab_bpe.encode(text):
        if row.stop_reason is not None:
            break
        pieces.append(ab_bpe.decode([token]))
        row.add(token, ab_bpe)
        row.new_text()
        shown.append(row.text[: row.shown])
    expected_shown, expected_text, reason = reference(pieces, tuple(stops))
    assert shown == expected_shown
    assert (row.text, row.stop_reason) == (expected_text, reason)


def test_stop_checking_takes_linear_time_in_the_text_and_the_stops(tokenizer: Tokenizer) -> None:
    """The issue's case (a 1,000,000-character stop string, 3 tokens) took 35 s, and 20,000
    tokens against 8 stops of 256 characters 9.5 s; each now takes about 0.1 s."""
    z = tokenizer.encode("o")[0]
    row = Continuation("", [1], 0, ("o" * 1_000_000,))  # past GenerationConfig's bound
    started = time.perf_counter()
    for _ in range(3):
        row.add(z, tokenizer)
        assert row.new_text() == ""  # "ooo" may start the stop string
    row.finish("length", tokenizer)
    assert row.new_text() == "ooo" and time.perf_counter() - started < 3.0

    # Stops that nearly match the text over and over: each fails on its last character only.
    ids = tokenizer.encode(TEXT) * (20_000 // len(TEXT) + 1)
    stops = tuple((TEXT * 4)[k : k + MAX_STOP_CHARS - 1] + "#" for k in range(8))
    row = Continuation("", [1], 0, stops)
    started = time.perf_counter()
    for token in ids[:20_000]:
        row.add(token, tokenizer)
        row.new_text()
    assert row.stop_reason is None and len(row.text) == 20_000
    assert time.perf_counter() - started < 3.0


# Broken logits


def test_select_never_returns_an_id_past_the_vocabulary() -> None:
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [[nan] * 5, [-inf] * 5, [0.0, nan, 1.0, -inf, 2.0], [inf] * 5, [0.0, 1.0, inf, 2.0, -inf]]
    )
    assert finite_rows(logits).tolist() == [False, False, False, False, False]
    assert finite_rows(torch.tensor([[0.0, -inf, 3.0]])).tolist() == [True]
    for config in (
        SamplingConfig(temperature=0),
        SamplingConfig(temperature=1.0, top_k=None),
        SamplingConfig(temperature=0.7, top_k=2, top_p=0.5, repetition_penalty=1.3),
    ):
        for seed in range(20):
            seen = torch.ones_like(logits, dtype=torch.bool)
            generators = [torch.Generator().manual_seed(seed + r) for r in range(len(logits))]
            ids = select(logits, config, seen, generators)
            assert ids.shape == (5,) and bool(((ids >= 0) & (ids < 5)).all()), ids
    # Probabilities that sum to nothing, or to NaN, have no token to draw: still an id below V;
    # a tiny total (where u * total may round to it) still draws its one possible token.
    probs = torch.tensor(
        [[0.0, 0.0, 0.0], [nan, 0.5, 0.5], [0.0, 1e-300, 0.0]], dtype=torch.float64
    )
    for seed in range(20):
        ids = draw(probs, [torch.Generator().manual_seed(seed + r) for r in range(3)]).tolist()
        assert max(ids) < 3 and ids[2] == 1


def test_a_row_with_nan_logits_ends_with_an_error_and_the_others_go_on(tokenizer) -> None:
    """Id V (past the tokenizer: never generated) has a NaN embedding: a prompt holding it gets
    NaN logits at its first token; the rows beside it, and one joining later, are unchanged."""
    broken_id = tokenizer.vocab_size
    model = poisoned(tokenizer, broken_id)
    prompts = [tokenizer.encode("the lazy"), [*tokenizer.encode("pack"), broken_id],
               tokenizer.encode("over the"), tokenizer.encode("five")]  # fmt: skip
    configs = [GREEDY, GREEDY, SAMPLED, SAMPLED]
    batcher = Batcher(model, tokenizer, max_batch=4)
    sequences = [batcher.add(p, c) for p, c in zip(prompts[:3], configs, strict=False)]
    batcher.step()
    sequences.append(batcher.add(prompts[3], configs[3]))  # joins after the error
    run(batcher)
    broken = sequences[1]
    assert broken.finished and broken.continuation.stop_reason == "error"
    assert broken.error is not None and broken.continuation.token_ids == []
    assert broken.error.startswith("the model produced NaN or infinite logits at generated token 1")
    assert "--dtype float32" in broken.error
    alone = Generator(model, tokenizer)
    for i in (0, 2, 3):
        assert sequences[i].error is None
        expected = alone.generate(prompts[i], configs[i])
        assert sequences[i].continuation.token_ids == expected.token_ids, i
        assert sequences[i].continuation.stop_reason == expected.stop_reason


def test_nan_logits_midway_name_the_token_in_the_batcher_and_the_generator(tokenizer) -> None:
    """The clean model's 4th greedy token gets a NaN embedding: its first 3 tokens come out
    unchanged (the head is untied), and the 4th step's logits are NaN."""
    prompt = tokenizer.encode("the lazy")
    clean = Generator(decoder(tokenizer), tokenizer).generate(prompt, GREEDY).token_ids
    third = clean[2]
    assert third not in prompt + clean[:2], "pick a prompt whose 3rd token is new"
    model = poisoned(tokenizer, third)
    batcher = Batcher(model, tokenizer)
    sequence = batcher.add(prompt, GREEDY)
    run(batcher)
    assert sequence.continuation.token_ids == clean[:3]
    assert sequence.error is not None and "at generated token 4:" in sequence.error
    with pytest.raises(QkvError, match="NaN or infinite logits at generated token 4: "):
        Generator(model, tokenizer).generate(["over the", prompt], GREEDY)
    with pytest.raises(QkvError, match="NaN or infinite logits at generated token 4: "):
        list(Generator(model, tokenizer).stream(prompt, GREEDY))


# A batcher after a failed step


def test_abort_all_ends_every_sequence_with_the_error_and_the_batcher_works_again(
    tokenizer,
) -> None:
    """A step that raises (a prompt id past the model's embedding, which `add` does not check,
    fails its prefill) leaves rows running, joining and waiting: abort_all ends them all."""
    model = decoder(tokenizer, extra_ids=0)
    ids = [tokenizer.encode(t) for t in ("the quick", "pack my", "dog", "five")]
    batcher = Batcher(model, tokenizer, max_batch=3)
    running = [batcher.add(ids[0], SAMPLED), batcher.add(ids[1], GREEDY)]
    batcher.step()
    joining = batcher.add([tokenizer.vocab_size], GREEDY)
    waiting = batcher.add(ids[2], GREEDY)
    with pytest.raises(IndexError):
        batcher.step()
    ended = batcher.abort_all("the engine failed: IndexError")
    assert {id(s) for s in ended} == {id(s) for s in [*running, joining, waiting]}
    for sequence in ended:
        assert sequence.finished and sequence.error == "the engine failed: IndexError"
        assert sequence.continuation.stop_reason == "error"
    assert not batcher.busy and not batcher.caches and batcher.mask.numel() == 0
    after = [batcher.add(ids[3], SAMPLED), batcher.add(ids[2], GREEDY)]
    run(batcher)
    fresh = Batcher(model, tokenizer, max_batch=3)
    expected = [fresh.add(ids[3], SAMPLED), fresh.add(ids[2], GREEDY)]
    run(fresh)
    for got, want in zip(after, expected, strict=True):
        assert got.error is None and len(got.continuation.token_ids) == 8
        assert got.continuation.token_ids == want.continuation.token_ids
