"""The key/value cache: what incremental decoding keeps of the tokens already seen.

Decoding token t+1 needs the keys and values of tokens 0..t in every layer. They do not change
once computed (causal attention: earlier tokens never see later ones), so each layer stores them
and only the newest token's K and V are computed per step: O(t) work per token instead of O(t^2).
Rows of one cache share a length; continuous batching (qkv.batching) keeps rows of different
lengths in one by padding on the left (positions the attention mask hides), so it can drop rows,
stack two caches and shift what they hold.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """One attention layer's keys and values in preallocated buffers (batch, n_kv_heads, capacity,
    d_k): `update` writes the new ones after those held and returns views of all of them, the
    buffers doubling where they would overflow."""

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
            self.grow(max(end, 2 * self.capacity))
        self.keys[:, :, self.length : end] = key
        self.values[:, :, self.length : end] = value
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def grow(self, capacity: int) -> None:
        """Room for `capacity` positions, what is held copied over."""
        held = self.length
        self.keys, self.values = (
            torch.cat([b[:, :, :held], b.new_empty(*b.shape[:2], capacity - held, b.shape[-1])], 2)
            for b in (self.keys, self.values)
        )

    def reset(self) -> None:
        """Forget every position (the buffers are reused)."""
        self.length = 0

    def keep(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` (indices), in that order."""
        n = self.length
        self.keys, self.values = (self._buffer(b[rows, :, :n]) for b in (self.keys, self.values))

    def shift(self, n: int) -> None:
        """Move what is held n positions right (n > 0: n new positions in front, whose content
        the caller masks) or -n positions left (n < 0: the first -n positions are dropped)."""
        end = self.length + n
        if not 0 <= end <= self.capacity:
            raise ValueError(f"cannot shift {self.length} positions by {n} in {self.capacity}")
        held = slice(max(0, -n), self.length)
        for buffer in (self.keys, self.values):
            buffer[:, :, max(0, n) : end] = buffer[:, :, held].clone()
            buffer[:, :, : max(0, n)] = 0  # masked, but 0 x NaN from stale memory would be NaN
        self.length = end

    def stack(self, other: KVCache) -> None:
        """Append `other`'s rows after this cache's (both hold the same number of positions)."""
        if other.length != self.length:
            raise ValueError(f"cannot stack caches of {self.length} and {other.length} positions")
        n = self.length
        self.keys = self._buffer(torch.cat([self.keys[:, :, :n], other.keys[:, :, :n]]))
        self.values = self._buffer(torch.cat([self.values[:, :, :n], other.values[:, :, :n]]))

    def _buffer(self, held: Tensor) -> Tensor:
        """A buffer of this cache's capacity starting with `held` (rows, heads, length, d_k):
        only what is held is copied, and the free part of a fresh buffer is memory the system
        hands out when it is first written."""
        buffer = held.new_empty(*held.shape[:2], self.capacity, held.shape[-1])
        buffer[:, :, : self.length] = held
        return buffer
