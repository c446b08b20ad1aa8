"""Compute backend: runs the block stack on one worker thread, off the event loop.

All torch work of a server goes through ``Backend.run``; a single worker keeps steps in order and
lets the event loop keep serving the network while a step computes.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from server.blocks import BlockStack
from server.cache import KVGeometry
from server.sessions import Session
from server.validation import Step
from swarm.spans import BlockRange


class Backend:
    def __init__(self, stack: BlockStack, dtype: torch.dtype):
        self.stack, self.dtype = stack, dtype
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stamen-compute")
        self.in_flight = 0  # steps submitted and not finished, for graceful shutdown

    async def run(self, fn, *args):
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.in_flight -= 1

    async def inference_step(self, session: Session, step: Step) -> torch.Tensor:
        return await self.run(self._inference_step, session, step)

    async def forward(self, blocks: BlockRange, step: Step) -> torch.Tensor:
        return await self.run(self._forward, blocks, step)

    def _inference_step(self, session: Session, step: Step) -> torch.Tensor:
        return self.stack(step.hidden, step.position_ids, step.attention_mask, session.cache, session.blocks)

    def _forward(self, blocks: BlockRange, step: Step) -> torch.Tensor:
        return self.stack(step.hidden, step.position_ids, step.attention_mask, None, blocks)

    def measure_throughput(self, geometry: KVGeometry, repeats: int = 5) -> float:
        """Single-token inference steps per second through ONE block (batch 1): the span's rate x its length."""
        hidden_size = self.stack.config.hidden_size
        cache = geometry.allocate(len(self.stack.span), 1, repeats + 2)
        hidden = torch.zeros(1, 1, hidden_size, dtype=self.dtype)
        self.stack(hidden, torch.zeros(1, 1, dtype=torch.long), None, cache)  # warm-up
        started = time.perf_counter()
        for position in range(1, repeats + 1):
            self.stack(hidden, torch.full((1, 1), position, dtype=torch.long), None, cache)
        return repeats * len(self.stack.span) / max(time.perf_counter() - started, 1e-9)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
