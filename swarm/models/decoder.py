"""Llama's config, decoder block, norm and rotary embedding, written here so that a server of a Llama model
imports no transformers modeling code: ``transformers.modeling_utils``, which every ``modeling_<x>`` module
imports, brings torch._dynamo, sympy, scipy and accelerate, about 80 MiB of memory in each process, and so
does transformers' ``LlamaConfig`` (through its validators, which import its activations and with them the
model-loading stack). ``benchmarks/memory.py`` measures it.

``DecoderConfig`` reads a Llama ``config.json`` with the fields and defaults of transformers' ``LlamaConfig``
(its base class converts legacy ``rope_theta``/``rope_scaling`` to ``rope_parameters`` as LlamaConfig does).

The modules have transformers' parameter names (``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``,
...), so checkpoints and LoRA adapters load as they are, and compute the same operations in the same order
as transformers' ``LlamaDecoderLayer``, ``LlamaRMSNorm`` and ``LlamaRotaryEmbedding``, so their outputs are
equal to its bit for bit (``tests/unit/test_decoder.py`` checks it). Attention goes straight to the batch
plan the server passes under ``PLAN_KWARG``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from swarm.models.base import UnsupportedModelError

ACTIVATIONS = {  # config.hidden_act -> the function transformers' ACT2FN applies
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


class DecoderConfig(PretrainedConfig):
    """A Llama config (``model_type`` "llama"); fields left out of config.json take LlamaConfig's defaults."""

    model_type = "llama"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # the MLP's inner width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: one per attention head
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None  # {"rope_type", "rope_theta", ...}: filled in by the base class
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads

    def __post_init__(self, **kwargs):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        super().__post_init__(**kwargs)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as transformers does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon)).to(dtype)


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotary position embedding for ``position_ids``; the rope types other than the
    default come from transformers' ``ROPE_INIT_FUNCTIONS`` (and ``dynamic_rope_update`` for those whose
    frequencies depend on the longest position seen)."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        if self.rope_type == "default":
            dim, base = head_dim(config), config.rope_parameters["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)  # [batch, tokens, head_dim]
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [batch, heads, tokens, dim] with cos/sin [batch, tokens, dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return (states * cos) + (rotated * sin)


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the block's index in the server's span (its KV cache)
        self.head_dim = head_dim(config)
        self.scaling = self.head_dim**-0.5
        heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=bias)

    def forward(self, hidden: torch.Tensor, position_embeddings, plan) -> torch.Tensor:
        shape = (*hidden.shape[:-1], -1, self.head_dim)  # [1, total, heads, dim]
        query = self.q_proj(hidden).view(shape).transpose(1, 2)  # [1, heads, total, dim]
        key = self.k_proj(hidden).view(shape).transpose(1, 2)  # [1, kv_heads, total, dim]
        value = self.v_proj(hidden).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        output = plan.attention(self.layer_idx, query, key, value, self.scaling)  # [1, total, heads, dim]
        return self.o_proj(output.reshape(*hidden.shape[:-1], -1).contiguous())


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation {config.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act_fn = ACTIVATIONS[config.hidden_act]
        hidden, inner, bias = config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each added to its input."""

    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, stamen_plan, **_) -> torch.Tensor:
        """``hidden_states`` [1, total, hidden]; ``stamen_plan``: the batch plan (``PLAN_KWARG``); the other
        arguments of ``Family.call_block`` (position ids, mask, use_cache) are not needed here."""
        attended = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, stamen_plan)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
