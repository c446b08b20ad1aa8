"""A hostile peer for tests: a bare libp2p node that talks to a server directly, frame by frame.

Used by test_malformed.py and test_fuzz.py to send what a well-behaved client never would: raw
bytes, frames that declare huge lengths, pushes into other peers' sessions, floods of steps. The acts
(``StreamAct``, ``RawFrames``, ``Pushes``, ``Unary``, ``Flood``) are what ``fuzzcases`` draws; ``Fuzzer`` plays
them against one server and counts its answers (test_fuzz.py and benchmarks/fuzz.py).
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass

import psutil
import torch
from google.protobuf.message import Message
from hivemind.p2p import P2P, PeerID

from proto import pb, rpc_name
from swarm.net import tensors

HIDDEN = 64  # hidden size of the tiny test models
FRAME_END = P2P.ERROR_MARKER + (0).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)  # what ends a hivemind stream


class RawMessage:
    """Quacks like a protobuf message whose serialization is any bytes (for unary garbage)."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


class HostilePeer:
    """One peer id of its own (its own p2p daemon); every call runs on the caller's event loop."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self.peer_id = p2p.peer_id.to_base58()

    @classmethod
    async def start(cls, maddrs: list[str]) -> HostilePeer:
        return cls(await P2P.create(initial_peers=maddrs))

    async def stream(self, server: str, rpc: str = "Inference") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(server), rpc_name(rpc))
        return reader, writer

    async def unary(self, server: str, rpc: str, message, response_type):
        return await self.p2p.call_protobuf_handler(PeerID.from_base58(server), rpc_name(rpc), message, response_type)

    async def shutdown(self) -> None:
        with suppress(Exception):
            await self.p2p.shutdown()


async def send(writer: asyncio.StreamWriter, *messages) -> None:
    for message in messages:
        await P2P.send_protobuf(message, writer)


async def receive(reader: asyncio.StreamReader, timeout: float) -> pb.InferenceResponse | None:
    """The next answer on an inference stream; None if the server closed it or said nothing in time."""
    try:
        response, error = await asyncio.wait_for(P2P.receive_protobuf(pb.InferenceResponse, reader), timeout)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return None
    return response if error is None else pb.InferenceResponse(error=pb.Error(code=pb.INTERNAL, message=error.message))


async def answers(reader: asyncio.StreamReader, timeout: float) -> list[pb.InferenceResponse]:
    """Every answer until an error (the last answer of a stream), the end of the stream, or ``timeout``."""
    found, deadline = [], time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and (response := await receive(reader, left)) is not None:
        found.append(response)
        if response.HasField("error"):
            break
    return found


def fill(message, fields: dict):
    """Set ``fields`` on a protobuf message: tensors are serialized, ``push_to`` is (peer id, session id)."""
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            getattr(message, name).CopyFrom(tensors.to_proto(value))
        elif isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        elif name == "push_to":
            message.push_to.peer_id, message.push_to.session_id = value
        else:
            setattr(message, name, value)
    return message


def open_request(session_id: str, **fields) -> pb.InferenceRequest:
    """Opens a session over blocks 0:6 of batch 1 and max_length 16; ``fields`` override anything."""
    message = pb.Open(session_id=session_id, start_block=0, end_block=6, max_length=16, batch_size=1)
    return pb.InferenceRequest(open=fill(message, fields))


def step_request(step: int = 0, position: int = 0, tokens: int = 2, hidden=None, **fields) -> pb.InferenceRequest:
    """A step with random hidden states [1, tokens] (unless ``hidden`` is given); ``fields`` go on its spec."""
    hidden = torch.randn(1, tokens, HIDDEN) if hidden is None else hidden
    spec = fill(pb.StepSpec(step=step, position=position), fields)
    hidden = hidden if isinstance(hidden, pb.Tensor) else tensors.to_proto(hidden)
    return pb.InferenceRequest(step=pb.Step(spec=spec, hidden=hidden))


def header_request(push_from: str, step: int = 0, position: int = 0, **fields) -> pb.InferenceRequest:
    """A step whose input ``push_from`` pushes (or the client relays); ``fields`` go on its spec."""
    spec = fill(pb.StepSpec(step=step, position=position), fields)
    return pb.InferenceRequest(header=pb.Header(spec=spec, push_from=push_from))


def relay_request(position: int, hidden) -> pb.InferenceRequest:
    hidden = hidden if isinstance(hidden, pb.Tensor) else tensors.to_proto(hidden)
    return pb.InferenceRequest(relay=pb.Relay(position=position, hidden=hidden))


def session_start(session_id: str, tokens: int = 2, **open_fields) -> list[pb.InferenceRequest]:
    """A session opened and its first step, with random hidden states [1, tokens]."""
    return [open_request(session_id, **open_fields), step_request(tokens=tokens)]


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def suspicious(line: str) -> bool:
    """A server log line that means a request got further than a typed error."""
    if "Traceback" in line or " ERROR " in line:
        return True
    return "WARN" in line and any(name in line for name in ("server.handler", "server.streams", "p2p_daemon"))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass(frozen=True)
class StreamAct:
    """Inference messages on one stream, then the stream ended properly (``end``) or just dropped."""

    label: str
    messages: tuple[pb.InferenceRequest, ...]
    end: bool


@dataclass(frozen=True)
class RawFrames:
    """Bytes written as they are on an inference or push stream, then ``load_mb`` megabytes of zeros."""

    rpc: str
    data: bytes
    load_mb: int


@dataclass(frozen=True)
class Pushes:
    messages: tuple[pb.PushRequest, ...]


@dataclass(frozen=True)
class Unary:
    rpc: str  # Forward, Backward, Info or Receipt
    message: Message | RawMessage


@dataclass(frozen=True)
class Flood:
    """``sessions`` sessions opened at once by one peer, each on its own stream (steps of noise from ``seed``)."""

    sessions: int
    seed: int


UNARY_RESPONSES = {
    "Forward": pb.ForwardResponse,
    "Backward": pb.BackwardResponse,
    "Info": pb.ServerRecord,
    "Receipt": pb.ReceiptResponse,
}


def describe(act) -> str:
    """A short account of an act (its messages' kinds and sizes, not their megabytes)."""
    if isinstance(act, StreamAct):
        kinds = [f"{m.WhichOneof('kind')}({m.ByteSize()} B)" for m in act.messages]
        return f"{act.label}: {' '.join(kinds)}{' end' if act.end else ' drop'}"
    if isinstance(act, RawFrames | Unary):
        size = len(act.data) if isinstance(act, RawFrames) else len(act.message.SerializeToString())
        return f"{type(act).__name__} {act.rpc} {size} B: {str(act.message)[:300] if isinstance(act, Unary) else ''}"
    return repr(act)[:300]


class Fuzzer:
    """Plays acts against one server from hostile peers; counts what the server answered, by act and error code.
    An INTERNAL (or unspecified) error is a bug: it is kept with the act that caused it."""

    def __init__(self, server: str, peers: list[HostilePeer]):
        self.server, self.peers = server, peers
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.internal: list[str] = []
        self.acts = self.messages = 0

    async def play(self, peer_index: int, act) -> None:
        peer = self.peers[peer_index]
        self.acts += 1
        match act:
            case StreamAct():
                await self.stream(peer, act)
            case RawFrames():
                await self.raw(peer, act)
            case Pushes():
                await self.push(peer, act)
            case Unary():
                await self.unary(peer, act)
            case Flood():
                await self.flood(peer, act)

    def record(self, kind: str, responses: list[pb.InferenceResponse], act=None) -> None:
        for response in responses:
            name = pb.ErrorCode.Name(response.error.code) if response.HasField("error") else "answered"
            if response.HasField("error") and response.error.code in (pb.INTERNAL, pb.ERROR_CODE_UNSPECIFIED):
                self.internal.append(f"{kind}: {response.error.message} <- {describe(act)}")
            self.outcomes[f"{kind}: {name}"] += 1
        if not responses:
            self.outcomes[f"{kind}: closed"] += 1

    async def stream(self, peer: HostilePeer, act: StreamAct) -> None:
        reader, writer = await peer.stream(self.server)
        self.messages += len(act.messages)
        with suppress(ConnectionError):
            await send(writer, *act.messages)
            if act.end:
                writer.write(FRAME_END)
            self.record(act.label, await answers(reader, timeout=5 if act.end else 0.1), act)
        writer.close()

    async def raw(self, peer: HostilePeer, act: RawFrames) -> None:
        reader, writer = await peer.stream(self.server, act.rpc)
        self.messages += 1
        writer.write(act.data)
        with suppress(ConnectionError):
            for _ in range(act.load_mb):
                writer.write(bytes(1 << 20))
                await writer.drain()
        self.record("raw", await answers(reader, timeout=0.3), act)
        writer.close()

    async def push(self, peer: HostilePeer, act: Pushes) -> None:
        reader, writer = await peer.stream(self.server, "Push")
        self.messages += len(act.messages)
        with suppress(ConnectionError):
            await send(writer, *act.messages)
        self.record("push", await answers(reader, timeout=0.05), act)
        writer.close()

    async def unary(self, peer: HostilePeer, act: Unary) -> None:
        self.messages += 1
        try:
            call = peer.unary(self.server, act.rpc, act.message, UNARY_RESPONSES[act.rpc])
            response = await asyncio.wait_for(call, 10)
        except TimeoutError:
            self.outcomes[f"unary {act.rpc}: timed out"] += 1
            return
        except Exception as exc:  # garbage that does not parse: the server's p2p layer answers with an error
            self.outcomes[f"unary {act.rpc}: refused"] += 1
            if not isinstance(act.message, RawMessage):  # a request that parses: its handler raised
                self.internal.append(f"unary {act.rpc}: {exc!r} <- {describe(act)}")
            return
        failed = not isinstance(response, pb.ServerRecord) and response.HasField("error")
        answer = pb.InferenceResponse(error=response.error) if failed else pb.InferenceResponse()
        self.record(f"unary {act.rpc}", [answer], act)

    async def flood(self, peer: HostilePeer, act: Flood) -> None:
        streams = [await peer.stream(self.server) for _ in range(act.sessions)]
        noise = torch.randn(1, 2, HIDDEN, generator=torch.Generator().manual_seed(act.seed))
        for _, writer in streams:
            await send(writer, open_request("f-" + uuid.uuid4().hex), step_request(hidden=noise))
        self.messages += 2 * act.sessions
        for reader, writer in streams:
            self.record("many sessions", [r for r in [await receive(reader, timeout=10)] if r is not None])
            writer.write(FRAME_END)
            writer.close()
