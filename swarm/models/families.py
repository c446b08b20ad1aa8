"""Model-family registry: how to build one decoder block and the local parts of a model.

One adapter per family. Llama, Mistral and Qwen2 are registered explicitly; any other family whose
transformers module follows the same pattern (``<X>DecoderLayer`` taking rotary ``position_embeddings``
from ``<X>RotaryEmbedding``, an ``<X>RMSNorm``, weights under ``model.layers.N``) is resolved the same way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """How one model family lays out its blocks and weights."""

    model_type: str
    layer_class: type[nn.Module]  # decoder block: (hidden, attention_mask, position_embeddings, past_key_values)
    rotary_class: type[nn.Module]  # rotary embedding module: (x, position_ids) -> (cos, sin); no weights
    norm_class: type[nn.Module]  # final norm: (hidden_size, eps)
    layer_prefix: str = "model.layers."
    embed_key: str = "model.embed_tokens.weight"
    norm_key: str = "model.norm.weight"
    head_key: str = "lm_head.weight"

    def block_prefix(self, index: int) -> str:
        return f"{self.layer_prefix}{index}."

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        """An uninitialised block (on the meta device) for absolute layer ``index``."""
        with torch.device("meta"):
            return self.layer_class(config, layer_idx=index)

    def build_rotary(self, config: PretrainedConfig) -> nn.Module:
        return self.rotary_class(config=config)

    def position_embeddings(self, rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """What each attention kind's blocks take as ``position_embeddings`` (rotary cos and sin)."""
        embeddings = rotary(hidden, position_ids=position_ids)
        return {"full_attention": embeddings, "sliding_attention": embeddings}

    def call_block(
        self,
        block: nn.Module,
        hidden: torch.Tensor,  # [1, total_tokens, hidden_size]: every request's tokens end to end
        position_ids: torch.Tensor,  # [1, total_tokens]
        position_embeddings,
        attention_kwargs: dict,  # passed through to the attention function (the server's batch plan)
    ) -> torch.Tensor:
        """Run one block; attention goes through the attention function the config names."""
        output = block(
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            past_key_values=None,
            use_cache=False,
            **attention_kwargs,
        )
        return output[0] if isinstance(output, tuple) else output

    def build_norm(self, config: PretrainedConfig) -> nn.Module:
        with torch.device("meta"):
            return self.norm_class(config.hidden_size, eps=config.rms_norm_eps)


def attention_kind(config: PretrainedConfig, index: int) -> str:
    """``"full_attention"`` or ``"sliding_attention"`` for absolute layer ``index``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding_attention"
    return "full_attention"


def _family_from_module(model_type: str) -> Family:
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = next(
        (name[: -len("DecoderLayer")] for name in dir(module) if name.endswith("DecoderLayer")),
        None,
    )
    if prefix is None or not hasattr(module, f"{prefix}RotaryEmbedding") or not hasattr(module, f"{prefix}RMSNorm"):
        raise ValueError(f"model family {model_type!r} is not supported (no rotary decoder layer found)")
    return Family(
        model_type=model_type,
        layer_class=getattr(module, f"{prefix}DecoderLayer"),
        rotary_class=getattr(module, f"{prefix}RotaryEmbedding"),
        norm_class=getattr(module, f"{prefix}RMSNorm"),
    )


@cache
def get_family(model_type: str) -> Family:
    """The adapter for ``config.model_type``; raises ValueError for families we cannot serve."""
    if not model_type.replace("_", "").isalnum():
        raise ValueError(f"invalid model type {model_type!r}")
    try:
        return _family_from_module(model_type)
    except ModuleNotFoundError as exc:
        raise ValueError(f"model family {model_type!r} is not known to transformers") from exc
