"""Local transformers references for what the swarm computes with trainable prompts and LoRA adapters.

Written independently of the server's code: plain hooks on the local transformers model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def lora_hooks(local: nn.Module, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scaling: float):
    """Add ``(x @ a^T) @ b^T * scaling`` to the output of ``local.model.layers[block].<module>``."""
    handles = []
    for (block, module), (a, b) in weights.items():
        linear = local.model.layers[block].get_submodule(module)

        def add(_, args, output, a=a, b=b):
            return output + (args[0] @ a.t() @ b.t()) * scaling

        handles.append(linear.register_forward_hook(add))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def deep_prompt_hooks(local: nn.Module, deep: torch.Tensor):
    """Before block i, add ``deep[i, p]`` to the hidden states at position p, for p < prefix (``deep``:
    [blocks, prefix, hidden]); decode steps of ``generate`` are past the prefix and get nothing."""
    handles, prefix = [], deep.shape[1]
    for index, layer in enumerate(local.model.layers):

        def add(_, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs["position_ids"].expand(hidden.shape[0], hidden.shape[1])
            inside = (positions < prefix).unsqueeze(-1)
            hidden = hidden + deep[index][positions.clamp(max=prefix - 1)] * inside
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prefixed(local: nn.Module, prefix: torch.Tensor, ids: torch.Tensor, **kwargs):
    """The local model on ``prefix`` [k, hidden] put before the embeddings of ``ids``; logits of ``ids`` only."""
    embeds = local.model.embed_tokens(ids)
    inputs = torch.cat([prefix.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
    output = local(inputs_embeds=inputs, **kwargs)
    return output.logits[:, prefix.shape[0] :].contiguous()


def copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Leaf copies that get their own gradients."""
    return [tensor.detach().clone().requires_grad_() for tensor in tensors]
