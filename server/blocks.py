"""A span of transformer blocks, loaded from safetensors, and its forward computation.

``BlockStack.forward`` mirrors the decoder loop of a transformers model between the embeddings and
the final norm: rotary embeddings from position ids, one mask per attention kind, blocks in order.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.models.families import Family, attention_kind, get_family
from swarm.models.weights import load_tensors, tensor_index
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class BlockStack(nn.Module):
    """Blocks ``span`` of a model; block i of the span uses cache layer i."""

    def __init__(self, config: PretrainedConfig, family: Family, span: BlockRange, blocks: list[nn.Module]):
        super().__init__()
        self.config, self.family, self.span = config, family, span
        self.blocks = nn.ModuleList(blocks)
        self.rotary = family.build_rotary(config)
        self.kinds = [attention_kind(config, index) for index in range(span.start, span.end)]

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,  # [batch, new_tokens, hidden_size]
        position_ids: torch.Tensor,  # [batch, new_tokens]
        attention_mask: torch.Tensor | None,  # [batch, past + new_tokens] bool, or None for no padding
        cache=None,  # SessionCache for this span, or None for a stateless pass
        blocks: BlockRange | None = None,  # absolute sub-range of self.span to run (default: all)
    ) -> torch.Tensor:
        blocks = blocks or self.span
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        masks = {
            kind: MASK_FUNCTIONS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=0 if cache is not None else None,
            )
            for kind in set(self.kinds)
        }
        offset = blocks.start - self.span.start
        for local in range(offset, offset + len(blocks)):
            hidden = self.blocks[local](
                hidden,
                attention_mask=masks[self.kinds[local]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return hidden


def load_block_stack(folder: Path, config: PretrainedConfig, span: BlockRange, dtype: torch.dtype) -> BlockStack:
    """Build blocks ``span`` and load only their weights from the folder's safetensors files."""
    config._attn_implementation = "sdpa"
    family = get_family(config.model_type)
    index = tensor_index(folder)
    blocks = []
    started = time.perf_counter()
    for local, absolute in enumerate(range(span.start, span.end)):
        prefix = family.block_prefix(absolute)
        state = load_tensors(folder, lambda name, p=prefix: name.startswith(p), dtype, index)
        if not state:
            raise ValueError(f"block {absolute} has no weights in {folder}")
        block = family.build_block(config, absolute)
        block.load_state_dict({name[len(prefix) :]: value for name, value in state.items()}, strict=True, assign=True)
        block.self_attn.layer_idx = local  # the session cache is indexed by position within the span
        blocks.append(block.eval())
        logger.info("Loaded block %d (%d/%d) in %.1f s", absolute, local + 1, len(span), time.perf_counter() - started)
    return BlockStack(config, family, span, blocks).eval()
