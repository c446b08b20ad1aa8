"""The receiving side of push mode: the inputs of headers' steps, for every open session of the server.

A header is a step whose input comes from elsewhere: pushed by the previous server of the chain (the
peer the header names), or relayed by the client on the session's own stream when that server did not
push. Inputs wait in the session's box until its header takes them; a push for a session that is not
open yet (its previous server was faster than the client's ``Open``) is held for a moment and handed
over when the session opens, or dropped once the moment is over. Everything held is bounded: inputs per
session, and early pushes in count and bytes, overall and per sending peer.

Who may fill a box: the client (a relay), and the peer the latest header named. Before the first
header names one, pushes are kept; the header then drops those of any other peer.

Concurrency: used from the server's event loop only; ``take`` is the one coroutine, and wakes when an
input arrives or the session's stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from dataclasses import dataclass, field

import torch

from swarm.errors import SessionNotFoundError

logger = logging.getLogger(__name__)

MAX_PENDING_INPUTS = 4  # pushed/relayed inputs a session holds ahead of its steps
EARLY_PUSH_SECONDS = 5.0  # how long a push may wait for the session it is for to open
EARLY_PUSH_BYTES = 32 << 20  # pushes held for sessions not open yet, all peers together (bytes)...
EARLY_PUSH_COUNT = 256  # ...and count...
EARLY_PUSH_SHARE = 4  # ...of which one peer may hold at most 1/this


@dataclass
class _Box:
    """One session's inputs by position, each with the peer that pushed it (None: the client relayed it)."""

    batch_size: int
    inputs: dict[int, tuple[torch.Tensor, str | None]] = field(default_factory=dict)
    pusher: str | None = None  # the previous server named by the latest header (None: no header yet)
    position: int = 0  # the session's cache length: inputs for earlier positions are stale
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    ended: Exception | None = None  # why the client's stream ended: a header still waiting gets no input

    def allows(self, sender: str | None) -> bool:
        return sender is None or self.pusher is None or sender == self.pusher


@dataclass
class _Early:
    session_id: str
    position: int
    hidden: torch.Tensor
    sender: str
    expires: float

    @property
    def size(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()


class Mailbox:
    """Inputs of headers' steps by session id, and pushes held for sessions about to open."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.boxes: dict[str, _Box] = {}
        self.early: list[_Early] = []  # in arrival order

    def open(self, session_id: str, batch_size: int) -> None:
        """A session opened: it gets a box, with the pushes that came for it early (of its batch size)."""
        box = self.boxes[session_id] = _Box(batch_size)
        now = self.clock()
        mine = [held for held in self.early if held.session_id == session_id and held.expires > now]
        self.early = [held for held in self.early if held.session_id != session_id and held.expires > now]
        for held in mine:
            self._deliver(box, held.position, held.hidden, held.sender)

    def close(self, session_id: str) -> None:
        self.boxes.pop(session_id, None)

    def expect(self, session_id: str, pusher: str) -> None:
        """A header names the previous server of the chain; inputs that others pushed ahead are dropped."""
        box = self.boxes[session_id]
        box.pusher = pusher
        box.inputs = {position: item for position, item in box.inputs.items() if box.allows(item[1])}

    def push(self, session_id: str, position: int, hidden: torch.Tensor, sender: str) -> bool:
        """An input pushed by ``sender`` (another server); held briefly if its session is not open yet."""
        box = self.boxes.get(session_id)
        if box is None:
            accepted = self._hold(session_id, position, hidden, sender)
            if not accepted:
                logger.debug("Dropped a push from %s for a session this server does not hold", sender)
            return accepted
        if not box.allows(sender):
            logger.info(
                "Dropped a push from %s into session %s: its client named another previous server", sender, session_id
            )
            return False
        accepted = self._deliver(box, position, hidden, sender)
        if not accepted:
            logger.debug("Dropped a push from %s for position %d of %s", sender, position, session_id)
        return accepted

    def relay(self, session_id: str, position: int, hidden: torch.Tensor) -> bool:
        """The client's copy of a header's input, sent on the session's own stream."""
        return self._deliver(self.boxes[session_id], position, hidden, None)

    async def take(self, session_id: str, position: int, timeout: float) -> torch.Tensor:
        """Wait for the input of the header's step at ``position`` (pushed or relayed)."""
        box = self.boxes[session_id]
        deadline = time.monotonic() + timeout
        while position not in box.inputs:
            if box.ended is not None:
                raise box.ended
            box.arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionNotFoundError(f"no input arrived for position {position} within {timeout:.0f} s")
            try:
                await asyncio.wait_for(box.arrived.wait(), remaining)
            except TimeoutError:
                continue
        return box.inputs.pop(position)[0]

    def end(self, session_id: str, reason: Exception) -> None:
        """The client's stream ended (or failed, for ``reason``): a header waiting for an input stops."""
        box = self.boxes.get(session_id)
        if box is not None:
            box.ended = reason
            box.arrived.set()

    def advance(self, session_id: str, position: int) -> None:
        """The session's cache reached ``position``: inputs for earlier positions will never be taken."""
        box = self.boxes[session_id]
        box.position = position
        box.inputs = {at: item for at, item in box.inputs.items() if at >= position}

    @staticmethod
    def _deliver(box: _Box, position: int, hidden: torch.Tensor, sender: str | None) -> bool:
        """The first input for a position wins; at most MAX_PENDING_INPUTS wait."""
        if hidden.shape[0] != box.batch_size or position < box.position or position in box.inputs:
            return False
        if len(box.inputs) >= MAX_PENDING_INPUTS:
            return False
        box.inputs[position] = (hidden, sender)
        box.arrived.set()
        return True

    def expire(self) -> None:
        """Drop the early pushes whose session did not open in time."""
        now = self.clock()
        self.early = [held for held in self.early if held.expires > now]

    def _hold(self, session_id: str, position: int, hidden: torch.Tensor, sender: str) -> bool:
        self.expire()
        push = _Early(session_id, position, hidden, sender, self.clock() + EARLY_PUSH_SECONDS)
        theirs = [held for held in self.early if held.sender == sender]
        if len(self.early) >= EARLY_PUSH_COUNT or len(theirs) >= EARLY_PUSH_COUNT // EARLY_PUSH_SHARE:
            return False
        total = sum(held.size for held in self.early) + push.size
        from_sender = sum(held.size for held in theirs) + push.size
        if total > EARLY_PUSH_BYTES or from_sender > EARLY_PUSH_BYTES // EARLY_PUSH_SHARE:
            return False
        self.early.append(push)
        # dropped when it expires even if no other push comes (an idle server would hold it); outside an event
        # loop (unit tests drive the mailbox by hand) it goes with the next push
        with suppress(RuntimeError):
            asyncio.get_running_loop().call_later(EARLY_PUSH_SECONDS + 0.1, self.expire)
        return True
