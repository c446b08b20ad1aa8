"""The client's own computation of a span, as the referee of a disputed step (``client.verify``).

A client that has the model's folder (it loaded its embeddings and head from it) recomputes a disputed
span with the servers' own compute core (``swarm.core``): the same block stack, loading code, attention
plan, LoRA and KV cache, in float32. It replays the session's steps on that span through a fresh cache
exactly as a server would (each step's padding, deep prompts and beam reorder, the session's adapter),
so every family a server can serve has a local referee.

Memory: the referee keeps the weights of one span only, the last disputed one (a dispute on a span
inside it reuses them; any other span replaces them). The cache of a replay lives for that replay.

Concurrency: ``run`` is blocking torch work; the verifier calls it in the loop's executor. A lock keeps
two replays from sharing the block stack at once.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path

import torch
from transformers import PretrainedConfig

from client.hop import StepInput
from swarm.core.blocks import BlockStack, load_block_stack
from swarm.core.cache import KVGeometry
from swarm.core.work import InferenceStep, run_to_end
from swarm.models.adapters import LoraAdapter
from swarm.models.families import FAMILIES
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)


class LocalReferee:
    def __init__(self, folder: Path, config: PretrainedConfig):
        self.folder = Path(folder)
        self.config = copy.deepcopy(config)  # loading sets the attention implementation on its config
        self._stack: BlockStack | None = None  # the last disputed span's blocks, float32
        self._lock = threading.Lock()

    @property
    def loaded(self) -> BlockRange | None:
        """The span whose blocks are kept (None before the first dispute)."""
        return self._stack.span if self._stack is not None else None

    def can_run(self, steps: list[StepInput], adapter: LoraAdapter | str | None) -> bool:
        """Whether this referee computes what the servers did for ``steps``: any family the servers serve,
        with the session's own LoRA weights or none (an adapter preloaded on servers, named, is not here)."""
        return bool(steps) and self.config.model_type in FAMILIES and not isinstance(adapter, str)

    def run(self, span: BlockRange, steps: list[StepInput], adapter: LoraAdapter | None = None) -> torch.Tensor:
        """The span's output for the last of ``steps`` (the span's inputs from the session's start, as sent
        to its server): [batch, its tokens, hidden_size], in float32. ``adapter``: the session's LoRA."""
        with self._lock:
            stack = self._stack_for(span)
            return self._replay(stack, span, steps, _float32(adapter.within(span)) if adapter is not None else None)

    def _replay(
        self, stack: BlockStack, span: BlockRange, steps: list[StepInput], adapter: LoraAdapter | None
    ) -> torch.Tensor:
        """Every step of the session through a fresh cache of ``span``, as a server runs them."""
        batch = steps[0].hidden.shape[0]
        total = sum(step.hidden.shape[1] for step in steps)
        cache = KVGeometry.from_config(self.config, torch.float32).allocate(len(span), batch, total)
        offset = span.start - stack.span.start
        output = steps[0].hidden
        for step in steps:
            tokens = step.hidden.shape[1]
            cache.set_padding(cache.length, step.attention_mask, tokens)
            prompts = step.prompts[span.start : span.end].float() if step.prompts is not None else None
            work = InferenceStep(
                span,
                step.hidden.float(),
                step.position_ids,
                cache,
                offset,
                prompts=prompts,
                adapter=adapter,
                reorder=step.reorder,
            )
            output = run_to_end(stack, work)
        return output

    def _stack_for(self, span: BlockRange) -> BlockStack:
        """Blocks holding ``span``: the ones kept if they do, else ``span``'s alone (the others are dropped)."""
        kept = self._stack
        if kept is None or not (kept.span.start <= span.start and span.end <= kept.span.end):
            self._stack = None  # free the old blocks before loading the new ones
            self._stack = load_block_stack(self.folder, self.config, span, torch.float32)
            logger.info("Loaded blocks %s to referee disputed steps", span)
        return self._stack


def _float32(adapter: LoraAdapter) -> LoraAdapter:
    weights = {key: (a.detach().float(), b.detach().float()) for key, (a, b) in adapter.weights.items()}
    return LoraAdapter(adapter.rank, adapter.alpha, weights)
