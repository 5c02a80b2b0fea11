"""The Transformer's building blocks, one concept per module; nothing here does I/O."""

from qkv.nn.attention import (
    MultiHeadAttention,
    causal_mask,
    explicit_attention,
    fused_attention,
)
from qkv.nn.block import BlockConfig, DecoderBlock, EncoderBlock
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
from qkv.nn.recording import Record, Recordable, recording

__all__ = [
    "BlockConfig",
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "GatedFeedForward",
    "KVCache",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RMSNorm",
    "Record",
    "Recordable",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "TokenEmbedding",
    "apply_rotary",
    "build_feed_forward",
    "build_norm",
    "causal_mask",
    "explicit_attention",
    "fused_attention",
    "recording",
    "sinusoidal_table",
]
