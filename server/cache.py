"""KV cache: a server-wide token budget and per-session preallocated caches.

Layout (owned by the server, the same for every family): for each block of the session's span, a key
buffer and a value buffer of shape [batch, kv_heads, max_length, head_dim]. A step writes its new
tokens at [position, position + new_tokens) and attention reads the views [:, :, :position + new].
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from swarm.errors import CacheFullError, InvalidRequestError


class PreallocatedLayer(CacheLayerMixin):
    """One block's keys and values in buffers allocated once for the session's max length."""

    is_sliding = False

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype):
        super().__init__()
        self.key_buffer = torch.empty(shape, dtype=dtype)  # [batch, kv_heads, max_length, head_dim]
        self.value_buffer = torch.empty(shape, dtype=dtype)
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise InvalidRequestError(f"session cache overflow: {end} tokens > max_length {self.key_buffer.shape[-2]}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.key_buffer.shape[-2]


class SessionCache(Cache):
    """The KV cache of one inference session. Blocks number their cache layer by their index in the
    server's span; a session over a sub-range starting ``offset`` blocks in keeps only its own layers."""

    def __init__(self, layers: list[PreallocatedLayer], offset: int = 0):
        super().__init__(layers=layers)
        self.offset = offset

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.offset, *args, **kwargs)

    @property
    def length(self) -> int:
        return self.layers[0].length


@dataclass(frozen=True)
class KVGeometry:
    """Per-token KV shape of one block of a model."""

    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config: PretrainedConfig, dtype: torch.dtype) -> KVGeometry:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(kv_heads, head_dim, dtype)

    def bytes_per_token(self, num_blocks: int) -> int:
        return 2 * num_blocks * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def allocate(self, num_blocks: int, batch: int, max_length: int, offset: int = 0) -> SessionCache:
        shape = (batch, self.kv_heads, max_length, self.head_dim)
        return SessionCache([PreallocatedLayer(shape, self.dtype) for _ in range(num_blocks)], offset)


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
