"""The key/value cache: what incremental decoding keeps of the tokens already seen.

Decoding token t+1 needs the keys and values of tokens 0..t in every layer. They do not change
once computed (causal attention: earlier tokens never see later ones), so each layer stores them
and only the newest token's K and V are computed per step: O(t) work per token instead of O(t^2).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """One attention layer's keys and values in preallocated buffers (batch, n_kv_heads, capacity,
    d_k): `update` writes the new ones after those held and returns views of all of them."""

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """key, value (batch, n_kv_heads, new, d_k) -> all keys, values (.., length + new, d_k)."""
        end = self.length + key.shape[-2]
        if end > self.capacity:
            raise ValueError(
                f"the cache holds {self.capacity} positions; {self.length} + {key.shape[-2]} "
                "do not fit (reset it and start from a shorter window)"
            )
        self.keys[:, :, self.length : end] = key
        self.values[:, :, self.length : end] = value
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reset(self) -> None:
        """Forget every position (the buffers are reused)."""
        self.length = 0
