"""Typed errors shared by servers and clients, and their mapping to the wire ``Error`` message.

A server raises these below its handler; the handler maps them to ``pb.Error`` in one place
(``to_proto``); a client turns a received ``pb.Error`` back into the same class (``from_proto``).
The last three are the client's verification outcomes (``client.verify``); they never travel.
"""

from __future__ import annotations

from proto import pb


class StamenError(Exception):
    """Base class of every error Stamen reports to a user."""

    code: int = pb.INTERNAL


class InvalidRequestError(StamenError):
    """A request field is malformed (shape, dtype, positions, block range, step order...)."""

    code = pb.INVALID_ARGUMENT


class CacheFullError(StamenError):
    """The server's KV-cache budget cannot hold the requested session right now."""

    code = pb.CACHE_FULL


class SessionNotFoundError(StamenError):
    """The step refers to a session the server does not hold (expired or never opened)."""

    code = pb.SESSION_NOT_FOUND


class BlocksNotServedError(StamenError):
    """The requested blocks are outside the span this server hosts."""

    code = pb.BLOCKS_NOT_SERVED


class ShuttingDownError(StamenError):
    """The server is leaving the swarm and takes no new work."""

    code = pb.SHUTTING_DOWN


class TooManyRequestsError(StamenError):
    """This peer already holds as many sessions or streams on the server as it allows; go elsewhere."""

    code = pb.TOO_MANY_REQUESTS


class AdapterNotFoundError(StamenError):
    """The request names a LoRA adapter this server has not loaded; go to a server that announces it."""

    code = pb.ADAPTER_NOT_FOUND


class NotAMemberError(StamenError):
    """Private swarm: the caller did not prove it holds the swarm key."""

    code = pb.NOT_A_MEMBER


class RemoteInternalError(StamenError):
    """The server failed for a reason of its own; the request may be retried elsewhere."""

    code = pb.INTERNAL


class MissingBlocksError(StamenError):
    """No live server covers some blocks of the model (after waiting the allowed time)."""

    def __init__(self, blocks: list[int], detail: str = ""):
        self.blocks = list(blocks)
        ranges = format_blocks(self.blocks)
        super().__init__(f"no server in the swarm serves blocks {ranges}{': ' + detail if detail else ''}")


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        CacheFullError,
        SessionNotFoundError,
        BlocksNotServedError,
        ShuttingDownError,
        TooManyRequestsError,
        AdapterNotFoundError,
        NotAMemberError,
    )
}


def to_proto(exc: BaseException) -> pb.Error:
    """Map any exception raised while serving a request to the wire error (unknown ones are INTERNAL)."""
    if isinstance(exc, StamenError):
        return pb.Error(code=exc.code, message=str(exc))
    return pb.Error(code=pb.INTERNAL, message=f"{type(exc).__name__}: {exc}")


def from_proto(error: pb.Error, peer: str = "") -> StamenError:
    """Rebuild the typed error a server reported."""
    cls = _BY_CODE.get(error.code, RemoteInternalError)
    prefix = f"server {peer}: " if peer else ""
    return cls(prefix + error.message)


def format_blocks(blocks: list[int]) -> str:
    """[3, 4, 5, 9] -> '3:6, 9:10' (half-open ranges, as in --blocks)."""
    parts, ordered = [], sorted(set(blocks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(f"{ordered[i]}:{ordered[j] + 1}")
        i = j + 1
    return ", ".join(parts)


class CheatingDetected(StamenError):
    """A server's answer disagreed with another server's and with a referee's."""


class VerificationImpossible(StamenError):
    """verify=1: no other server could check a step within ``wait_for_blocks``, so its output was not used."""


class SessionRewound(StamenError):
    """A check found a wrong output the session had already used: the session went back to the last verified
    token (it now holds ``position`` tokens, on honest servers). Step again from there."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position
