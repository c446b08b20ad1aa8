"""Inference sessions: one per (client stream, server), each with its own preallocated KV cache.

A session lives exactly as long as its stream; the store only tracks what is open, for the budget
and for shutdown. The registry spans every store (a server that moved has two) and answers the
questions that cross streams: which sessions are open, and how many a peer holds. The inputs of
headers' steps (push mode) wait in ``server.mailbox``.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.core.cache import CacheBudget, KVGeometry, SessionCache
from swarm.errors import InvalidRequestError, TooManyRequestsError
from swarm.models.adapters import LoraAdapter
from swarm.spans import BlockRange


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
    adapter: LoraAdapter | None = None  # LoRA for every step, chosen when the session opens

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


class SessionRegistry:
    """Open sessions of every span by id and how many each peer holds."""

    def __init__(self, max_per_peer: int):
        self.max_per_peer = max_per_peer
        self.sessions: dict[str, Session] = {}
        self.per_peer: dict[str, int] = {}

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
