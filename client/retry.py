"""The client's one retry policy, shared by inference sessions and stateless passes (forward, backward).

Each operation (an inference step, one chunk of a forward or backward pass) gets ``Attempts``. When a
server fails it: a malformed request is the caller's bug and is raised at once; otherwise the route
manager learns what the failure means (a server that moved or lacks an adapter: look at the swarm
again; an expired session: the server is fine; anything else: ban it, with exponential backoff), and
the operation is retried elsewhere until ``max_retries`` failovers are used up.
"""

from __future__ import annotations

import logging

from client.sequence import RouteManager
from swarm.errors import AdapterNotFoundError, BlocksNotServedError, SessionNotFoundError, StamenError
from swarm.net.rpc import ServerFailure

logger = logging.getLogger(__name__)


class Attempts:
    """The failovers one operation may still use."""

    def __init__(self, routes: RouteManager, allowed: int, what: str):
        self.routes, self.allowed, self.what = routes, allowed, what
        self.used = 0

    def failed(self, failure: ServerFailure) -> None:
        """Raise if the operation should give up; otherwise tell the route manager and return."""
        if failure.is_client_error:
            raise failure.cause
        self.used += 1
        if self.used > self.allowed:
            raise StamenError(f"{self.what} failed after {self.used} attempts; last: {failure}") from failure
        logger.warning("Server %s failed (%s); rerouting its blocks", failure.peer_id, failure.reason)
        if isinstance(failure.cause, BlocksNotServedError | AdapterNotFoundError):  # moved, or announced no adapter
            self.routes.invalidate()
        elif not isinstance(failure.cause, SessionNotFoundError):  # an expired session: the server is fine
            self.routes.ban(failure.peer_id, failure.reason)
