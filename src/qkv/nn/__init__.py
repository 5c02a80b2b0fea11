"""The Transformer's building blocks, one concept per module; nothing here does I/O."""

from qkv.nn.attention import (
    MultiHeadAttention,
    causal_mask,
    explicit_attention,
    fused_attention,
)
from qkv.nn.block import DecoderBlock, EncoderBlock
from qkv.nn.embedding import TokenEmbedding
from qkv.nn.feedforward import FeedForward, GatedFeedForward, build_feed_forward
from qkv.nn.kv_cache import KVCache
from qkv.nn.norm import LayerNorm, RMSNorm, build_norm
from qkv.nn.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "GatedFeedForward",
    "KVCache",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "TokenEmbedding",
    "apply_rotary",
    "build_feed_forward",
    "build_norm",
    "causal_mask",
    "explicit_attention",
    "fused_attention",
    "sinusoidal_table",
]
