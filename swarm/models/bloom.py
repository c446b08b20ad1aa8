"""BLOOM: ALiBi attention that transformers computes inside the block (no attention-function registry).

A block is transformers' ``BloomBlock`` (LayerNorms, fused ``query_key_value`` with the heads interleaved as
[head, (q, k, v), dim], a GeLU MLP, dropout-add residuals) whose ``self_attention`` is replaced by
``_PlanAttention``: the same module and weights, but its forward sends q/k/v to the server's batch plan
instead of a transformers cache. ``BloomBlock`` hands its ``layer_past`` argument to its attention
untouched; the adapter passes the batch plan there. Position information is ALiBi only: a per-head linear
bias on the keys, built per request by transformers' own ``build_alibi_tensor`` from the request's padding
mask (key positions count real tokens only), added to the scaled scores in the plan's eager path.

Weights: ``transformer.h.N.``; checkpoints of ``BloomModel`` (the original BigScience files) store the same
names without ``transformer.``, which the loader accepts. The client keeps ``transformer.word_embeddings``,
``transformer.word_embeddings_layernorm`` (a LayerNorm right after the embeddings), ``transformer.ln_f`` and
the ``lm_head``, tied to the word embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.models.base import PLAN_KWARG, Family, LocalLayout

BLOOM_LAYOUT = LocalLayout(
    layers="transformer.h",
    embed="transformer.word_embeddings",
    norm="transformer.ln_f",
    embed_norm="transformer.word_embeddings_layernorm",
)


@dataclass(frozen=True)
class Alibi:
    """A model's ALiBi: the family's ``build(mask [batch, keys], heads, dtype) -> [batch * heads, 1, keys]``
    (transformers' own), the head count, and what the bias is divided by before it is added to the scores."""

    build: Callable
    heads: int
    divisor: float = 1.0

    def batch_bias(self, dtype: torch.dtype) -> Callable:
        """The plan's ``bias`` for one batch: (request, keys) -> [batch, heads, 1, keys], built once per request
        from its padding mask (key positions count real tokens only) and shared by every block of the batch."""
        built: dict[tuple[int, int], torch.Tensor] = {}

        def bias(segment, keys: int) -> torch.Tensor:
            key = (id(segment), keys)
            if key not in built:
                mask = segment.key_padding(keys).to(torch.long)  # [batch, keys], 0 marks padding
                alibi = self.build(mask, self.heads, dtype).view(mask.shape[0], self.heads, 1, keys)
                built[key] = alibi if self.divisor == 1.0 else alibi / self.divisor
            return built[key]

        return bias


def _plan_attention_class(base: type[nn.Module]) -> type[nn.Module]:
    from transformers.models.bloom.modeling_bloom import dropout_add

    class _PlanAttention(base):
        """``BloomAttention`` attending through the batch plan (given as ``layer_past``); same weights."""

        def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, **kwargs):
            plan = layer_past
            batch, tokens, _ = hidden_states.shape  # [1, total, hidden]
            fused = self.query_key_value(hidden_states).view(batch, tokens, self.num_heads, 3, self.head_dim)
            query, key, value = (fused[..., i, :].transpose(1, 2) for i in range(3))  # [1, heads, total, dim]
            context = plan.attention(self.layer_idx, query, key, value, self.inv_norm_factor, bias=alibi)
            output = self.dense(context.reshape(batch, tokens, self.hidden_size))  # context: [1, total, heads, dim]
            return dropout_add(output, residual, self.hidden_dropout, self.training), None

    return _PlanAttention


@dataclass(frozen=True)
class BloomFamily(Family):
    attention_class: type[nn.Module] | None = None  # _PlanAttention over transformers' BloomAttention
    alibi_builder: Callable | None = None  # transformers' build_alibi_tensor
    layout: LocalLayout = field(default_factory=lambda: BLOOM_LAYOUT)
    attention_name: str = "self_attention"

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        with torch.device("meta"):
            block = self.layer_class(config, layer_idx=index)
            block.self_attention = self.attention_class(config, layer_idx=index)
        return block

    def kv_shape(self, config: PretrainedConfig) -> tuple[int, int]:
        return config.n_head, config.hidden_size // config.n_head

    def build_rotary(self, config: PretrainedConfig) -> Alibi:
        return Alibi(self.alibi_builder, config.n_head)

    def position_embeddings(self, alibi: Alibi, hidden: torch.Tensor, position_ids: torch.Tensor, sizes=None) -> dict:
        return {"full_attention": alibi.batch_bias(hidden.dtype)}

    def call_block(self, block, hidden, position_ids, position_embeddings, attention_kwargs) -> torch.Tensor:
        output = block(hidden, alibi=position_embeddings, attention_mask=None, layer_past=attention_kwargs[PLAN_KWARG])
        return output[0]

    def build_embed_norm(self, config: PretrainedConfig) -> nn.Module:
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def build_norm(self, config: PretrainedConfig) -> nn.Module:
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def bloom() -> Family:
    from transformers.models.bloom import modeling_bloom as m

    return BloomFamily(
        "bloom",
        "BLOOM",
        m.BloomBlock,
        nn.LayerNorm,
        attention_class=_plan_attention_class(m.BloomAttention),
        alibi_builder=m.build_alibi_tensor,
    )
