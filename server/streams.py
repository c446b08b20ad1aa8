"""Streaming RPCs with bounded input: framed protobuf messages read under a size cap.

hivemind's protobuf stream handler reads into memory whatever length a peer declares. Here a frame
that declares more than the cap is refused before its body is read, a frame that does not parse
ends the stream, and one peer has at most a few streams of each RPC open at once. The framing is
hivemind's, so its clients (``iterate_protobuf_handler``) and our Pusher talk to these handlers
unchanged: a marker byte (0: a message; 1: an error, and an empty one ends the stream), the length
as 8 big-endian bytes, then the serialized message.

A refusal reaches the handler as a typed error raised by its request iterator, so the handler
answers it like any bad request. Concurrency: one task per stream; if the peer drops the connection
without ending the stream, its handler is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import closing, suppress

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.errors import InvalidRequestError, TooManyRequestsError

logger = logging.getLogger(__name__)

MESSAGE, ERROR = P2P.MESSAGE_MARKER, P2P.ERROR_MARKER
LENGTH_BYTES, BYTE_ORDER = P2P.HEADER_LEN, P2P.BYTEORDER

LINGER_SECONDS = 2.0  # how long a finished stream waits for the peer to close its side

StreamHandler = Callable[[AsyncIterator[Message], P2PContext], AsyncIterator[Message]]


class _Inbound:
    """The messages a peer sends on one stream, each read only if it fits the cap."""

    def __init__(self, reader: asyncio.StreamReader, message_type: type[Message], max_bytes: int):
        self.reader, self.message_type, self.max_bytes = reader, message_type, max_bytes
        self.dropped = asyncio.Event()  # the peer closed the connection without ending the stream
        self.ended = False  # the peer ended the stream (or dropped it): nothing more will be read

    async def messages(self, refusal: Exception | None = None) -> AsyncIterator[Message]:
        if refusal is not None:
            raise refusal
        while (header := await self._read(1 + LENGTH_BYTES)) is not None:
            marker, length = header[:1], int.from_bytes(header[1:], BYTE_ORDER)
            if marker == ERROR:  # hivemind clients end their streams with an empty error frame
                self.ended = True
                return
            if marker != MESSAGE:
                raise InvalidRequestError("malformed stream: unknown frame marker")
            if length > self.max_bytes:
                raise InvalidRequestError(f"message of {length} bytes exceeds this server's limit of {self.max_bytes}")
            if (body := await self._read(length)) is None:
                return
            message = self.message_type()
            try:
                message.ParseFromString(body)
            except (DecodeError, ValueError, RuntimeError):  # upb reports bad bytes as DecodeError; be safe
                raise InvalidRequestError(f"malformed stream: not a {self.message_type.__name__}") from None
            yield message

    async def _read(self, size: int) -> bytes | None:
        """Exactly ``size`` bytes, or None if the peer dropped the connection first."""
        try:
            return await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended = True
            self.dropped.set()
            return None


class BoundedStreams:
    """Registers stream handlers on a P2P whose input is capped in message size and streams per peer."""

    def __init__(self, p2p: P2P, max_bytes: Callable[[], int]):
        self.p2p, self.max_bytes = p2p, max_bytes
        self.open: dict[tuple[str, str], int] = {}  # (rpc, peer) -> streams open now

    async def add(self, name: str, handler: StreamHandler, message_type: type[Message], per_peer: int) -> None:
        async def serve(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            key = (name, info.peer_id.to_base58())
            self.open[key] = self.open.get(key, 0) + 1
            try:
                refusal = None
                if self.open[key] > per_peer:
                    refusal = TooManyRequestsError(f"this peer already has {per_peer} streams of this kind open here")
                inbound = _Inbound(reader, message_type, self.max_bytes())
                context = P2PContext(handle_name=name, local_id=self.p2p.peer_id, remote_id=info.peer_id)
                with closing(writer):
                    await self._run(handler(inbound.messages(refusal), context), inbound, writer)
                    if not inbound.ended:  # we stopped reading early, maybe inside a message
                        await _linger(reader)
            finally:
                left = self.open.pop(key) - 1
                if left:
                    self.open[key] = left

        await self.p2p.add_binary_stream_handler(name, serve)

    @staticmethod
    async def _run(responses: AsyncIterator[Message], inbound: _Inbound, writer: asyncio.StreamWriter) -> None:
        """Write the handler's answers until it ends; cancel it if the peer drops the connection."""
        answering = asyncio.create_task(_write_all(responses, writer))
        dropped = asyncio.create_task(inbound.dropped.wait())
        try:
            await asyncio.wait({answering, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
            answering.cancel()
            with suppress(asyncio.CancelledError):
                await answering


async def _linger(reader: asyncio.StreamReader) -> None:
    """Read and discard what the peer still sends, for a moment: closing a connection with unread input
    resets it, and the peer would lose our last answer (often the error that says why)."""
    with suppress(Exception):
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(1 << 16):
                pass


async def _write_all(responses: AsyncIterator[Message], writer: asyncio.StreamWriter) -> None:
    try:
        async for response in responses:
            await P2P.send_protobuf(response, writer)
    except (ConnectionError, asyncio.IncompleteReadError):
        logger.debug("Peer went away while we answered", exc_info=True)
    except Exception:  # a bug in a handler: it must not take the server down
        logger.exception("Stream handler failed")
        with suppress(Exception):
            await P2P.send_protobuf(RPCError(message="internal error"), writer)
    finally:
        await responses.aclose()
