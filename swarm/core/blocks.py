"""A span of transformer blocks, loaded from safetensors, and its batched computation.

``BlockStack.run`` takes several requests at once (work items: sessions' steps with their caches, or
stateless passes), lays their tokens end to end on one token axis, and runs the family's blocks on
them; attention keeps each request to its own cache and masks (``swarm.core.attention``), LoRA hooks add
each request's adapter to its own rows (``swarm.core.lora``), and a request's deep prompts are added to
its first tokens before each block.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.core.attention import ATTENTION_NAME, Plan, Segment, register_hf_attention
from swarm.core.lora import LoraHooks
from swarm.core.work import Work
from swarm.models.families import PLAN_KWARG, Family, attention_kind, family_for
from swarm.models.weights import load_tensors, tensor_index
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)


class BlockStack(nn.Module):
    """Blocks ``span`` of a model; block i of the span has ``layer_idx`` i."""

    def __init__(self, config: PretrainedConfig, family: Family, span: BlockRange, blocks: list[nn.Module]):
        super().__init__()
        self.config, self.family, self.span = config, family, span
        self.blocks = nn.ModuleList(blocks)
        self.rotary = family.build_rotary(config)
        self.kinds = [attention_kind(config, index) for index in range(span.start, span.end)]
        self.lora = LoraHooks(self.blocks, span.start)

    def run(self, items: list[Work], num_blocks: int) -> list[torch.Tensor]:
        """Run ``num_blocks`` blocks from the items' common ``cursor`` on all of them at once; returns each
        item's output hidden states [batch, tokens, hidden_size]. Items with ``block_outputs`` get each
        block's output appended there."""
        segments, start = [], 0
        for item in items:
            batch, tokens, _ = item.hidden.shape
            segments.append(Segment(start, batch, tokens, item.cache, item.block_offset, item.padding, item.adapter))
            start += batch * tokens
        hidden_size = self.config.hidden_size
        hidden = _flat([item.hidden.reshape(1, -1, hidden_size) for item in items])  # [1, total, hidden]
        position_ids = _flat([item.position_ids.reshape(1, -1) for item in items])  # [1, total]
        sizes = [s.end - s.start for s in segments]
        embeddings = self.family.position_embeddings(self.rotary, hidden, position_ids, sizes)
        plan = Plan(segments)
        attention_kwargs = {PLAN_KWARG: plan}
        prompted = [(item, segment) for item, segment in zip(items, segments, strict=True) if item.prompts is not None]
        for item in items:
            if item.adapter is not None:
                self.lora.ensure(item.adapter)
        self.lora.plan = plan if any(item.adapter is not None for item in items) else None
        first = items[0].cursor
        try:
            for absolute in range(first, first + num_blocks):
                local = absolute - self.span.start
                if prompted:
                    hidden = _add_prompts(hidden, prompted, absolute)
                hidden = self.family.call_block(
                    self.blocks[local], hidden, position_ids, embeddings[self.kinds[local]], attention_kwargs
                )
                for item, segment in zip(items, segments, strict=True):
                    if item.block_outputs is not None:
                        item.block_outputs.append(_rows(hidden, segment, hidden_size))
        finally:
            self.lora.plan = None
        return [_rows(hidden, s, hidden_size) for s in segments]


def _rows(hidden: torch.Tensor, segment: Segment, hidden_size: int) -> torch.Tensor:
    """A segment's part of [1, total, hidden] as [batch, tokens, hidden] (a view)."""
    return hidden[0, segment.start : segment.end].view(segment.batch, segment.tokens, hidden_size)


def _add_prompts(hidden: torch.Tensor, prompted: list[tuple[Work, Segment]], absolute: int) -> torch.Tensor:
    """Add each item's deep prompt of block ``absolute`` to its first ``prefix`` tokens of every row
    (out of place: ``hidden`` may be an item's input, kept for backward)."""
    indices, values = [], []
    for item, segment in prompted:
        prompt = item.prompts[absolute - item.blocks.start]  # [batch or 1, prefix, hidden]
        prefix = prompt.shape[1]
        rows = torch.arange(segment.batch).unsqueeze(1) * segment.tokens + segment.start  # [batch, 1]
        indices.append((rows + torch.arange(prefix)).reshape(-1))  # token-axis index of each prompted token
        values.append(prompt.expand(segment.batch, prefix, -1).reshape(-1, prompt.shape[-1]))
    index, source = torch.cat(indices), torch.cat(values).to(hidden.dtype)
    return hidden.index_add(1, index, source.unsqueeze(0))


def _flat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def load_block_stack(folder: Path, config: PretrainedConfig, span: BlockRange, dtype: torch.dtype) -> BlockStack:
    """Build blocks ``span`` and load only their weights from the folder's safetensors files."""
    config._attn_implementation = ATTENTION_NAME
    family = family_for(config)
    if family.transformers_blocks:
        register_hf_attention()
    index = tensor_index(folder)
    blocks = []
    started = time.perf_counter()
    for local, absolute in enumerate(range(span.start, span.end)):
        prefix = family.checkpoint_prefix(family.block_prefix(absolute), index)
        state = load_tensors(folder, lambda name, p=prefix: name.startswith(p), dtype, index)
        if not state:
            raise ValueError(f"block {absolute} has no weights in {folder}")
        state = {name[len(prefix) :]: value for name, value in state.items()}
        blocks.append(family.load_block(config, absolute, state, cache_index=local))  # cache: index in the span
        logger.info("Loaded block %d (%d/%d) in %.1f s", absolute, local + 1, len(span), time.perf_counter() - started)
    return BlockStack(config, family, span, blocks).eval().requires_grad_(False)  # frozen: gradients go to inputs only
