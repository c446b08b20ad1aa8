"""The model's local parts, used by the engine only through these functions (one place to change if the
model's module layout changes): token embeddings in, final norm + LM head out."""

from __future__ import annotations

import torch

from client.model import DistributedModelForCausalLM


def embed(model: DistributedModelForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """[batch, tokens] int64 -> [batch, tokens, hidden_size]."""
    with torch.no_grad():
        return model.embed_tokens(ids)


def final_logits(model: DistributedModelForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """The last block's output [batch, hidden_size] -> next-token logits [batch, vocab_size] (float32)."""
    with torch.no_grad():
        return model.lm_head(model.norm(hidden)).float()


def eos_ids(model: DistributedModelForCausalLM, tokenizer) -> frozenset[int]:
    """The tokens that end a completion: the generation config's eos (as transformers' ``generate``
    uses), else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos or [])
