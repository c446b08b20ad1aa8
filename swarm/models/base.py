"""The family adapter interface, and its default: a rotary decoder whose attention calls the registry.

A ``Family`` tells a server how to build, load and call one block of a model, and a client how to build
the parts it keeps (embeddings, an optional embedding norm, the final norm, the LM head, final-logit
soft-capping). The default methods fit the Llama-like families of transformers: a decoder layer that
takes rotary ``position_embeddings`` from the family's rotary module and calls attention through
transformers' attention-function registry, where the server's ``"stamen"`` attention receives the batch
plan (Llama's own block, ``decoder``, calls the plan itself). Families that differ override a few methods
(``gemma``, ``moe``, ``bloom``, ``falcon``).

The batch plan is opaque here: an object whose ``attention(layer, query, key, value, scaling, softcap=None,
window=None, bias=None)`` attends every request to its own cache, and whose requests (``segment``) offer
``key_padding(keys) -> [batch, keys] bool``. Its concrete type lives in the server.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

PLAN_KWARG = "stamen_plan"  # the key of the batch plan in the attention kwargs a server passes to call_block


class UnsupportedModelError(ValueError):
    """The model's family, or a variant of it, cannot be served."""


@dataclass(frozen=True)
class LocalLayout:
    """Module paths in the family's transformers ``...ForCausalLM`` (also the checkpoint's tensor prefixes)."""

    layers: str = "model.layers"  # the decoder blocks, ``<layers>.<index>.``
    embed: str = "model.embed_tokens"  # token embeddings (client)
    norm: str = "model.norm"  # final norm (client)
    head: str = "lm_head"  # LM head (client); tied to the embeddings when the config says so
    embed_norm: str | None = None  # a norm right after the embeddings (client; BLOOM's word_embeddings_layernorm)

    @property
    def base(self) -> str:
        """The base model's prefix ("model." or "transformer."); some checkpoints store names without it."""
        return self.layers.split(".")[0] + "."


@dataclass(frozen=True)
class Family:
    """How one model family lays out, builds and calls its blocks, and what a client keeps locally."""

    model_type: str  # config.model_type
    name: str  # human name, for tables and errors
    layer_class: type[nn.Module]  # the decoder block (transformers' or ours): (config, layer_idx)
    norm_class: type[nn.Module]  # final norm: (hidden_size, eps)
    rotary_class: type[nn.Module] | None = None  # rotary embedding module (config=...), no weights
    embedding_class: type[nn.Module] = nn.Embedding  # token embeddings: (vocab, hidden, padding_idx)
    layout: LocalLayout = field(default_factory=LocalLayout)
    attention_name: str = "self_attn"  # the block's attention submodule; its layer_idx indexes the server's cache
    transformers_blocks: bool = True  # blocks are transformers' modules: the server registers its attention there
    config_class: type[PretrainedConfig] | None = None  # reads the family's config.json (None: AutoConfig)

    # ---- server: blocks ----

    def check(self, config: PretrainedConfig) -> None:
        """Raise UnsupportedModelError for variants of the family that cannot be served exactly."""

    def block_prefix(self, index: int) -> str:
        return f"{self.layout.layers}.{index}."

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        """An uninitialised block (on the meta device) for absolute layer ``index``."""
        with torch.device("meta"):
            return self.layer_class(config, layer_idx=index)

    def block_state(self, state: dict[str, torch.Tensor], block: nn.Module) -> dict[str, torch.Tensor]:
        """Checkpoint tensors of one block (names relative to its prefix) -> the block's state dict."""
        return state

    def load_block(
        self, config: PretrainedConfig, index: int, state: dict[str, torch.Tensor], cache_index: int
    ) -> nn.Module:
        """Block ``index`` with its weights; its attention finds its KV cache as block ``cache_index``."""
        block = self.build_block(config, index)
        block.load_state_dict(self.block_state(state, block), strict=True, assign=True)
        on_meta = [name for name, tensor in [*block.named_parameters(), *block.named_buffers()] if tensor.is_meta]
        if on_meta:
            raise ValueError(f"{self.name} block {index}: no values for {on_meta}")
        getattr(block, self.attention_name).layer_idx = cache_index
        return block.eval()

    def kv_shape(self, config: PretrainedConfig) -> tuple[int, int]:
        """(key/value heads, head dim) of the KV cache of one block."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads

    def build_rotary(self, config: PretrainedConfig) -> nn.Module | None:
        """The family's position encoding, built once per server (a rotary module; BLOOM/Falcon: ALiBi)."""
        return self.rotary_class(config=config) if self.rotary_class is not None else None

    def position_embeddings(
        self, rotary, hidden: torch.Tensor, position_ids: torch.Tensor, sizes: list[int] | None = None
    ) -> dict:
        """What the blocks of each attention kind take as ``position_embeddings`` (rotary cos and sin), computed once
        per batch for the tokens of all its requests (``hidden`` [1, total, hidden], ``position_ids`` [1, total],
        ``sizes``: each request's number of tokens on that axis, in order)."""
        embeddings = by_request(lambda h, p: rotary(h, position_ids=p), rotary, hidden, position_ids, sizes)
        return {"full_attention": embeddings, "sliding_attention": embeddings}

    def call_block(
        self,
        block: nn.Module,
        hidden: torch.Tensor,  # [1, total_tokens, hidden_size]: every request's tokens end to end
        position_ids: torch.Tensor,  # [1, total_tokens]
        position_embeddings,  # this block's entry of position_embeddings()
        attention_kwargs: dict,  # passed through to the attention function ({PLAN_KWARG: the batch plan})
    ) -> torch.Tensor:
        """Run one block; attention goes through the attention function the config names."""
        output = block(
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            use_cache=False,
            **attention_kwargs,
        )
        return output[0] if isinstance(output, tuple) else output

    # ---- client: the local parts ----

    def build_embedding(self, config: PretrainedConfig) -> nn.Module:
        return self.embedding_class(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))

    def build_embed_norm(self, config: PretrainedConfig) -> nn.Module | None:
        return None

    def build_norm(self, config: PretrainedConfig) -> nn.Module:
        return self.norm_class(config.hidden_size, eps=config.rms_norm_eps)

    def tied_head(self, config: PretrainedConfig) -> bool:
        """Whether the LM head shares the token embeddings' weight."""
        return bool(getattr(config, "tie_word_embeddings", False))

    def logit_softcap(self, config: PretrainedConfig) -> float | None:
        """Final-logit soft-capping (logits = cap * tanh(logits / cap)), or None."""
        return getattr(config, "final_logit_softcapping", None)

    # ---- checkpoints ----

    def local_weights(self, parts: dict[str, tuple[str, nn.Module | None]], names, tied: bool) -> dict[str, str]:
        """Checkpoint tensor name -> ``<attribute>.<tensor>`` for a client's local parts, given as
        {attribute: (layout role "embed" / "embed_norm" / "norm" / "head", module or None)}; a tied head has
        no tensors of its own."""
        wanted = {}
        for attribute, (role, module) in parts.items():
            path = getattr(self.layout, role)
            if module is None or path is None or (role == "head" and tied):
                continue
            prefix = self.checkpoint_prefix(f"{path}.", names)
            wanted.update({prefix + name: f"{attribute}.{name}" for name in module.state_dict()})
        return wanted

    def checkpoint_prefix(self, prefix: str, names) -> str:
        """``prefix``, or ``prefix`` without the base model's prefix if the checkpoint stores names that way."""
        if any(name.startswith(prefix) for name in names):
            return prefix
        base = self.layout.base
        if prefix.startswith(base) and any(name.startswith(prefix[len(base) :]) for name in names):
            return prefix[len(base) :]
        return prefix


LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # frequencies chosen from the largest position in the call


def by_request(compute, rotary, hidden: torch.Tensor, position_ids: torch.Tensor, sizes: list[int] | None):
    """``compute(hidden, position_ids) -> (cos, sin)`` for a whole batch at once; per request when the rotary type
    picks its frequencies from the largest position it sees (as transformers computes it for one sequence
    batch), so that requests of other lengths in the same batch do not change them."""
    types = getattr(rotary, "rope_type", None)
    types = types.values() if isinstance(types, dict) else [types]  # Gemma 3: one type per layer type
    if not sizes or len(sizes) == 1 or not any(kind in LENGTH_DEPENDENT_ROPE for kind in types):
        return compute(hidden, position_ids)
    parts = [compute(h, p) for h, p in zip(hidden.split(sizes, dim=1), position_ids.split(sizes, dim=1), strict=True)]
    return tuple(torch.cat(tensors, dim=1) for tensors in zip(*parts, strict=True))  # cos, sin: [1, total, dim]


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), as transformers applies final-logit soft-capping (None: unchanged)."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def attention_kind(config: PretrainedConfig, index: int) -> str:
    """``"full_attention"`` or ``"sliding_attention"`` for absolute layer ``index``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding_attention"
    return "full_attention"


def eager_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` that builds transformers' eager attention modules (for families whose decoder
    layer picks its attention class from the config's attention implementation)."""
    copied = copy.deepcopy(config)
    copied._attn_implementation = "eager"
    return copied
