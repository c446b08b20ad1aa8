"""Inference sessions: one per (client stream, server), each with its own preallocated KV cache.

A session lives exactly as long as its stream; the store only tracks what is open, for the budget
and for shutdown. The registry spans every store (a server that moved has two) and answers the
questions that cross streams: which session a push is for, and how many sessions a peer holds.

Who may fill a header's input: the client, on the session's own stream (a fallback), and the peer
the latest header named as the previous server of the chain (``pusher``). An empty name is the
legacy behaviour of clients that do not name one yet: any peer may push.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from swarm.core.cache import CacheBudget, KVGeometry, SessionCache
from swarm.errors import InvalidRequestError, SessionNotFoundError, TooManyRequestsError
from swarm.models.adapters import LoraAdapter
from swarm.spans import BlockRange

MAX_PENDING_INPUTS = 4  # pushed/relayed inputs a session holds ahead of its steps
EARLY_PUSH_SECONDS = 5.0  # how long a push may wait for the header that opens its session
EARLY_PUSH_BYTES = 32 << 20  # pushes held for sessions not open yet, all peers together (bytes)...
EARLY_PUSH_COUNT = 256  # ...and count...
EARLY_PUSH_SHARE = 4  # ...of which one peer may hold at most 1/this


@dataclass
class Session:
    session_id: str
    peer: str  # peer id of the client that opened it
    blocks: BlockRange  # absolute blocks this session runs
    batch_size: int
    max_length: int
    cache: SessionCache
    block_offset: int = 0  # index of the session's first block in the server's span
    points: float = 0.0  # the client's standing: a busy server runs steps of higher standing first
    next_step: int = 0
    # hidden inputs of headers' steps by position, with the peer that pushed each (None: the client relayed it)
    inputs: dict[int, tuple[torch.Tensor, str | None]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    pusher: str = ""  # the only peer allowed to push inputs, named by the latest header ("" = any: legacy)
    ended: Exception | None = None  # why the client's stream ended: a header still waiting gets no input
    adapter: LoraAdapter | None = None  # LoRA for every step, chosen when the session opens

    def may_push(self, sender: str | None) -> bool:
        """Whether an input from ``sender`` (None: the client, on its own stream) may fill a header."""
        return sender is None or not self.pusher or sender == self.pusher

    def expect_input(self, pusher: str) -> None:
        """A header names the previous server of the chain; inputs that others pushed ahead are dropped."""
        self.pusher = pusher
        self.inputs = {position: item for position, item in self.inputs.items() if self.may_push(item[1])}

    def deliver(self, position: int, hidden: torch.Tensor, sender: str | None = None) -> bool:
        """An input for a step announced by a header; the first one for a position wins."""
        if not self.may_push(sender) or position < self.position or position in self.inputs:
            return False
        if len(self.inputs) >= MAX_PENDING_INPUTS:
            return False
        self.inputs[position] = (hidden, sender)
        self.arrived.set()
        return True

    async def take(self, position: int, timeout: float) -> torch.Tensor:
        """Wait for the input of the step at ``position`` (pushed by the previous server or relayed)."""
        deadline = time.monotonic() + timeout
        while position not in self.inputs:
            if self.ended is not None:
                raise self.ended
            self.arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionNotFoundError(f"no input arrived for position {position} within {timeout:.0f} s")
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                continue
        return self.inputs.pop(position)[0]

    def end_inputs(self, reason: Exception) -> None:
        """The client's stream ended (or failed, for ``reason``): a header waiting for an input stops."""
        self.ended = reason
        self.arrived.set()

    def drop_stale_inputs(self) -> None:
        """Inputs for positions the cache has passed (pushed for steps that carried their own input)."""
        self.inputs = {position: item for position, item in self.inputs.items() if position >= self.position}

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.max_length

    @property
    def position(self) -> int:
        return self.cache.length


class SessionStore:
    """Open sessions of one span and the cache budget they draw from. Used from the event loop only."""

    def __init__(self, budget: CacheBudget, geometry: KVGeometry, span: BlockRange):
        self.budget, self.geometry, self.span = budget, geometry, span
        self.sessions: dict[str, Session] = {}

    def open(self, session_id: str, peer: str, blocks: BlockRange, batch_size: int, max_length: int) -> Session:
        if session_id in self.sessions:
            raise InvalidRequestError("this session id is already in use; choose another random id")
        self.budget.reserve(batch_size * max_length)
        try:
            cache = self.geometry.allocate(len(blocks), batch_size, max_length)
        except BaseException:
            self.budget.release(batch_size * max_length)
            raise
        session = Session(session_id, peer, blocks, batch_size, max_length, cache, blocks.start - self.span.start)
        self.sessions[session_id] = session
        return session

    def close(self, session: Session) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.budget.release(session.reserved_tokens)

    def __len__(self) -> int:
        return len(self.sessions)


@dataclass
class _EarlyPush:
    session_id: str
    position: int
    hidden: torch.Tensor
    sender: str
    expires: float

    @property
    def size(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()


class EarlyPushes:
    """Pushes that arrive a moment before the header that opens their session (the previous server
    can be faster than the client's header): held briefly, bounded in bytes overall and per peer."""

    def __init__(self, clock=time.monotonic):
        self.held: list[_EarlyPush] = []  # in arrival order
        self.clock = clock

    def hold(self, session_id: str, position: int, hidden: torch.Tensor, sender: str) -> bool:
        now = self.clock()
        self.held = [push for push in self.held if push.expires > now]
        push = _EarlyPush(session_id, position, hidden, sender, now + EARLY_PUSH_SECONDS)
        theirs = [held for held in self.held if held.sender == sender]
        if len(self.held) >= EARLY_PUSH_COUNT or len(theirs) >= EARLY_PUSH_COUNT // EARLY_PUSH_SHARE:
            return False
        total = sum(held.size for held in self.held) + push.size
        from_sender = sum(held.size for held in theirs) + push.size
        if total > EARLY_PUSH_BYTES or from_sender > EARLY_PUSH_BYTES // EARLY_PUSH_SHARE:
            return False
        self.held.append(push)
        return True

    def claim(self, session: Session) -> None:
        """Hand a newly opened session the pushes that came for it (of its batch size, if fresh)."""
        now, mine = self.clock(), [push for push in self.held if push.session_id == session.session_id]
        if not mine:
            return
        self.held = [push for push in self.held if push.session_id != session.session_id and push.expires > now]
        for push in mine:
            if push.expires > now and push.hidden.shape[0] == session.batch_size:
                session.deliver(push.position, push.hidden, push.sender)


class SessionRegistry:
    """Open sessions of every span by id (pushes find them here) and how many each peer holds."""

    def __init__(self, max_per_peer: int):
        self.max_per_peer = max_per_peer
        self.sessions: dict[str, Session] = {}
        self.per_peer: dict[str, int] = {}
        self.early = EarlyPushes()

    def check_can_open(self, session_id: str, peer: str) -> None:
        """Before anything is allocated: the id is free and the peer is below its session limit."""
        if self.per_peer.get(peer, 0) >= self.max_per_peer:
            raise TooManyRequestsError(f"this peer already has {self.max_per_peer} sessions open here")
        if session_id in self.sessions:  # says nothing about the session that holds it
            raise InvalidRequestError("this session id is already in use; choose another random id")

    def add(self, session: Session) -> None:
        self.check_can_open(session.session_id, session.peer)
        self.sessions[session.session_id] = session
        self.per_peer[session.peer] = self.per_peer.get(session.peer, 0) + 1
        self.early.claim(session)

    def remove(self, session: Session) -> None:
        if self.sessions.get(session.session_id) is not session:
            return
        del self.sessions[session.session_id]
        left = self.per_peer.pop(session.peer) - 1
        if left:
            self.per_peer[session.peer] = left

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def __len__(self) -> int:
        return len(self.sessions)
