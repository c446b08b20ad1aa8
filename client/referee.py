"""The client's own computation of a span, as the referee of a disputed step (``client.verify``).

A client that has the model's folder (it loaded its embeddings and head from it) can recompute any span
itself: it loads those blocks' weights on first use (only the disputed span's, in float32), and runs the
span's whole input history as one stateless causal pass with transformers' eager attention. Used for
families whose blocks take rotary embeddings and a 4D additive mask (Llama, Mistral, Qwen2) and for
sessions without padding, deep prompts, beam reorders or adapters; otherwise a third server referees.

Concurrency: ``run`` is blocking torch work; the verifier calls it in the loop's executor.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from client.hop import StepInput
from swarm.models.base import attention_kind, eager_config
from swarm.models.families import family_for
from swarm.models.weights import load_tensors, tensor_index
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")  # blocks called as (hidden, attention_mask, position_ids, position_embeddings)


class LocalReferee:
    def __init__(self, folder: Path, config: PretrainedConfig):
        self.folder, self.config = Path(folder), eager_config(config)
        self.config._attn_implementation = "eager"
        self._blocks: dict[int, nn.Module] = {}  # absolute index -> block, loaded on first use
        self._lock = threading.Lock()
        self._family = self._rotary = None

    def can_run(self, steps: list[StepInput], adapter) -> bool:
        """Whether this referee computes what the servers did for ``steps``."""
        return (
            self.config.model_type in FAMILIES
            and adapter is None
            and all(s.prompts is None and s.reorder is None for s in steps)
            and all(s.attention_mask is None or bool(s.attention_mask.all()) for s in steps)
        )

    def run(self, span: BlockRange, steps: list[StepInput]) -> torch.Tensor:
        """The span's output for the last of ``steps`` (the span's inputs from the session's start):
        [batch, its tokens, hidden_size], in float32."""
        hidden = torch.cat([step.hidden for step in steps], dim=1).float()  # [batch, total, hidden]
        position_ids = torch.cat([step.position_ids for step in steps], dim=1)  # [batch, total]
        with self._lock, torch.inference_mode():
            blocks = [self._block(index) for index in range(span.start, span.end)]
            rows = [self._row(span, blocks, hidden[r : r + 1], position_ids[r : r + 1]) for r in range(len(hidden))]
        return torch.cat(rows)[:, -steps[-1].hidden.shape[1] :]

    def _row(self, span: BlockRange, blocks: list[nn.Module], hidden: torch.Tensor, position_ids: torch.Tensor):
        """One sequence [1, total, hidden] through the span, causally."""
        embeddings = self._family.position_embeddings(self._rotary, hidden, position_ids)
        for index, block in zip(range(span.start, span.end), blocks, strict=True):
            kind = attention_kind(self.config, index)
            output = block(
                hidden,
                attention_mask=self._mask(kind, hidden.shape[1]),
                position_ids=position_ids,
                position_embeddings=embeddings[kind],
                use_cache=False,
            )
            hidden = output[0] if isinstance(output, tuple) else output
        return hidden

    def _mask(self, kind: str, tokens: int) -> torch.Tensor:
        """Additive causal mask [1, 1, tokens, tokens] (sliding layers also hide keys beyond the window)."""
        query, key = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
        hidden = key > query
        window = getattr(self.config, "sliding_window", None)
        if kind == "sliding_attention" and window:
            hidden |= key <= query - window
        return torch.zeros(tokens, tokens).masked_fill(hidden, torch.finfo(torch.float32).min)[None, None]

    def _block(self, index: int) -> nn.Module:
        if self._family is None:
            self._family = family_for(self.config)
            self._rotary = self._family.build_rotary(self.config)
        if index not in self._blocks:
            names = tensor_index(self.folder)
            prefix = self._family.checkpoint_prefix(self._family.block_prefix(index), names)
            state = load_tensors(self.folder, lambda name: name.startswith(prefix), torch.float32, names)
            state = {name[len(prefix) :]: value for name, value in state.items()}
            self._blocks[index] = self._family.load_block(self.config, index, state, cache_index=index)
            logger.info("Loaded block %d to referee disputed steps", index)
        return self._blocks[index]
