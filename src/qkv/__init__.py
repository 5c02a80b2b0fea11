"""qkv: the Transformer as readable, tested code.

Data flow, one module per concept:
text -> tokens -> embeddings (nn.embedding) + positions (nn.position) -> blocks (nn.block:
attention, feed-forward, norm) -> logits (model.OutputHead) -> probabilities -> next tokens
(sampling, generate).
"""

from qkv.config import PRESETS, ModelConfig
from qkv.errors import ConfigError, QkvError
from qkv.generate import Completion, GenerationConfig, Generator
from qkv.model import DecoderLM, Encoder, EncoderDecoder, build_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Completion",
    "ConfigError",
    "DecoderLM",
    "Encoder",
    "EncoderDecoder",
    "GenerationConfig",
    "Generator",
    "ModelConfig",
    "QkvError",
    "build_model",
]
