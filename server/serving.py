"""Serving: everything that serves one span (blocks, compute backend, sessions, limits).

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
from server.backend import Backend
from server.blocks import BlockStack
from server.cache import CacheBudget, KVGeometry
from server.config import ServerConfig
from server.sessions import SessionStore
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)


@dataclass
class Serving:
    span: BlockRange
    stack: BlockStack
    backend: Backend
    store: SessionStore
    limits: validation.Limits
    draining: bool = False  # no new sessions or steps (shutdown, or retired after a move)

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
        backend = Backend(stack, dtype, step_delay=config.test_step_delay)
        return cls(span, stack, backend, SessionStore(budget, geometry, span), limits)

    async def retire(self, grace: float) -> None:
        """Let open sessions finish for up to ``grace`` seconds, then refuse their steps and stop."""
        deadline = time.monotonic() + grace
        while len(self.store) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if len(self.store):
            logger.info("Handing off %d sessions on blocks %s to other servers", len(self.store), self.span)
        self.draining = True
        deadline = time.monotonic() + grace
        while self.backend.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.backend.shutdown()
