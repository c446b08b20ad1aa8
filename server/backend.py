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
from server.sessions import Session
from server.validation import Step
from swarm.spans import BlockRange


class Backend:
    def __init__(self, stack: BlockStack, dtype: torch.dtype, step_delay: float = 0.0):
        self.stack, self.dtype = stack, dtype
        self.step_delay = step_delay  # test-only: extra seconds per inference step, to simulate a slow server
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
        if self.step_delay:
            time.sleep(self.step_delay)  # on the compute thread, never the event loop
        return self.stack(step.hidden, step.position_ids, step.attention_mask, session.cache, session.blocks)

    def _forward(self, blocks: BlockRange, step: Step) -> torch.Tensor:
        return self.stack(step.hidden, step.position_ids, step.attention_mask, None, blocks)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
