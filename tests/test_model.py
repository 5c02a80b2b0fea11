"""The three models end to end: parity with nn.Transformer, shapes, masks, KV cache, tied head."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch_reference import (
    TOLERANCE,
    copy_decoder_layer,
    copy_encoder_layer,
    copy_norm,
    key_padding_mask,
    max_abs_diff,
    perturb,
    right_padding_mask,
)

from qkv.config import ARCHS, ModelConfig
from qkv.model import DecoderLM, Encoder, EncoderDecoder, build_model, probabilities

VOCAB, D_MODEL, N_HEADS, N_LAYERS, D_FF, MAX_SEQ = 32, 16, 4, 2, 32, 16
BATCH, SEQ = 2, 8

# Small configs covering every position / norm / feed-forward choice, GQA and MQA, tied and untied.
VARIANTS: dict[str, dict[str, object]] = {
    "learned-layernorm-gelu-tied": dict(position="learned", feed_forward="gelu"),
    "sinusoidal-postnorm-relu": dict(position="sinusoidal", norm_first=False, feed_forward="relu"),
    "rope-rmsnorm-swiglu-gqa-untied": dict(
        position="rope",
        norm="rmsnorm",
        feed_forward="swiglu",
        n_kv_heads=2,
        bias=False,
        tie_embeddings=False,
    ),
    "nopos-rmsnorm-geglu-mqa": dict(
        position="none", norm="rmsnorm", feed_forward="geglu", n_kv_heads=1
    ),
}
LEARNED = VARIANTS["learned-layernorm-gelu-tied"]
SINUSOIDAL = VARIANTS["sinusoidal-postnorm-relu"]
ROPE_GQA = VARIANTS["rope-rmsnorm-swiglu-gqa-untied"]


def make_config(arch: str = "decoder", **changes: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        arch=arch,
        vocab_size=VOCAB,
        d_model=D_MODEL,
        n_heads=N_HEADS,
        n_layers=N_LAYERS,
        d_ff=D_FF,
        max_seq_len=MAX_SEQ,
        dropout=0.0,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def make_model(arch: str = "decoder", seed: int = 0, **changes: object) -> nn.Module:
    """A model in eval mode; init_std=None (PyTorch's default init) unless given, so that
    differences between positions are large enough for the checks below to see."""
    changes.setdefault("init_std", None)
    torch.manual_seed(seed)
    return build_model(make_config(arch, **changes)).eval()


def random_ids(batch: int = BATCH, seq: int = SEQ, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def left_padding_mask(lengths: list[int], seq_len: int) -> Tensor:
    """(batch, seq_len) attention_mask with the lengths[b] real tokens at the end of each row."""
    return right_padding_mask(lengths, seq_len).flip(-1)


def positions_of(attention_mask: Tensor) -> Tensor:
    """Real tokens numbered 0, 1, ... whatever padding precedes them (padding gets 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# --- parity with torch.nn.Transformer -------------------------------------------------------


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@torch.no_grad()
def test_encoder_decoder_matches_torch_transformer(norm_first: bool) -> None:
    config = make_config(
        "encoder-decoder",
        position="sinusoidal",
        norm="layernorm",
        norm_eps=1e-5,
        feed_forward="relu",
        norm_first=norm_first,
        final_norm=True,
    )
    torch.manual_seed(0)
    model = EncoderDecoder(config).eval()
    reference = nn.Transformer(
        D_MODEL,
        N_HEADS,
        num_encoder_layers=N_LAYERS,
        num_decoder_layers=N_LAYERS,
        dim_feedforward=D_FF,
        dropout=0.0,
        batch_first=True,
        norm_first=norm_first,
    )
    perturb(reference, seed=3).eval()
    for src, dst in zip(reference.encoder.layers, model.encoder_blocks, strict=True):
        copy_encoder_layer(src, dst)
    for src, dst in zip(reference.decoder.layers, model.decoder_blocks, strict=True):
        copy_decoder_layer(src, dst)
    copy_norm(reference.encoder.norm, model.encoder_norm)
    copy_norm(reference.decoder.norm, model.decoder_norm)

    source_ids, target_ids = random_ids(seq=7, seed=1), random_ids(seq=6, seed=2)
    source_mask = right_padding_mask([7, 4], 7)
    padding = key_padding_mask(source_mask)
    expected = reference(
        model.embedder(source_ids)[0],
        model.embedder(target_ids)[0],
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(target_ids.shape[-1]),
        src_key_padding_mask=padding,
        memory_key_padding_mask=padding,
        tgt_is_causal=True,
    )
    memory = model.encode(source_ids, source_mask)
    actual = model.decode_hidden_states(target_ids, memory, source_mask)
    assert max_abs_diff(actual, expected) <= TOLERANCE


# --- every architecture and variant: shapes, finiteness, probabilities -----------------------


def _run(model: nn.Module, arch: str, padded: bool) -> tuple[Tensor, tuple[int, ...]]:
    """Logits from a batch with one short row (left-padded for the decoder, right otherwise)."""
    if arch == "encoder-decoder":
        source, target = random_ids(seq=7, seed=1), random_ids(seq=5, seed=2)
        source_mask = right_padding_mask([7, 3], 7) if padded else None
        target_mask = right_padding_mask([5, 2], 5) if padded else None
        return model(source, target, source_mask, target_mask), (BATCH, 5, VOCAB)
    ids = random_ids()
    if not padded:
        return model(ids), (BATCH, SEQ, VOCAB)
    if arch == "decoder":
        mask = left_padding_mask([SEQ, 3], SEQ)
        return model(ids, mask, positions_of(mask)), (BATCH, SEQ, VOCAB)
    return model(ids, right_padding_mask([SEQ, 3], SEQ)), (BATCH, SEQ, VOCAB)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_every_model_gives_finite_logits_of_the_right_shape_and_normalised_probabilities(
    arch: str, variant: str, padded: bool
) -> None:
    model = make_model(arch, init_std=0.02, **VARIANTS[variant])
    logits, shape = _run(model, arch, padded)
    assert logits.shape == shape
    assert torch.isfinite(logits).all()
    probs = probabilities(logits)
    assert probs.shape == shape
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(shape[:-1]), atol=1e-5, rtol=0)


# --- DecoderLM: causality and padding --------------------------------------------------------


@pytest.mark.parametrize("variant", [LEARNED, ROPE_GQA], ids=["learned", "rope"])
@torch.no_grad()
def test_decoder_lm_logits_never_depend_on_later_tokens(variant: dict[str, object]) -> None:
    model = make_model("decoder", **variant)
    ids = random_ids()
    base = model(ids)
    for t in range(SEQ):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        logits = model(changed)
        if t:
            assert max_abs_diff(logits[:, :t], base[:, :t]) <= TOLERANCE
        assert max_abs_diff(logits[:, t], base[:, t]) > 1e-3  # position t does see its token


@pytest.mark.parametrize(
    "variant", [LEARNED, SINUSOIDAL, ROPE_GQA], ids=["learned", "sinusoidal", "rope-gqa"]
)
@torch.no_grad()
def test_decoder_lm_left_padding_with_positions_matches_unpadded_logits(
    variant: dict[str, object],
) -> None:
    model = make_model("decoder", **variant)
    lengths = [SEQ, 5]
    ids = random_ids()
    mask = left_padding_mask(lengths, SEQ)
    logits = model(ids, mask, positions_of(mask))
    for row, length in enumerate(lengths):
        alone = model(ids[row : row + 1, SEQ - length :])
        assert max_abs_diff(logits[row, SEQ - length :], alone[0]) <= TOLERANCE
    # The padding tokens' ids do not matter either.
    repadded = ids.masked_fill(mask == 0, 7)
    again = model(repadded, mask, positions_of(mask))
    assert max_abs_diff(again[mask.bool()], logits[mask.bool()]) <= TOLERANCE


@pytest.mark.parametrize(
    "variant", [LEARNED, SINUSOIDAL, ROPE_GQA], ids=["learned", "sinusoidal", "rope-gqa"]
)
@torch.no_grad()
def test_encoder_real_positions_ignore_right_padding(variant: dict[str, object]) -> None:
    model = make_model("encoder", **variant)
    assert isinstance(model, Encoder)
    lengths = [SEQ, 5]
    ids = random_ids()
    mask = right_padding_mask(lengths, SEQ)
    real = mask.bool()
    hidden = model.hidden_states(ids, mask)
    other_padding = model.hidden_states(ids.masked_fill(~real, 3), mask)
    assert max_abs_diff(other_padding[real], hidden[real]) <= TOLERANCE
    alone = model.hidden_states(ids[1:, : lengths[1]])
    assert max_abs_diff(hidden[1, : lengths[1]], alone[0]) <= TOLERANCE
    # Without the mask the padding does leak in, so the mask is what keeps it out.
    assert max_abs_diff(model.hidden_states(ids)[1, : lengths[1]], alone[0]) > 1e-3


# --- fused vs explicit attention --------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize(
    "variant", [LEARNED, ROPE_GQA, VARIANTS["nopos-rmsnorm-geglu-mqa"]], ids=["mha", "gqa", "mqa"]
)
@torch.no_grad()
def test_fused_and_explicit_kernels_give_the_same_decoder_logits(
    variant: dict[str, object], padded: bool
) -> None:
    explicit = make_model("decoder", kernels="explicit", **variant)
    fused = make_model("decoder", seed=1, kernels="fused", **variant)
    fused.load_state_dict(explicit.state_dict())
    ids = random_ids()
    mask = left_padding_mask([SEQ, 4], SEQ) if padded else None
    positions = positions_of(mask) if padded else None
    expected = explicit(ids, mask, positions)
    actual = fused(ids, mask, positions)
    assert max_abs_diff(actual, expected) <= TOLERANCE


# --- incremental decoding through the KV cache -------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("kernels", ["fused", "explicit"])
@pytest.mark.parametrize(
    "variant", [LEARNED, SINUSOIDAL, ROPE_GQA], ids=["learned", "sinusoidal", "rope-gqa"]
)
@torch.no_grad()
def test_kv_cache_decoding_matches_full_recomputation(
    variant: dict[str, object], kernels: str, padded: bool
) -> None:
    model = make_model("decoder", kernels=kernels, **variant)
    assert isinstance(model, DecoderLM)
    total, prompt = 11, 4
    ids = random_ids(seq=total)
    # Left padding of 2 in row 1: present in the prompt, so in the cache for every later step.
    mask = left_padding_mask([total, total - 2], total) if padded else torch.ones_like(ids)
    positions = positions_of(mask)
    caches = model.new_caches(BATCH, total)
    start = 0
    for end in [prompt, *range(prompt + 1, total + 1)]:
        step = model(
            ids[:, start:end],
            mask[:, :end] if padded else None,
            positions[:, start:end],
            caches,
        )
        full = model(ids[:, :end], mask[:, :end] if padded else None, positions[:, :end])
        real = mask[:, start:end].bool()
        assert max_abs_diff(step[real], full[:, start:end][real]) <= TOLERANCE
        start = end
    assert all(cache.length == total for cache in caches)


# --- tied and untied output head -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_head_shares_the_embedding_table_and_untied_head_has_its_own(arch: str) -> None:
    tied = make_model(arch, tie_embeddings=True)
    untied = make_model(arch, tie_embeddings=False)
    table = tied.embedder.token_embedding.weight
    h = torch.randn(BATCH, 3, D_MODEL)

    # Tied: the head is h E^T with the embedding table itself, no parameter of its own.
    assert list(tied.head.parameters()) == []
    torch.testing.assert_close(tied.head(h), h @ table.T)
    with torch.no_grad():
        table.mul_(2.0)  # an in-place change to the embedding is seen by the head: same storage
    torch.testing.assert_close(tied.head(h), h @ table.T)
    tied.head(h).sum().backward()
    assert table.grad is not None and (table.grad != 0).all()

    # Untied: a separate (vocab, d_model) weight in other storage.
    own = untied.head.weight
    assert isinstance(own, nn.Parameter) and own.shape == (VOCAB, D_MODEL)
    assert own.data_ptr() != untied.embedder.token_embedding.weight.data_ptr()
    torch.testing.assert_close(untied.head(h), h @ own.T)
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * D_MODEL
