"""Inference sessions: one per (client stream, server), each with its own preallocated KV cache.

A session lives exactly as long as its stream; the store only tracks what is open, for the budget
and for shutdown.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from server.cache import CacheBudget, KVGeometry, SessionCache
from swarm.errors import InvalidRequestError, SessionNotFoundError
from swarm.spans import BlockRange

MAX_PENDING_INPUTS = 4  # pushed/relayed inputs a session holds ahead of its steps


@dataclass
class Session:
    session_id: str
    peer: str  # peer id of the client that opened it
    blocks: BlockRange  # absolute blocks this session runs
    batch_size: int
    max_length: int
    cache: SessionCache
    next_step: int = 0
    last_used: float = field(default_factory=time.monotonic)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # hidden inputs by position (push/fallback)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, position: int, hidden: torch.Tensor) -> bool:
        """An input for a step announced by a header; the first one for a position wins."""
        if position < self.position or position in self.inputs or len(self.inputs) >= MAX_PENDING_INPUTS:
            return False
        self.inputs[position] = hidden
        self.arrived.set()
        return True

    async def take(self, position: int, timeout: float) -> torch.Tensor:
        """Wait for the input of the step at ``position`` (pushed by the previous server or relayed)."""
        deadline = time.monotonic() + timeout
        while position not in self.inputs:
            self.arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionNotFoundError(f"no input arrived for position {position} within {timeout:.0f} s")
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                continue
        return self.inputs.pop(position)

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.max_length

    @property
    def position(self) -> int:
        return self.cache.length


class SessionStore:
    """Open sessions and the cache budget they draw from. Used from the event loop only."""

    def __init__(self, budget: CacheBudget, geometry: KVGeometry, span: BlockRange):
        self.budget, self.geometry, self.span = budget, geometry, span
        self.sessions: dict[str, Session] = {}

    def open(self, session_id: str, peer: str, blocks: BlockRange, batch_size: int, max_length: int) -> Session:
        if session_id in self.sessions:
            raise InvalidRequestError(f"session {session_id!r} is already open")
        self.budget.reserve(batch_size * max_length)
        try:
            cache = self.geometry.allocate(len(blocks), batch_size, max_length, blocks.start - self.span.start)
        except BaseException:
            self.budget.release(batch_size * max_length)
            raise
        session = Session(session_id, peer, blocks, batch_size, max_length, cache)
        self.sessions[session_id] = session
        return session

    def close(self, session: Session) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.budget.release(session.reserved_tokens)

    def __len__(self) -> int:
        return len(self.sessions)
