"""Serving: everything that serves one span (blocks, compute scheduler, sessions, limits).

A server has one current Serving; when it moves to another span it builds a new one, switches new
work to it, and retires the old one once its sessions end (or hands them off after a grace period:
their next step gets SHUTTING_DOWN and the client replays them elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from server import validation
from server.blocks import BlockStack
from server.cache import CacheBudget, KVGeometry
from server.config import ServerConfig
from server.scheduler import Scheduler, SchedulerConfig
from server.sessions import Session, SessionStore
from server.work import Kind, Work, step_kind
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)


@dataclass
class Serving:
    span: BlockRange
    stack: BlockStack
    scheduler: Scheduler
    store: SessionStore
    limits: validation.Limits
    leaving: bool = False  # no new sessions; open ones are still served, and told to move elsewhere
    draining: bool = False  # no new sessions or steps (the end of a shutdown, or of a retirement after a move)

    @classmethod
    def build(
        cls,
        stack: BlockStack,
        config: ServerConfig,
        model_config: PretrainedConfig,
        dtype: torch.dtype,
        budget: CacheBudget,
    ) -> Serving:
        span = stack.span
        geometry = KVGeometry.from_config(model_config, dtype)
        limits = validation.Limits.build(span, model_config.hidden_size, dtype, config)
        scheduler = Scheduler(
            stack,
            SchedulerConfig(
                max_batch_tokens=config.max_batch_tokens,
                chunk_token_blocks=config.chunk_token_blocks,
                step_delay=config.test_step_delay,
            ),
        )
        return cls(span, stack, scheduler, SessionStore(budget, geometry, span), limits)

    async def inference_step(self, session: Session, step: validation.Step) -> torch.Tensor:
        """Run a validated step of ``session`` through its blocks (its cache grows by the new tokens)."""
        batch, tokens, _ = step.hidden.shape
        session.cache.check_room(tokens)
        session.cache.set_padding(session.position, step.attention_mask, tokens)
        kind = step_kind(batch * tokens, self.scheduler.config.decode_tokens)
        work = Work(kind, session.blocks, step.hidden, step.position_ids, session.cache, session.block_offset)
        work.points = session.points
        return await self.scheduler.submit(work)

    async def forward(self, blocks: BlockRange, step: validation.Step, points: float = 0.0) -> torch.Tensor:
        """A stateless pass of a validated batch through ``blocks`` (``points``: the requester's standing)."""
        offset = blocks.start - self.span.start
        work = Work(Kind.FORWARD, blocks, step.hidden, step.position_ids, None, offset, step.attention_mask, points)
        return await self.scheduler.submit(work)

    async def wind_down(self, grace: float) -> None:
        """Tell clients to move (in every answer) while serving their sessions for up to ``grace`` seconds or
        until they have left, then refuse steps and let the ones in flight finish."""
        self.leaving = True
        deadline = time.monotonic() + grace
        while len(self.store) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if len(self.store):
            logger.info("Handing off %d sessions on blocks %s to other servers", len(self.store), self.span)
        self.draining = True
        deadline = time.monotonic() + grace
        while self.scheduler.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def retire(self, grace: float) -> None:
        """After a move: wind down, then stop computing."""
        await self.wind_down(grace)
        self.scheduler.shutdown()
