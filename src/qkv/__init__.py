"""qkv: the Transformer as readable, tested code.

Data flow, one module per concept:
text -> tokens -> embeddings (nn.embedding) + positions (nn.position) -> blocks (nn.block:
attention, feed-forward, norm) -> logits (model.OutputHead) -> probabilities.
"""

from qkv.config import PRESETS, ModelConfig
from qkv.errors import ConfigError, QkvError
from qkv.model import DecoderLM, Encoder, EncoderDecoder, build_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ConfigError",
    "DecoderLM",
    "Encoder",
    "EncoderDecoder",
    "ModelConfig",
    "QkvError",
    "build_model",
]
