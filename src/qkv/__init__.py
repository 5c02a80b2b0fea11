"""qkv: the Transformer as readable, tested code.

Data flow, one module per concept:
text -> tokens (tokenizer) -> embeddings (nn.embedding) + positions (nn.position) -> blocks
(nn.block: attention, feed-forward, norm) -> logits (model.OutputHead) -> loss (evaluation) or
next tokens (sampling, generate).

The names below are imported when first used, so that `import qkv.config` or `qkv --help` does
not load PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "qkv.config",
    "ModelConfig": "qkv.config",
    "TrainConfig": "qkv.config",
    "ConfigError": "qkv.errors",
    "QkvError": "qkv.errors",
    "Completion": "qkv.generate",
    "GenerationConfig": "qkv.generate",
    "Generator": "qkv.generate",
    "DecoderLM": "qkv.model",
    "Encoder": "qkv.model",
    "EncoderDecoder": "qkv.model",
    "build_model": "qkv.model",
    "SamplingConfig": "qkv.sampling",
    "load_model": "qkv.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """PEP 562: `qkv.Generator` imports qkv.generate on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qkv' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
