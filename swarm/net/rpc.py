"""Calls to one server (by clients, and by servers for pushes and pings): a persistent inference
stream, and unary forward / backward / info / receipt calls.

Every failure to reach or hear from a server surfaces as ``ServerFailure`` (with the peer id), so the
caller can ban that server and route around it; typed errors the server sent are kept as the cause.
"""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.p2p import P2P, PeerID

from proto import pb, rpc_name
from swarm import errors

logger = logging.getLogger(__name__)


class ServerFailure(Exception):
    """A server failed us (unreachable, timed out, broke the stream, or answered with an error)."""

    def __init__(self, peer_id: str, reason: str, cause: BaseException | None = None):
        self.peer_id, self.reason, self.cause = peer_id, reason, cause
        super().__init__(f"server {peer_id}: {reason}")

    @property
    def is_client_error(self) -> bool:
        """The server rejected our request as malformed: retrying elsewhere will not help."""
        return isinstance(self.cause, errors.InvalidRequestError)


class InferenceStream:
    """One bidirectional inference stream (= one server-side session) with one server."""

    def __init__(self, p2p: P2P, peer_id: str):
        self.p2p, self.peer_id = p2p, peer_id
        self._requests: asyncio.Queue[pb.InferenceRequest | None] = asyncio.Queue()
        self._responses = None

    async def open(self, timeout: float) -> None:
        async def requests():
            while (request := await self._requests.get()) is not None:
                yield request

        try:
            self._responses = await asyncio.wait_for(
                self.p2p.iterate_protobuf_handler(
                    PeerID.from_base58(self.peer_id), rpc_name("Inference"), requests(), pb.InferenceResponse
                ),
                timeout,
            )
        except Exception as exc:
            raise ServerFailure(self.peer_id, f"cannot open a stream: {exc!r}", exc) from exc

    async def step(self, request: pb.InferenceRequest, timeout: float) -> pb.InferenceResponse:
        self.send(request)
        return await self.receive(timeout)

    def send(self, request: pb.InferenceRequest) -> None:
        """Queue a message for the server (written in order by the stream's writer task)."""
        self._requests.put_nowait(request)

    async def receive(self, timeout: float) -> pb.InferenceResponse:
        """The server's next answer; ServerFailure if it breaks, errs or stays silent past ``timeout``."""
        try:
            response = await asyncio.wait_for(self._responses.__anext__(), timeout)
        except TimeoutError as exc:
            raise ServerFailure(self.peer_id, f"no answer within {timeout:.1f} s", exc) from exc
        except StopAsyncIteration as exc:
            raise ServerFailure(self.peer_id, "stream closed", exc) from exc
        except Exception as exc:
            raise ServerFailure(self.peer_id, f"stream broke: {exc!r}", exc) from exc
        if response.HasField("error"):
            cause = errors.from_proto(response.error, self.peer_id)
            raise ServerFailure(self.peer_id, str(cause), cause)
        return response

    def close(self) -> None:
        self._requests.put_nowait(None)


async def _call_unary(p2p: P2P, peer_id: str, rpc: str, request, response_type, timeout: float):
    """One unary call; every failure to get an answer, and every error the server answers, is a ServerFailure
    (the server's typed error kept as the cause)."""
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(PeerID.from_base58(peer_id), rpc_name(rpc), request, response_type), timeout
        )
    except Exception as exc:
        raise ServerFailure(peer_id, f"{rpc.lower()} failed: {exc!r}", exc) from exc
    if response_type is not pb.ServerRecord and response.HasField("error"):
        cause = errors.from_proto(response.error, peer_id)
        raise ServerFailure(peer_id, str(cause), cause)
    return response


async def call_forward(p2p: P2P, peer_id: str, request: pb.ForwardRequest, timeout: float) -> pb.ForwardResponse:
    return await _call_unary(p2p, peer_id, "Forward", request, pb.ForwardResponse, timeout)


async def call_backward(p2p: P2P, peer_id: str, request: pb.BackwardRequest, timeout: float) -> pb.BackwardResponse:
    return await _call_unary(p2p, peer_id, "Backward", request, pb.BackwardResponse, timeout)


async def call_info(p2p: P2P, peer_id: str, timeout: float, membership: bytes = b"") -> pb.ServerRecord:
    """The server's current record (state, span, free cache...), straight from the server."""
    return await _call_unary(p2p, peer_id, "Info", pb.InfoRequest(membership=membership), pb.ServerRecord, timeout)


async def call_receipt(p2p: P2P, peer_id: str, request: pb.ReceiptRequest, timeout: float) -> None:
    """Hand a server a receipt for its work; ServerFailure if it is unreachable or refuses it."""
    await _call_unary(p2p, peer_id, "Receipt", request, pb.ReceiptResponse, timeout)


async def ping(p2p, peer_id: str, tries: int = 2, timeout: float = 2.0, membership: bytes = b"") -> float | None:
    """Best round trip of a few Info calls, in seconds; None if the peer does not answer."""
    best = None
    for _ in range(tries):
        started = time.perf_counter()
        try:
            await call_info(p2p, peer_id, timeout, membership)
        except ServerFailure:
            return best
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return best
