"""KV cache: a server-wide token budget and per-session preallocated caches.

Layout (owned by the server, the same for every family): for each block of the session's blocks, a key
buffer and a value buffer of shape [batch, kv_heads, max_length, head_dim], and one padding mask
[batch, max_length] for the whole session. A step writes its new tokens at [position, position + new)
in every block it runs and attention reads the views [:, :, :position + new]; the session's length
moves once the step has gone through all its blocks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from swarm.errors import CacheFullError, InvalidRequestError
from swarm.models.families import get_family


class SessionCache:
    """The KV cache and padding mask of one inference session (its blocks only)."""

    def __init__(self, num_blocks: int, shape: tuple[int, int, int, int], dtype: torch.dtype):
        batch, _, max_length, _ = shape
        self.keys = [torch.empty(shape, dtype=dtype) for _ in range(num_blocks)]  # [batch, kv, max_len, dim]
        self.values = [torch.empty(shape, dtype=dtype) for _ in range(num_blocks)]
        self.padding = torch.ones(batch, max_length, dtype=torch.bool)  # False marks padding tokens
        self.padded = False  # whether any token so far is padding (lets attention skip the mask)
        self.length = 0  # tokens every block holds (per sequence)

    @property
    def max_length(self) -> int:
        return self.padding.shape[1]

    def check_room(self, tokens: int) -> None:
        if self.length + tokens > self.max_length:
            raise InvalidRequestError(
                f"step of {tokens} tokens at position {self.length} exceeds max_length {self.max_length}"
            )

    def write(self, block: int, start: int, key: torch.Tensor, value: torch.Tensor):
        """Store ``key``/``value`` [batch, kv, new, dim] of block ``block`` (index among the session's
        blocks) at ``start``; return the views of everything up to them, [batch, kv, start + new, dim]."""
        end = start + key.shape[-2]
        if end > self.max_length:  # check_room stops such steps first; never write past the buffers
            raise InvalidRequestError(f"session cache overflow: {end} tokens > max_length {self.max_length}")
        self.keys[block][:, :, start:end] = key
        self.values[block][:, :, start:end] = value
        return self.keys[block][:, :, :end], self.values[block][:, :, :end]

    def set_padding(self, start: int, mask: torch.Tensor | None, tokens: int) -> None:
        """The padding of the new tokens at ``start`` ([batch, tokens] bool, None = no padding)."""
        if mask is None:
            self.padding[:, start : start + tokens] = True
        else:
            self.padding[:, start : start + tokens] = mask
            self.padded = self.padded or not bool(mask.all())

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row ``rows[i]`` as row i (beam search picks which hypotheses go on): the tokens held so far
        in every block, and their padding. The padding of a step already announced is for the new rows."""
        end = self.length
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[:, :, :end] = buffer[:, :, :end].index_select(0, rows)
        self.padding[:, :end] = self.padding[:, :end].index_select(0, rows)


@dataclass(frozen=True)
class KVGeometry:
    """Per-token KV shape of one block of a model."""

    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config: PretrainedConfig, dtype: torch.dtype) -> KVGeometry:
        kv_heads, head_dim = get_family(config.model_type).kv_shape(config)  # e.g. Falcon: 1 for multi-query
        return cls(kv_heads, head_dim, dtype)

    def bytes_per_token(self, num_blocks: int) -> int:
        return 2 * num_blocks * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def allocate(self, num_blocks: int, batch: int, max_length: int) -> SessionCache:
        return SessionCache(num_blocks, (batch, self.kv_heads, max_length, self.head_dim), self.dtype)


class CacheBudget:
    """Server-wide budget in tokens (batch x max_length summed over open sessions). Thread-safe."""

    def __init__(self, total_tokens: int):
        self.total_tokens = total_tokens
        self._used = 0
        self._lock = threading.Lock()

    @property
    def tokens_left(self) -> int:
        with self._lock:
            return self.total_tokens - self._used

    def reserve(self, tokens: int) -> None:
        with self._lock:
            if tokens > self.total_tokens - self._used:
                raise CacheFullError(
                    f"cache budget exhausted: session needs {tokens} tokens, "
                    f"{self.total_tokens - self._used} of {self.total_tokens} free"
                )
            self._used += tokens

    def release(self, tokens: int) -> None:
        with self._lock:
            self._used = max(0, self._used - tokens)
