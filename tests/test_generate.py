"""Generation: the KV cache against full recomputation, batching, the window, stops, seeds."""

from __future__ import annotations

import warnings

import pytest
import torch

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.generate import Continuation, GenerationConfig, Generator, decode
from qkv.model import DecoderLM, Encoder
from qkv.tokenizer import Tokenizer

WINDOW = 16
TOLERANCE = 1e-5
TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"

# Every decoder flavour the cache must serve: additive positions (learned, sinusoidal), rotary
# positions, and grouped-query attention with an untied head.
FLAVOURS = {
    "learned": dict(position="learned"),
    "sinusoidal": dict(position="sinusoidal", norm_first=False, feed_forward="relu"),
    "rope": dict(position="rope", norm="rmsnorm", feed_forward="swiglu", bias=False),
    "rope-gqa": dict(
        position="rope", norm="rmsnorm", n_kv_heads=2, bias=False, tie_embeddings=False
    ),
}


def make_decoder(flavour: str, vocab_size: int = 48, seed: int = 0, **changes) -> DecoderLM:
    """init_std 0.1: logits of a few units, far enough apart for greedy decoding to be stable
    and small enough for fp32 to hold them to 1e-5 (PyTorch's default init gives ~40)."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=WINDOW,
        init_std=0.1,
        **{**FLAVOURS[flavour], **changes},
    )
    return DecoderLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_char([TEXT])


def make_generator(tokenizer: Tokenizer, flavour: str = "rope-gqa", seed: int = 0) -> Generator:
    return Generator(make_decoder(flavour, tokenizer.vocab_size, seed), tokenizer)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("prompt_lengths", [[5], [5, 2, 9]], ids=["single", "mixed-batch"])
@torch.no_grad()
def test_cached_decoding_gives_the_logits_of_full_recomputation_at_every_step(
    flavour: str, prompt_lengths: list[int]
) -> None:
    model = make_decoder(flavour)
    ids = torch.randint(1, 48, (sum(prompt_lengths),), generator=torch.Generator().manual_seed(2))
    prompts = [chunk.tolist() for chunk in ids.split(prompt_lengths)]
    greedy = GenerationConfig(temperature=0)
    cached = decode(model, prompts, greedy, pad_id=0)
    recomputed = decode(model, prompts, GenerationConfig(temperature=0, use_cache=False), 0)
    sequences = [list(p) for p in prompts]
    for _ in range(3 * WINDOW):  # crosses the window, so the sliding re-encode is covered too
        (token, logits), (token_full, logits_full) = next(cached), next(recomputed)
        assert (logits - logits_full).abs().max() <= TOLERANCE
        assert torch.equal(token, token_full)
        within_window = max(map(len, sequences)) <= WINDOW  # the batch slides as one
        for row, sequence in enumerate(sequences):
            if within_window:  # the plainest reference: the model on the row alone
                alone = model(torch.tensor([sequence]))[0, -1]
                assert (logits[row] - alone).abs().max() <= TOLERANCE
                assert token[row] == alone.argmax()
            sequence.append(int(token[row]))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_batched_prompts_of_mixed_lengths_generate_what_each_does_alone(
    tokenizer: Tokenizer, flavour: str
) -> None:
    generator = make_generator(tokenizer, flavour)
    prompts = ["the qu", "a", "pack my"]  # + 8 new tokens: the batch stays within the window
    options = dict(max_new_tokens=WINDOW - 8, temperature=0)
    together = generator.generate(prompts, **options)
    alone = [generator.generate(prompt, **options) for prompt in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "recomputed"])
@torch.no_grad()
def test_each_row_of_a_batch_slides_its_own_window_as_it_would_alone(cache: bool) -> None:
    model = make_decoder("rope-gqa")
    ids = torch.randint(1, 48, (21,), generator=torch.Generator().manual_seed(3))
    prompts = [chunk.tolist() for chunk in ids.split([2, 7, 12])]
    config = GenerationConfig(temperature=0, use_cache=cache)
    together = decode(model, prompts, config, pad_id=0)
    alone = [decode(model, [prompt], config, pad_id=0) for prompt in prompts]
    for _ in range(3 * WINDOW):  # every row crosses the window, each at its own step
        token, logits = next(together)
        for row, single in enumerate(alone):
            single_token, single_logits = next(single)
            assert (logits[row] - single_logits[0]).abs().max() <= TOLERANCE
            assert token[row] == single_token[0]


def test_stop_may_be_one_string_and_top_k_zero_keeps_every_token() -> None:
    config = GenerationConfig(stop="of the", top_k=0)
    assert config.stop == ("of the",) and config.top_k is None
    assert GenerationConfig(stop=None).stop == ()


def test_temperature_zero_generation_is_a_plain_argmax_loop(tokenizer: Tokenizer) -> None:
    generator = make_generator(tokenizer)
    completion = generator.generate("the lazy", max_new_tokens=8, temperature=0)
    ids = tokenizer.encode("the lazy")
    with torch.no_grad():
        for _ in range(len(completion.token_ids)):
            ids.append(int(generator.model(torch.tensor([ids]))[0, -1].argmax()))
    assert completion.token_ids == ids[len(tokenizer.encode("the lazy")) :]


def test_repetition_penalty_decodes_as_hugging_face_penalises_the_whole_text(
    tokenizer: Tokenizer,
) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    generator = make_generator(tokenizer)
    options = dict(max_new_tokens=WINDOW - 8, temperature=0, repetition_penalty=1.8)
    completion = generator.generate(["over the", "dog"], **options)[0]
    penalty = RepetitionPenaltyLogitsProcessor(penalty=1.8)
    ids = torch.tensor([tokenizer.encode("over the")])
    with torch.no_grad():
        for _ in range(len(completion.token_ids)):
            scores = penalty(ids, generator.model(ids)[:, -1])
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    assert completion.token_ids == ids[0, len(tokenizer.encode("over the")) :].tolist()


def test_a_seed_reproduces_a_sample_and_another_seed_changes_it(tokenizer: Tokenizer) -> None:
    generator = make_generator(tokenizer)
    options = dict(max_new_tokens=12, temperature=1.0, top_k=None, stop=())
    first = generator.generate(["fox", "dog"], seed=5, **options)
    again = generator.generate(["fox", "dog"], seed=5, **options)
    other = generator.generate(["fox", "dog"], seed=6, **options)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    # A prompt's sample does not depend on the batch it is in.
    assert generator.generate("dog", seed=5, **options).token_ids == first[1].token_ids


def test_streamed_pieces_add_up_to_the_completion(tokenizer: Tokenizer) -> None:
    generator = make_generator(tokenizer, seed=3)
    options = dict(max_new_tokens=20, temperature=1.0, seed=1, stop=("xx",))
    pieces = list(generator.stream("jumps", **options))
    assert "".join(pieces) == generator.generate("jumps", **options).text
    assert len(pieces) > 1


def test_a_stop_string_ends_the_text_before_it(tokenizer: Tokenizer) -> None:
    # The first of a few random models whose greedy text runs 6 characters before <|endoftext|>.
    for seed in range(10):
        generator = make_generator(tokenizer, seed=seed)
        free = generator.generate("over the", max_new_tokens=12, temperature=0)
        if len(free.text) >= 6:
            break
    stop = free.text[3:5]
    stopped = generator.generate("over the", max_new_tokens=12, temperature=0, stop=[stop])
    assert stopped.text == free.text[: free.text.find(stop)]
    assert stopped.stop_reason == "stop" and stop not in stopped.text


def test_streaming_holds_back_an_incomplete_utf8_character() -> None:
    # A byte-level BPE that never saw these characters spells each one with 3 byte tokens.
    bpe = Tokenizer.train_bpe([TEXT], vocab_size=300)
    row = Continuation("", [], 0, ())
    pieces = []
    for token in bpe.encode("日本 ok"):
        row.add(token, bpe)
        pieces.append(row.new_text())
    assert "".join(pieces) == "日本 ok"
    assert not any("\ufffd" in piece for piece in pieces)


def test_long_prompts_are_cut_from_the_left_with_a_warning_and_decoding_slides_past_the_window(
    tokenizer: Tokenizer,
) -> None:
    generator = make_generator(tokenizer)
    prompt = TEXT[:40]
    with pytest.warns(UserWarning, match=f"context window is {WINDOW}"):
        completion = generator.generate(prompt, max_new_tokens=5, temperature=0)
    assert completion.truncated_tokens == 40 - WINDOW and completion.prompt_tokens == WINDOW
    # The cut prompt continues as the last WINDOW tokens alone would.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tail = generator.generate(prompt[-WINDOW:], max_new_tokens=5, temperature=0)
    assert completion.token_ids == tail.token_ids


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_p=0.0), "top-p must be in"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=-1), "top-k must be >= 0"),
        (dict(max_new_tokens=0), "max-new-tokens must be at least 1"),
        (dict(repetition_penalty=0.0), "repetition-penalty must be > 0"),
        (dict(stop=("",)), "stop strings must not be empty"),
    ],
)
def test_absurd_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(QkvError, match=message):
        GenerationConfig(**options)


def test_empty_or_invalid_prompts_and_encoders_are_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(QkvError, match="prompt 2 is empty"):
        make_generator(tokenizer).generate(["fox", ""])
    with pytest.raises(QkvError, match="prompt 1 is not valid UTF-8"):
        make_generator(tokenizer).generate("caf\udce9")  # a byte os.fsdecode could not decode
    assert make_generator(tokenizer).generate([]) == []
    encoder = Encoder(ModelConfig(arch="encoder", vocab_size=tokenizer.vocab_size, d_model=16))
    with pytest.raises(QkvError, match="needs a decoder-only model"):
        Generator(encoder, tokenizer)  # type: ignore[arg-type]


def test_token_id_prompts_generate_what_their_text_does(tokenizer: Tokenizer) -> None:
    generator = make_generator(tokenizer)
    texts = ["the quick", "a"]
    ids = [tokenizer.encode(t) for t in texts]
    by_text = generator.generate(texts, max_new_tokens=8, temperature=0)
    by_ids = generator.generate([ids[0], texts[1]], max_new_tokens=8, temperature=0)
    assert [c.to_dict() for c in by_ids] == [c.to_dict() for c in by_text]
    one = generator.generate(ids[0], max_new_tokens=8, temperature=0)
    assert one.prompt == "the quick" and one.token_ids == by_text[0].token_ids
    assert "".join(generator.stream(ids[0], max_new_tokens=8, temperature=0)) == one.text
    with pytest.raises(QkvError, match="prompt 2 must be text or a list of token ids from 0 to"):
        generator.generate([ids[0], [tokenizer.vocab_size]])
    with pytest.raises(QkvError, match="prompt 1 is empty"):
        generator.generate([[]])


def test_prompt_files_are_lines_unless_json_objects(tmp_path) -> None:
    from qkv.generate import read_prompts

    code = tmp_path / "code.txt"
    code.write_text("{x for x in y}\nreturn x\n\n", encoding="utf-8")
    assert read_prompts(code) == ["{x for x in y}", "return x"]
    records = tmp_path / "records.txt"
    records.write_text('\ufeff{"prompt": "a"}\n{"prompt": "b"}\n', encoding="utf-8")  # with a BOM
    assert read_prompts(records) == ["a", "b"]


@torch.no_grad()
def test_ids_past_the_tokenizer_are_never_chosen(tokenizer: Tokenizer) -> None:
    """A model vocabulary padded past its tokenizer (as Hugging Face models often are): the
    padding rows, made the likeliest, are still never sampled or picked greedily."""
    model = make_decoder("rope-gqa", tokenizer.vocab_size + 8)
    model.head.weight[tokenizer.vocab_size :] = 10 * model.head.weight.abs().max()
    generator = Generator(model, tokenizer)
    for temperature in (0.0, 1.0):
        completion = generator.generate("the quick", max_new_tokens=12, temperature=temperature)
        assert len(completion.token_ids) == 12
        assert max(completion.token_ids) < tokenizer.vocab_size
