"""Private mode: blocks the client computes itself, so servers never see the prompt's token embeddings.

With ``ClientConfig.local_blocks = N`` the client runs blocks [0, N) itself, and with ``local_last_blocks = M``
blocks [L - M, L) too; the servers run the blocks between (``LocalBlocks.remote``). The first server of a
chain then receives hidden states at depth N instead of the token embeddings (what a curious server can
read back from them at each depth: ``benchmarks/privacy.py``), and with M > 0 no server sees the input of the
final norm and head. The client computes its blocks with the servers' own compute core (``swarm.core``:
the same block stack, attention, LoRA hooks and KV cache), from the same weights, so every result is the
one a server would have given.

Both ways the model is used keep working. An inference session (``generate``, the API) keeps a KV cache
per local span (``open``) and runs each step through the first span, the servers and the last span
(``step``), including beam reorders, padding and deep prompts; a rewind or a failed step cuts those caches
back (``cut``). A stateless pass (training, ``output_hidden_states``) runs the local spans with autograd on
(``forward``), so gradients reach the inputs, the deep prompts and LoRA weights of local blocks as well.

Costs: the weights of N + M blocks and their KV caches in the client's memory, and their compute on the
client's CPU (the servers compute that much less). A LoRA adapter preloaded on the servers (chosen by name)
is not on the client: with local blocks, it is refused.

Concurrency: one lock serialises the client's own block computations (sessions on the event loop and
stateless passes on the caller's threads share the block stacks).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from transformers import PretrainedConfig

from client.hop import StepInput
from swarm.core.blocks import BlockStack, load_block_stack
from swarm.core.cache import KVGeometry, SessionCache
from swarm.core.work import ForwardPass, InferenceStep, run_to_end
from swarm.models.adapters import LoraAdapter
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

LocalCaches = dict[BlockRange, SessionCache]


def add_private_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of private mode (``--local-blocks``, ``--local-last-blocks``)."""
    parser.add_argument(
        "--local-blocks",
        type=int,
        default=0,
        help="private mode: run the model's first N blocks on this machine, so servers never see the prompt's "
        "embeddings (default 0; see the README's privacy table for what each depth leaks)",
    )
    parser.add_argument(
        "--local-last-blocks", type=int, default=0, help="private mode: also run the model's last M blocks here"
    )


class LocalBlocks:
    """The first ``first`` and the last ``last`` blocks of the model, on the client."""

    def __init__(self, folder: Path, config: PretrainedConfig, first: int, last: int, dtype: torch.dtype):
        total = config.num_hidden_layers
        if first < 0 or last < 0 or first + last >= total:
            raise ValueError(
                f"local_blocks={first} and local_last_blocks={last} must leave at least one of the model's "
                f"{total} blocks to the servers"
            )
        self.remote = BlockRange(first, total - last)  # what the servers run
        spans = [BlockRange(0, first)] if first else []
        spans += [BlockRange(total - last, total)] if last else []
        config = copy.deepcopy(config)  # loading sets the attention implementation on its config
        self.stacks: dict[BlockRange, BlockStack] = {s: load_block_stack(folder, config, s, dtype) for s in spans}
        self.geometry = KVGeometry.from_config(config, dtype)
        self.dtype = dtype
        self._lock = threading.Lock()
        logger.info("Private mode: blocks %s run on this client, %s on servers", [str(s) for s in spans], self.remote)

    @property
    def head(self) -> BlockRange | None:
        """The local blocks before the servers' (None if there are none)."""
        return next((span for span in self.stacks if span.start == 0), None)

    @property
    def tail(self) -> BlockRange | None:
        """The local blocks after the servers' (None if there are none)."""
        return next((span for span in self.stacks if span.start > 0), None)

    def pieces(self, span: BlockRange) -> list[tuple[BlockRange, bool]]:
        """``span`` cut at the edges of the local spans, in order: (piece, whether the client runs it)."""
        cuts = sorted({span.start, span.end, *(x for s in self.stacks for x in (s.start, s.end) if x in span)})
        pieces = [BlockRange(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if a < b]
        return [(piece, any(piece.start in s for s in self.stacks)) for piece in pieces]

    def _stack(self, piece: BlockRange) -> BlockStack:
        return next(stack for span, stack in self.stacks.items() if piece.start in span)

    # -- inference sessions --

    def open(self, batch: int, max_length: int) -> LocalCaches:
        """Empty KV caches of the local spans for one session."""
        return {span: self.geometry.allocate(len(span), batch, max_length) for span in self.stacks}

    def step(self, caches: LocalCaches, span: BlockRange, item: StepInput, adapter: LoraAdapter | None) -> StepInput:
        """Run a session's step through local span ``span`` (its cache holds the session's tokens so far);
        the step with the span's output as its hidden states."""
        cache = caches[span]
        cache.check_room(item.hidden.shape[1])
        cache.set_padding(cache.length, item.attention_mask, item.hidden.shape[1])
        prompts = item.prompts[span.start : span.end] if item.prompts is not None else None
        work = InferenceStep(
            span,
            item.hidden.to(self.dtype),
            item.position_ids,
            cache,
            0,
            prompts=prompts.to(self.dtype) if prompts is not None else None,
            adapter=adapter.within(span) if adapter is not None else None,
            reorder=item.reorder,
        )
        with self._lock:
            output = run_to_end(self.stacks[span], work)
        return StepInput(output, item.position_ids, item.attention_mask, item.prompts, item.reorder)

    async def around(
        self,
        caches: LocalCaches,
        position: int,
        item: StepInput,
        adapter: LoraAdapter | None,
        remote: Callable[[StepInput], Awaitable[torch.Tensor]],
    ) -> torch.Tensor:
        """A session's step (the session holds ``position`` tokens) through the first local span, ``remote``
        (the servers' blocks) and the last local span. If any part fails, the local caches go back to
        ``position`` tokens."""
        try:
            if self.head is not None:
                item = self.step(caches, self.head, item, adapter)
            output = await remote(item)
            if self.tail is not None:
                output = self.step(caches, self.tail, dataclasses.replace(item, hidden=output), adapter).hidden
        except BaseException:
            self.cut(caches, position)
            raise
        return output

    @staticmethod
    def check_adapter(adapter: LoraAdapter | str | None) -> None:
        """Refuse an adapter preloaded on servers (by name): the client has no copy for its own blocks."""
        if isinstance(adapter, str):
            raise NotImplementedError(
                f"the adapter {adapter!r} is preloaded on servers, not on this client: it cannot run on the "
                "client's own blocks (local_blocks / local_last_blocks)"
            )

    @staticmethod
    def cut(caches: LocalCaches, tokens: int) -> None:
        """Keep only the first ``tokens`` tokens of every local cache (a rewind, or a step that failed)."""
        for cache in caches.values():
            cache.length = min(cache.length, tokens)

    # -- stateless passes --

    def forward(
        self,
        piece: BlockRange,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        padding: torch.Tensor | None,
        prompts: torch.Tensor | None,
        adapter: LoraAdapter | None,
        hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Blocks ``piece`` (inside one local span) on [batch, tokens, hidden] with autograd on: (the output,
        every block's output but the last when ``hidden_states``). ``prompts`` [len(piece), 1 or batch, prefix,
        hidden]; ``adapter``: LoRA weights as parameters (gradients flow to them)."""
        stack = self._stack(piece)
        outputs: list[torch.Tensor] | None = [] if hidden_states else None
        work = ForwardPass(
            piece,
            hidden.to(self.dtype),
            position_ids,
            block_offset=piece.start - stack.span.start,
            padding=padding,
            prompts=prompts,
            adapter=adapter,
            block_outputs=outputs,
        )
        with self._lock:
            (output,) = stack.run([work], len(piece))
        return output, tuple(outputs[:-1]) if outputs else ()
