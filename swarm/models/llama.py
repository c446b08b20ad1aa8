"""Rotary decoder families served by the default adapter: Llama, Mistral, Qwen2, Qwen3, Phi-3.

Llama's config, block, norm and rotary embedding are our own (``swarm.models.decoder``: transformers' names and
arithmetic without its modeling code, which costs a server ~90 MiB of memory); their attention calls the
batch plan directly. The other families' blocks are transformers' own ``<X>DecoderLayer`` called with rotary
``position_embeddings`` from ``<X>RotaryEmbedding``; their attention calls the attention-function registry
(the server's ``"stamen"``), with the family's sliding window where it has one (Mistral, Qwen2, Phi-3).
Weights live under ``model.layers.N.``; the client keeps ``model.embed_tokens``, ``model.norm`` (the family's
RMSNorm) and ``lm_head`` (tied to the embeddings when ``tie_word_embeddings``). Phi-3's fused ``qkv_proj`` and
``gate_up_proj``, Qwen3's per-head q/k norms and partial rotary are all inside transformers' block.
"""

from __future__ import annotations

from swarm.models.base import Family


def llama() -> Family:
    from swarm.models import decoder as m

    own = {"transformers_blocks": False, "config_class": m.DecoderConfig}
    return Family("llama", "Llama", m.DecoderLayer, m.RMSNorm, m.RotaryEmbedding, **own)


def mistral() -> Family:
    from transformers.models.mistral import modeling_mistral as m

    return Family("mistral", "Mistral", m.MistralDecoderLayer, m.MistralRMSNorm, m.MistralRotaryEmbedding)


def qwen2() -> Family:
    from transformers.models.qwen2 import modeling_qwen2 as m

    return Family("qwen2", "Qwen2", m.Qwen2DecoderLayer, m.Qwen2RMSNorm, m.Qwen2RotaryEmbedding)


def qwen3() -> Family:
    from transformers.models.qwen3 import modeling_qwen3 as m

    return Family("qwen3", "Qwen3", m.Qwen3DecoderLayer, m.Qwen3RMSNorm, m.Qwen3RotaryEmbedding)


def phi3() -> Family:
    from transformers.models.phi3 import modeling_phi3 as m

    return Family("phi3", "Phi-3", m.Phi3DecoderLayer, m.Phi3RMSNorm, m.Phi3RotaryEmbedding)
