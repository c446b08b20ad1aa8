"""hivemind's control connection to the libp2p daemon, made to survive answers that come too late.

Every unary call (Info and liveness pings, Forward, Backward, receipts, the DHT's own RPCs) of a ``P2P``
handle is one request on a persistent connection to its daemon, and one task of hivemind's reads every
answer and resolves the waiting call's future. When a call is cancelled (a timeout, or a ping no longer
needed) at the moment its answer arrives, that task finds the future still listed but already cancelled,
``set_result`` raises ``InvalidStateError``, and the task ends: from then on no unary call of that handle
ever gets an answer, while its streams keep working. Found by ``benchmarks/soak.py``: after a few hundred
sessions every forward pass and ping of a client timed out (and, through the bans that followed, the API
answered 503 ``missing_blocks``).

``harden(p2p)`` replaces two tables of the handle's control client (hivemind 1.1's private names):
pending calls whose future is already done are not offered to the reader, and finished handler tasks
(a call the caller cancelled never removes its own) are dropped, so neither table grows.
"""

from __future__ import annotations

import asyncio
from typing import Any


class PendingCalls(dict):
    """Call id -> the caller's future; a future already done (cancelled, or answered) counts as absent."""

    def __contains__(self, call_id: object) -> bool:
        future = self.get(call_id)
        return future is not None and not future.done()


class HandlerTasks(dict):
    """Call id -> the task answering a peer's unary call; finished tasks are dropped as new ones come."""

    def __setitem__(self, call_id: Any, task: asyncio.Task) -> None:
        for done in [key for key, other in self.items() if other.done()]:
            del self[done]
        super().__setitem__(call_id, task)


def harden_control(control) -> None:
    """Apply both tables to a hivemind ``ControlClient`` (keeping what they hold)."""
    if not isinstance(control._pending_calls, PendingCalls):
        control._pending_calls = PendingCalls(control._pending_calls)
    if not isinstance(control._handler_tasks, HandlerTasks):
        control._handler_tasks = HandlerTasks(control._handler_tasks)


def harden(p2p):
    """``harden_control`` on a hivemind ``P2P`` handle's control client; returns the handle."""
    harden_control(p2p._client.control)
    return p2p


def sizes(p2p) -> dict[str, int]:
    """Entries of the handle's two tables (calls waiting for an answer, handlers answering peers)."""
    control = p2p._client.control
    return {"p2p_pending_calls": len(control._pending_calls), "p2p_handler_tasks": len(control._handler_tasks)}
