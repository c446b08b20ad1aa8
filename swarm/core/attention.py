"""Attention over a batch of independent requests, each with its own KV cache and masks.

The compute core runs many requests as one computation: their new tokens are laid end to end on one
token axis ([1, total_tokens, hidden]) so every per-token layer (projections, norms, MLPs, experts)
runs once for all of them. Only attention must keep requests apart. A ``Plan`` lists the requests
(``Segment``: where its tokens are, its rows and new tokens, the tokens its cache already holds) and
computes each one's attention against its own cache, with its own causal, padding and sliding-window
masks. Families whose transformers attention calls the attention-function registry get it through
``hf_attention`` (registered as ``"stamen"`` by ``register_hf_attention``, which imports transformers'
modeling code, only for families built from transformers' modules); others (our Llama block, BLOOM, Falcon)
call ``Plan.attention`` themselves, reaching the plan under ``PLAN_KWARG`` in the attention kwargs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from swarm.core.cache import SessionCache
from swarm.models.adapters import LoraAdapter
from swarm.models.base import PLAN_KWARG

ATTENTION_NAME = "stamen"


@dataclass(eq=False)
class Segment:
    """One request's tokens in a batched computation: ``batch`` rows of ``tokens`` new tokens each,
    stored row after row at [start, start + batch * tokens) of the token axis."""

    start: int
    batch: int
    tokens: int
    cache: SessionCache | None = None  # None: a stateless pass (no past, nothing kept)
    block_offset: int = 0  # index of the request's first block in the server's span (cache block 0)
    padding: torch.Tensor | None = None  # [batch, past + tokens] bool for a stateless pass; sessions: cache's
    adapter: LoraAdapter | None = None  # the request's LoRA weights (``swarm.core.lora`` adds them to its rows)
    _masks: dict = field(default_factory=dict)  # sliding window -> (mask or None, is_causal)

    @property
    def end(self) -> int:
        return self.start + self.batch * self.tokens

    @property
    def past(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def rows(self, states: torch.Tensor) -> torch.Tensor:
        """This segment's part of [1, heads, total, dim] as [batch, heads, tokens, dim] (a view)."""
        heads, dim = states.shape[1], states.shape[-1]
        return states[0, :, self.start : self.end].view(heads, self.batch, self.tokens, dim).transpose(0, 1)

    def key_padding(self, keys: int) -> torch.Tensor:
        """[batch, keys] bool: which of the first ``keys`` tokens are real (False marks padding); for ALiBi."""
        if self.cache is not None:
            return self.cache.padding[:, :keys]
        if self.padding is not None:
            return self.padding[:, :keys]
        return torch.ones(self.batch, keys, dtype=torch.bool)

    def mask(self, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(bool mask [batch or 1, 1, tokens, past + tokens] or None, whether sdpa's is_causal does it)."""
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    def _build_mask(self, window: int | None) -> tuple[torch.Tensor | None, bool]:
        past, tokens = self.past, self.tokens
        total = past + tokens
        padded = self.cache.padded if self.cache is not None else self.padding is not None
        windowed = window is not None and total > window
        if not padded and not windowed:
            if tokens == 1:
                return None, False
            if past == 0:
                return None, True
        query = torch.arange(past, total).unsqueeze(1)  # absolute index of each new token
        key = torch.arange(total).unsqueeze(0)
        allowed = key <= query
        if windowed:
            allowed = allowed & (query - key < window)
        allowed = allowed.view(1, 1, tokens, total)
        if padded:
            padding = self.cache.padding[:, :total] if self.cache is not None else self.padding
            allowed = allowed & padding.view(self.batch, 1, 1, total)
        return allowed, False


class Plan:
    """The requests of one batched computation, in token-axis order."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments

    def attention(
        self,
        layer: int,  # the block's index in the server's span
        query: torch.Tensor,  # [1, heads, total, dim] (rotary applied)
        key: torch.Tensor,  # [1, kv_heads, total, dim]
        value: torch.Tensor,  # [1, kv_heads, total, dim]
        scaling: float,
        softcap: float | None = None,
        window: int | None = None,
        bias: Callable[[Segment, int], torch.Tensor] | None = None,  # (segment, keys) -> additive [b, heads, 1, keys]
    ) -> torch.Tensor:
        """Each segment attends to its own past and new tokens; returns [1, total, heads, dim]."""
        if len(self.segments) == 1 or torch.is_grad_enabled():
            return self._attention(layer, query, key, value, scaling, softcap, window, bias)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # many small ops: thread hand-offs would cost more than they save
        try:
            return self._attention(layer, query, key, value, scaling, softcap, window, bias)
        finally:
            torch.set_num_threads(threads)

    def _attention(self, layer, query, key, value, scaling, softcap, window, bias) -> torch.Tensor:
        outputs = []
        for segment in self.segments:
            q, k, v = segment.rows(query), segment.rows(key), segment.rows(value)
            if segment.cache is not None:
                k, v = segment.cache.write(layer - segment.block_offset, segment.past, k, v)
            mask, is_causal = segment.mask(window)
            seg_bias = None if bias is None else bias(segment, k.shape[-2])
            out = _attend(q, k, v, mask, is_causal, scaling, softcap, seg_bias)  # [batch, heads, tokens, dim]
            outputs.append(out.transpose(1, 2).reshape(segment.batch * segment.tokens, *out.shape[1:2], -1))
        merged = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return merged.unsqueeze(0)


def _attend(q, k, v, mask, is_causal: bool, scaling: float, softcap, bias) -> torch.Tensor:
    """Attention of one segment: q [b, heads, t, d], k/v [b, kv_heads, past + t, d] -> [b, heads, t, d]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    groups = heads // kv_heads
    if softcap is None and bias is None:
        if groups > 1 and q.shape[2] == 1:  # one query per row: the groups of a kv head become its queries
            batch, _, _, dim = q.shape
            packed = q.reshape(batch, kv_heads, groups, dim)
            out = F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scaling)
            return out.reshape(batch, heads, 1, dim)
        k, v = _repeat(k, groups), _repeat(v, groups)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling)
    k, v = _repeat(k, groups), _repeat(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def _repeat(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, n, d] -> [b, kv_heads * groups, n, d], each kv head repeated for its query heads."""
    if groups == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, -1, length, dim)


def hf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers' attention modules call (registered as ``"stamen"``)."""
    stamen_plan = kwargs.get(PLAN_KWARG)
    if stamen_plan is None:
        raise RuntimeError("stamen attention needs the batch plan (stamen_plan=...) passed to the block")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return stamen_plan.attention(module.layer_idx, query, key, value, scaling, softcap, sliding_window), None


def register_hf_attention() -> None:
    """Make ``hf_attention`` transformers' ``"stamen"`` attention (idempotent)."""
    from transformers import AttentionInterface  # transformers.modeling_utils: ~90 MiB, only for its own blocks

    AttentionInterface.register(ATTENTION_NAME, hf_attention)
