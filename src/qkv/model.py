"""The three Transformer models built from qkv.nn blocks, and the output head.

- DecoderLM: decoder-only language model (GPT, Llama): causal self-attention, next-token logits.
- Encoder: encoder-only (BERT): bidirectional self-attention, a logit per position (masked LM).
- EncoderDecoder: the original paper's model: the decoder cross-attends to the encoded source.
All take token ids (batch, seq) and return logits (batch, seq, vocab_size); `probabilities` is
their softmax. `attention_mask` (batch, seq) marks real tokens with 1 and padding with 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.nn.attention import additive_mask, causal_mask, padding_mask
from qkv.nn.block import BlockConfig, DecoderBlock, EncoderBlock
from qkv.nn.embedding import TokenEmbedding
from qkv.nn.kv_cache import KVCache
from qkv.nn.linear import linear
from qkv.nn.norm import LayerNorm, RMSNorm, build_norm
from qkv.nn.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    linear_scaling,
    llama3_scaling,
)
from qkv.nn.recording import Recordable


def block_config(config: ModelConfig) -> BlockConfig:
    """The part of `config` each block is built from."""
    return BlockConfig(
        d_model=config.d_model,
        n_heads=config.n_heads,
        d_ff=config.d_ff,
        n_kv_heads=config.n_kv_heads,
        feed_forward=config.feed_forward,
        norm=config.norm,
        norm_eps=config.norm_eps,
        norm_first=config.norm_first,
        bias=config.bias,
        dropout=config.dropout,
        kernels=config.kernels,
        qk_norm=config.qk_norm,
        head_dim=config.head_dim,
        qkv_bias=config.qkv_bias,
        attention_scale=config.attention_scale,
        attention_softcap=config.attention_softcap,
        norm_unit_offset=config.norm_unit_offset,
        post_norms=config.post_norms,
    )


def rope_scaling(config: ModelConfig) -> Callable[[Tensor], Tensor] | None:
    """The frequency map of `config.rope_scaling` (None: plain RoPE)."""
    if config.rope_scaling == "llama3":
        return llama3_scaling(
            config.rope_factor,
            config.rope_low_freq_factor,
            config.rope_high_freq_factor,
            config.rope_original_context,
        )
    if config.rope_scaling == "linear":
        return linear_scaling(config.rope_factor)
    return None


def _norm(config: ModelConfig) -> LayerNorm | RMSNorm:
    fused = config.kernels == "fused"
    return build_norm(
        config.norm, config.d_model, config.norm_eps, config.bias, fused, config.norm_unit_offset
    )


class OutputHead(Recordable, nn.Module):
    """logits = h W^T: (batch, seq, d_model) -> (batch, seq, vocab_size); with a `softcap` c,
    logits = c tanh(h W^T / c), each within (-c, c) (Gemma 2; modded-nanogpt).

    Tied to the embedding, W is the embedding table E itself (no new parameters).
    """

    FORMULAS: ClassVar[dict[str, str]] = {
        "logits": "logits_i = h_i W^T: one score per vocabulary entry (W = the embedding table E "
        "when tied){capped}"
    }

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        tied_to: TokenEmbedding | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.softcap = softcap
        self.capped = "" if softcap is None else f", capped: c tanh(logits / c), c = {softcap:g}"
        # A tied table is held outside this module's tree, so it is stored and counted once.
        self.tied_to = (tied_to,) if tied_to is not None else ()
        self.weight = None
        if tied_to is None:
            self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * d_model**-0.5)

    @property
    def matrix(self) -> Tensor:
        """W (vocab_size, d_model): the embedding table when tied."""
        return self.tied_to[0].weight if self.tied_to else self.weight

    def forward(self, h: Tensor) -> Tensor:
        logits = linear(h, self.matrix)
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if self.recorder is not None:
            self.recorder("logits", logits)
        return logits


PROBABILITIES_FORMULA = (
    "p_i(w) = exp(logit_i(w)) / sum_v exp(logit_i(v)): softmax over the vocabulary"
)


def probabilities(logits: Tensor) -> Tensor:
    """softmax(logits)_v = exp(logit_v) / sum_u exp(logit_u), over the vocabulary."""
    return torch.softmax(logits.float(), dim=-1)


class Embedder(Recordable, nn.Module):
    """x = dropout(Norm(E[ids] + PE[positions] + T[types])) for additive positions (T: BERT's
    token types, Norm: BERT's embedding norm, each only if configured); RoPE angles for rotary
    positions (and `local_rotary`'s, of rope_local_base, for a model whose sliding layers turn
    by their own base: Gemma 3)."""

    FORMULAS: ClassVar[dict[str, str]] = {
        "embeddings_plus_positions": "x_i = E[id_i] + PE(i) (+ T[type_i] where the model has token "
        "types): the sum the first block reads (after Norm where the model normalises it)"
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.token_embedding = TokenEmbedding(
            config.vocab_size, config.d_model, config.scale_embeddings
        )
        self.position: nn.Module | None = None
        self.rotary: RotaryEmbedding | None = None
        self.local_rotary: RotaryEmbedding | None = None
        if config.position == "sinusoidal":
            self.position = SinusoidalPositionalEncoding(config.max_seq_len, config.d_model)
        elif config.position == "learned":
            self.position = LearnedPositionalEmbedding(config.max_seq_len, config.d_model)
        elif config.position == "rope":
            self.rotary = RotaryEmbedding(
                config.head_dim, config.max_seq_len, config.rope_base, rope_scaling(config)
            )
            if config.rope_local_base is not None:
                self.local_rotary = RotaryEmbedding(
                    config.head_dim, config.max_seq_len, config.rope_local_base
                )
        self.token_type = (
            TokenEmbedding(config.type_vocab_size, config.d_model)
            if config.type_vocab_size
            else None
        )
        self.norm = _norm(config) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.dropout)
        self.max_seq_len = config.max_seq_len

    def positions(self, token_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """`positions`, or 0..seq-1 (1, seq) for ids (batch, seq) that fit max_seq_len."""
        if positions is not None:
            return positions
        if token_ids.shape[-1] > self.max_seq_len:
            raise QkvError(
                f"{token_ids.shape[-1]} tokens do not fit the model's context "
                f"(max_seq_len={self.max_seq_len}); shorten the input"
            )
        return torch.arange(token_ids.shape[-1], device=token_ids.device)[None, :]

    def forward(
        self, token_ids: Tensor, positions: Tensor | None = None, token_types: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """ids (batch, seq) -> (x (batch, seq, d_model), rotary (cos, sin) or None).

        `positions` (batch or 1, seq) defaults to 0..seq-1; given ones must be < max_seq_len.
        `token_types` (batch, seq) default to 0.
        """
        positions = self.positions(token_ids, positions)
        x = self.token_embedding(token_ids)
        if self.position is not None:
            x = x + self.position(positions)
        if self.token_type is not None:
            types = torch.zeros_like(token_ids) if token_types is None else token_types
            x = x + self.token_type(types)
        if self.recorder is not None and (self.position is not None or self.token_type is not None):
            self.recorder("embeddings_plus_positions", x)
        if self.norm is not None:
            x = self.norm(x)
        rotary = self.rotary(positions) if self.rotary is not None else None
        return self.dropout(x), rotary


def _self_attention_mask(
    attention_mask: Tensor | None, q_len: int, causal: bool, dtype: torch.dtype
) -> Tensor | None:
    """Combine padding (and causality) into one float mask, or None when nothing is masked."""
    if attention_mask is None:
        return None
    allowed = padding_mask(attention_mask)
    if causal:
        allowed = allowed & causal_mask(q_len, attention_mask.shape[-1], attention_mask.device)
    return additive_mask(allowed, dtype)


def _window_mask(
    attention_mask: Tensor | None, q_len: int, k_len: int, window: int, like: Tensor
) -> Tensor | None:
    """Causal within the sliding window (query i sees keys j with 0 <= i - j < window), padding
    hidden, as a float mask like `like`; None when nothing is hidden but the future."""
    if k_len <= window and attention_mask is None:
        return None
    allowed = causal_mask(q_len, k_len, like.device, window)
    if attention_mask is not None:
        allowed = padding_mask(attention_mask) & allowed
    return additive_mask(allowed, like.dtype)


def _final_norm(config: ModelConfig) -> nn.Module:
    return _norm(config) if config.final_norm else nn.Identity()


class _Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def make_head(self, embedder: Embedder) -> OutputHead:
        tied = embedder.token_embedding if self.config.tie_embeddings else None
        return OutputHead(
            self.config.d_model, self.config.vocab_size, tied, self.config.logit_softcap
        )

    def init_weights(self) -> None:
        """N(0, init_std) for matrices and embeddings, zero biases; residual outputs scaled by
        1/sqrt(2 n_layers) (GPT-2), or zero with `zero_init` (as is an untied head: each block
        starts as the identity, the model as the uniform guess). `init_std = None` keeps
        PyTorch's default per-module init."""
        std = self.config.init_std
        if std is None:
            return
        for name, param in self.named_parameters():
            if param.dim() < 2:
                if "norm" not in name:
                    nn.init.zeros_(param)
                continue
            scale = 1.0
            if name.endswith(("o_proj.weight", "w2.weight", "down.weight")):
                scale = 0.0 if self.config.zero_init else 1.0 / math.sqrt(2 * self.config.n_layers)
            if name == "head.weight" and self.config.zero_init:
                scale = 0.0
            nn.init.normal_(param, std=std * scale)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _Stack(_Model):
    """Embedder -> n_layers blocks of `block` -> final norm -> head: a decoder or an encoder."""

    block: type[DecoderBlock] | type[EncoderBlock]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.embedder = Embedder(config)
        self.blocks = nn.ModuleList(
            self.block(block_config(config)) for _ in range(config.n_layers)
        )
        self.final_norm = _final_norm(config)
        self.head = self.make_head(self.embedder)
        self.init_weights()


class DecoderLM(_Stack):
    """Decoder-only LM: logits for token t+1 from tokens <= t."""

    block = DecoderBlock

    def hidden_states(
        self,
        token_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """(batch, seq) -> final hidden states (batch, seq, d_model).

        With `caches` (one per block) only the new tokens are passed; give their `positions`, and
        an `attention_mask` covering cached + new tokens if there is padding.
        """
        positions = self.embedder.positions(token_ids, positions)
        x, rotary = self.embedder(token_ids, positions)
        local = self.embedder.local_rotary
        local_rotary = rotary if local is None else local(positions)
        q_len = token_ids.shape[-1]
        mask = _self_attention_mask(attention_mask, q_len, True, x.dtype)
        window, windowed = self.config.sliding_window, None
        if window is not None:
            k_len = q_len + (caches[0].length if caches else 0)
            windowed = _window_mask(attention_mask, q_len, k_len, window, x)
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            slides = self.config.slides(i)
            sees, turns = (windowed, local_rotary) if slides else (mask, rotary)
            x = block(x, mask=sees, is_causal=sees is None, rotary=turns, cache=cache)
        return self.final_norm(x)

    def forward(
        self,
        token_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """(batch, seq) -> next-token logits (batch, seq, vocab_size)."""
        return self.head(self.hidden_states(token_ids, attention_mask, positions, caches))

    def new_caches(self, batch: int, capacity: int | None = None) -> list[KVCache]:
        """One empty KVCache per block for `capacity` positions (default: max_seq_len)."""
        config, weight = self.config, self.head.matrix
        return [
            KVCache(
                batch,
                config.n_kv_heads,
                capacity or config.max_seq_len,
                config.head_dim,
                weight.dtype,
                weight.device,
            )
            for _ in self.blocks
        ]


class Encoder(_Stack):
    """Encoder-only model: every position attends to every other (non-padding) position."""

    block = EncoderBlock

    def hidden_states(
        self,
        token_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_types: Tensor | None = None,
    ) -> Tensor:
        """(batch, seq) -> contextual vectors (batch, seq, d_model)."""
        x, rotary = self.embedder(token_ids, token_types=token_types)
        mask = _self_attention_mask(attention_mask, token_ids.shape[-1], False, x.dtype)
        for block in self.blocks:
            x = block(x, mask=mask, rotary=rotary)
        return self.final_norm(x)

    def forward(self, token_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(batch, seq) -> per-position vocabulary logits (batch, seq, vocab_size)."""
        return self.head(self.hidden_states(token_ids, attention_mask))


class EncoderDecoder(_Model):
    """Encoder over the source, decoder over the target that cross-attends to the encoder output.

    Source and target share one vocabulary and one embedding table, as in the paper.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.embedder = Embedder(config)
        self.encoder_blocks = nn.ModuleList(
            EncoderBlock(block_config(config)) for _ in range(config.n_layers)
        )
        self.encoder_norm = _final_norm(config)
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(block_config(config), cross_attention=True) for _ in range(config.n_layers)
        )
        self.decoder_norm = _final_norm(config)
        self.head = self.make_head(self.embedder)
        self.init_weights()

    def encode(self, source_ids: Tensor, source_mask: Tensor | None = None) -> Tensor:
        """Source ids (batch, src_seq) -> memory (batch, src_seq, d_model)."""
        x, rotary = self.embedder(source_ids)
        mask = _self_attention_mask(source_mask, source_ids.shape[-1], False, x.dtype)
        for block in self.encoder_blocks:
            x = block(x, mask=mask, rotary=rotary)
        return self.encoder_norm(x)

    def decode_hidden_states(
        self,
        target_ids: Tensor,
        memory: Tensor,
        source_mask: Tensor | None = None,
        target_mask: Tensor | None = None,
    ) -> Tensor:
        """Target ids (batch, tgt_seq) + memory -> decoder states (batch, tgt_seq, d_model)."""
        x, rotary = self.embedder(target_ids)
        mask = _self_attention_mask(target_mask, target_ids.shape[-1], True, x.dtype)
        memory_mask = (
            None if source_mask is None else additive_mask(padding_mask(source_mask), x.dtype)
        )
        for block in self.decoder_blocks:
            x = block(
                x, memory, mask=mask, is_causal=mask is None, memory_mask=memory_mask, rotary=rotary
            )
        return self.decoder_norm(x)

    def forward(
        self,
        source_ids: Tensor,
        target_ids: Tensor,
        source_mask: Tensor | None = None,
        target_mask: Tensor | None = None,
    ) -> Tensor:
        """(batch, src_seq), (batch, tgt_seq) -> next-target-token logits (batch, tgt_seq, V)."""
        memory = self.encode(source_ids, source_mask)
        return self.head(self.decode_hidden_states(target_ids, memory, source_mask, target_mask))


MODELS: dict[str, type[_Model]] = {
    "decoder": DecoderLM,
    "encoder": Encoder,
    "encoder-decoder": EncoderDecoder,
}


def build_model(config: ModelConfig) -> DecoderLM | Encoder | EncoderDecoder:
    """The model class named by config.arch, freshly initialised."""
    return MODELS[config.arch](config)


def model_from_tensors(
    config: ModelConfig, tensors: dict[str, Tensor]
) -> DecoderLM | Encoder | EncoderDecoder:
    """The model of `config` holding `tensors` themselves (their dtype, no copy): built on the
    meta device (no memory, no initialisation), filled by load_state_dict(assign=True), its
    computed buffers (RoPE and sinusoid tables) made anew; peak memory is the weights' once."""
    with torch.device("meta"):
        model = build_model(config.replace(init_std=None))
    model.load_state_dict(tensors, assign=True)
    for module in model.modules():
        if isinstance(module, (RotaryEmbedding, SinusoidalPositionalEncoding)):
            module.reset_buffers()
    return model
