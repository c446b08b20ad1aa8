"""Gemma 2 and Gemma 3 (text).

Blocks are transformers' ``Gemma2DecoderLayer`` / ``Gemma3DecoderLayer`` (four RMSNorms ``1 + weight``
around attention and MLP; Gemma 3 adds per-head q/k norms). Their attention calls the attention-function
registry with the layer's sliding window (``config.layer_types``: sliding and full layers alternate, Gemma 3
one full in six) and, for Gemma 2, ``softcap=attn_logit_softcapping`` (``tanh`` soft-capping of the scores,
done by the server's eager attention path). Gemma 3 has one rotary embedding per layer type (local layers
use their own base frequency): the adapter computes cos/sin for each type once per batch and each block
gets its own type's.

The client keeps ``model.embed_tokens`` as transformers' scaled embedding (times sqrt(hidden_size), rounded
to the weights' dtype as transformers does), ``model.norm``, the tied ``lm_head``, and applies
``final_logit_softcapping``. A Gemma 3 text model has ``model_type`` ``gemma3_text`` (``Gemma3ForCausalLM``);
the multimodal ``gemma3`` checkpoints are not served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.models.base import Family, UnsupportedModelError, by_request


@dataclass(frozen=True)
class GemmaFamily(Family):
    def build_embedding(self, config: PretrainedConfig) -> nn.Module:
        return self.embedding_class(
            config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5
        )


@dataclass(frozen=True)
class Gemma3Family(GemmaFamily):
    def check(self, config: PretrainedConfig) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention (an embedding model) is not served")

    def position_embeddings(self, rotary, hidden: torch.Tensor, position_ids: torch.Tensor, sizes=None) -> dict:
        kinds = [kind for kind in rotary.layer_types if hasattr(rotary, f"{kind}_inv_freq")]
        return {
            kind: by_request(lambda h, p, k=kind: rotary(h, p, k), rotary, hidden, position_ids, sizes)
            for kind in kinds
        }


def gemma2() -> Family:
    from transformers.models.gemma2 import modeling_gemma2 as m

    return GemmaFamily(
        "gemma2",
        "Gemma 2",
        m.Gemma2DecoderLayer,
        m.Gemma2RMSNorm,
        m.Gemma2RotaryEmbedding,
        embedding_class=m.Gemma2TextScaledWordEmbedding,
    )


def gemma3_text() -> Family:
    from transformers.models.gemma3 import modeling_gemma3 as m

    return Gemma3Family(
        "gemma3_text",
        "Gemma 3 (text)",
        m.Gemma3DecoderLayer,
        m.Gemma3RMSNorm,
        m.Gemma3RotaryEmbedding,
        embedding_class=m.Gemma3TextScaledWordEmbedding,
    )
