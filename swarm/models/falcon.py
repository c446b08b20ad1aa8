"""Falcon: both decoder architectures, rotary or ALiBi, computed by transformers inside the block.

A block is transformers' ``FalconDecoderLayer`` (its own residual layout: sequential attention then MLP,
attention and MLP in parallel from one LayerNorm (``parallel_attn``), or the new decoder architecture with
``ln_attn``/``ln_mlp``), whose ``self_attention`` is replaced by ``_PlanAttention``: the same module and
weights, but its forward sends q/k/v to the server's batch plan (handed over as ``layer_past``, which the
layer passes to its attention untouched). The fused ``query_key_value`` holds

- new decoder architecture: per key/value head, its query heads then one key and one value head (grouped
  query attention with ``num_kv_heads``);
- original architecture with ``multi_query``: all query heads, then one shared key and one value head;
- original architecture without it: per head, its query, key and value.

The KV cache keeps only the key/value heads (1 for multi-query), the plan shares them among query heads.
Positions are rotary (``FalconRotaryEmbedding``) or, with ``alibi``, transformers' own ``build_alibi_tensor``
(slopes rounded to bfloat16 as transformers does) divided by sqrt(head_dim), per request from its padding.

Weights: ``transformer.h.N.`` (or without ``transformer.``). The client keeps ``transformer.word_embeddings``,
``transformer.ln_f`` (LayerNorm) and ``lm_head`` (tied unless ``tie_word_embeddings`` is false).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.models.base import PLAN_KWARG, Family, LocalLayout, by_request, eager_config
from swarm.models.bloom import Alibi

FALCON_LAYOUT = LocalLayout(layers="transformer.h", embed="transformer.word_embeddings", norm="transformer.ln_f")


def _plan_attention_class(base: type[nn.Module], apply_rotary: Callable) -> type[nn.Module]:
    class _PlanAttention(base):
        """``FalconAttention`` attending through the batch plan (given as ``layer_past``); same weights."""

        def forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, **kwargs):
            plan = layer_past
            batch, tokens, _ = hidden_states.shape  # [1, total, hidden]
            query, key, value = self._plan_heads(self.query_key_value(hidden_states))  # [1, heads|kv, total, dim]
            if alibi is None:
                cos, sin = kwargs["position_embeddings"]
                query, key = apply_rotary(query, key, cos, sin)
            context = plan.attention(self.layer_idx, query, key, value, self.inv_norm_factor, bias=alibi)
            return self.dense(context.reshape(batch, tokens, self.hidden_size)), None  # context: [1, total, h, d]

        def _plan_heads(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            batch, tokens, _ = fused.shape
            dim = self.head_dim
            if self.new_decoder_architecture:  # [.., kv head, its query heads + key + value, dim]
                qkv = fused.view(batch, tokens, self.num_kv_heads, -1, dim)
                query, key, value = qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
            elif self.multi_query:  # [.., query heads + one key + one value, dim]
                qkv = fused.view(batch, tokens, self.num_heads + 2, dim)
                query, key, value = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
            else:  # [.., head, (query, key, value), dim]
                qkv = fused.view(batch, tokens, self.num_heads, 3, dim)
                query, key, value = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
            return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    return _PlanAttention


@dataclass(frozen=True)
class FalconFamily(Family):
    attention_class: type[nn.Module] | None = None  # _PlanAttention over transformers' FalconAttention
    alibi_builder: Callable | None = None  # transformers' build_alibi_tensor
    layout: LocalLayout = field(default_factory=lambda: FALCON_LAYOUT)
    attention_name: str = "self_attention"

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        config = eager_config(config)  # the layer picks its attention class by implementation name
        with torch.device("meta"):
            block = self.layer_class(config, layer_idx=index)
            block.self_attention = self.attention_class(config, layer_idx=index)
        return block

    def kv_shape(self, config: PretrainedConfig) -> tuple[int, int]:
        heads = config.num_attention_heads
        if config.new_decoder_architecture:
            kv_heads = config.num_kv_heads
        else:
            kv_heads = 1 if config.multi_query else heads
        return kv_heads, config.hidden_size // heads

    def build_rotary(self, config: PretrainedConfig):
        if config.alibi:
            heads = config.num_attention_heads
            return Alibi(self.alibi_builder, heads, math.sqrt(config.hidden_size // heads))
        return self.rotary_class(config=config)

    def position_embeddings(self, rotary, hidden: torch.Tensor, position_ids: torch.Tensor, sizes=None) -> dict:
        if isinstance(rotary, Alibi):
            return {"full_attention": (None, rotary.batch_bias(hidden.dtype))}
        embeddings = by_request(lambda h, p: rotary(h, position_ids=p), rotary, hidden, position_ids, sizes)
        return {"full_attention": (embeddings, None)}

    def call_block(self, block, hidden, position_ids, position_embeddings, attention_kwargs) -> torch.Tensor:
        rotary, alibi = position_embeddings
        output = block(
            hidden,
            alibi=alibi,
            attention_mask=None,
            position_ids=position_ids,
            layer_past=attention_kwargs[PLAN_KWARG],
            position_embeddings=rotary,
        )
        return output[0]

    def build_norm(self, config: PretrainedConfig) -> nn.Module:
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def falcon() -> Family:
    from transformers.models.falcon import modeling_falcon as m

    return FalconFamily(
        "falcon",
        "Falcon",
        m.FalconDecoderLayer,
        nn.LayerNorm,
        m.FalconRotaryEmbedding,
        attention_class=_plan_attention_class(m.FalconAttention, m.apply_rotary_pos_emb),
        alibi_builder=m.build_alibi_tensor,
    )
