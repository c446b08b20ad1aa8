"""RPC handler: translates protobuf requests into validated domain objects and back.

It validates and delegates (to the session store, the mailbox and the span's Serving); it never touches
nn.Modules. Stateless passes (Forward, Backward) are ``server.passes``; this module registers them with
the rest. Every exception is mapped to a ``pb.Error`` in one place, so a bad request gets a clear error
and the server keeps serving everyone else.

An inference stream is typed messages (``pb.InferenceRequest``): an ``open`` first, then steps (with
their input) and headers (whose input the previous server pushes, or the client relays). The stream's
reader opens the session, queues steps and headers for the answering loop, and hands relays to the
mailbox; pushes from other servers arrive on ``rpc_push`` and go to the mailbox too.

What one peer can hold is bounded: its sessions (``max_sessions_per_peer``), its streams of each
kind (``server.streams``), the size of each message, the steps queued on a stream
(``max_queued_steps``), its forward passes in flight, and the inputs pushed ahead of a session's steps
(``server.mailbox``). A session is bound to the stream that opened it; a push fills a header's input
only if it comes from the peer the header named (``Header.push_from``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext

from proto import pb, rpc_name
from server import extras, validation
from server.config import ServerConfig
from server.gate import Gate
from server.ledger import Ledger
from server.mailbox import Mailbox
from server.passes import PassHandler, log_failure
from server.push import Pusher
from server.serving import Serving
from server.sessions import Session, SessionRegistry
from server.streams import BoundedStreams
from swarm import errors
from swarm.net import tensors
from swarm.net.receipts import Receipt

logger = logging.getLogger(__name__)

PUSH_STREAMS_PER_PEER = 8  # a server pushes to us over one stream; a few more cover its reconnections


class _StreamState:
    """Per-stream state of rpc_inference: its session and the queue of steps read from the client."""

    def __init__(self, serving: Serving, peer: str):
        self.serving, self.peer = serving, peer  # a stream stays with the span it started on
        self.session: Session | None = None
        self.steps: asyncio.Queue = asyncio.Queue()  # steps and headers, then None at the end, or an exception


class Handler:
    def __init__(self, current: Callable[[], Serving], record: Callable[[], pb.ServerRecord], config: ServerConfig):
        self.current = current  # the Serving that takes new work (it changes when the server moves)
        self.record = record
        self.idle_timeout = config.session_idle_timeout
        self.max_queued_steps = config.max_queued_steps
        self.max_per_peer = config.max_sessions_per_peer
        self.registry = SessionRegistry(config.max_sessions_per_peer)  # open sessions of every span
        self.mailbox = Mailbox()  # inputs of headers' steps, pushed or relayed
        self.passes = PassHandler(current, config.max_sessions_per_peer, lambda: self.gate, lambda: self.ledger)
        self.pusher: Pusher | None = None
        self.streams: BoundedStreams | None = None  # set by ``register``
        self.gate = Gate(None, "")  # private swarms: set by the server to check membership proofs
        self.ledger = Ledger("")  # points: set by the server (receipts, standings)

    async def register(self, p2p: P2P, pusher: Pusher) -> None:
        self.pusher = pusher
        self.streams = streams = BoundedStreams(p2p, lambda: self.current().limits.max_message_bytes)
        # a peer may hold more inference streams than sessions: a closing stream still counts for a moment
        await streams.add(rpc_name("Inference"), self.rpc_inference, pb.InferenceRequest, 2 * self.max_per_peer)
        await streams.add(rpc_name("Push"), self.rpc_push, pb.PushRequest, PUSH_STREAMS_PER_PEER)
        await p2p.add_protobuf_handler(rpc_name("Forward"), self.passes.rpc_forward, pb.ForwardRequest)
        await p2p.add_protobuf_handler(rpc_name("Backward"), self.passes.rpc_backward, pb.BackwardRequest)
        await p2p.add_protobuf_handler(rpc_name("Info"), self.rpc_info, pb.InfoRequest)
        await p2p.add_protobuf_handler(rpc_name("Receipt"), self.rpc_receipt, pb.ReceiptRequest)

    def sizes(self) -> dict[str, int]:
        """Entries of its long-lived structures (diagnostics: they must not grow with the work served)."""
        registry = self.registry
        return {
            "registry_sessions": len(registry.sessions),
            "registry_peers": len(registry.per_peer),
            "mailboxes": len(self.mailbox.boxes),  # one per open session, closed with it
            "early_pushes": len(self.mailbox.early),
            "passes_peers": len(self.passes.in_flight),
            "stream_peers": len(self.streams.open) if self.streams is not None else 0,
        }

    async def rpc_inference(
        self, requests: AsyncIterator[pb.InferenceRequest], context: P2PContext
    ) -> AsyncIterator[pb.InferenceResponse]:
        state = _StreamState(self.current(), context.remote_id.to_base58())
        reader = asyncio.create_task(self._read_client(requests, state))
        try:
            while True:
                request = await self._next_request(state)
                if request is None:
                    return
                try:
                    if isinstance(request, Exception):
                        raise request
                    yield await self._step(state, request)
                except Exception as exc:  # mapped for the client; the server carries on
                    log_failure("inference", state.peer, exc)
                    step = request.spec.step if isinstance(request, pb.Step | pb.Header) else 0
                    yield pb.InferenceResponse(error=errors.to_proto(exc), step=step)
                    return
        finally:
            reader.cancel()
            if state.session is not None:
                self.registry.remove(state.session)
                self.mailbox.close(state.session.session_id)
                state.serving.store.close(state.session)
                logger.debug("Closed session %s of %s", state.session.session_id, state.peer)

    async def _next_request(self, state: _StreamState) -> pb.Step | pb.Header | Exception | None:
        """The client's next step or header; an exception if the stream failed or stayed idle too long."""
        try:
            return await asyncio.wait_for(state.steps.get(), self.idle_timeout)
        except TimeoutError:
            return errors.SessionNotFoundError(f"session closed after {self.idle_timeout:.0f} s idle")

    async def _read_client(self, requests: AsyncIterator[pb.InferenceRequest], state: _StreamState) -> None:
        """The open message opens the session; steps and headers go to the (bounded) step queue; relays go
        straight to the mailbox."""
        ended: Exception = errors.SessionNotFoundError("the stream ended before the input of a header's step arrived")
        try:
            async for request in requests:
                self._read_one(request, state)
            state.steps.put_nowait(None)
        except Exception as exc:
            state.steps.put_nowait(exc)
            ended = exc
        if state.session is not None:
            self.mailbox.end(state.session.session_id, ended)

    def _read_one(self, request: pb.InferenceRequest, state: _StreamState) -> None:
        kind = request.WhichOneof("kind")
        if kind == "open":
            if state.session is not None:
                raise errors.InvalidRequestError("a stream opens one session, with its first message")
            state.session = self._open(state.serving, request.open, state.peer)
        elif state.session is None:
            raise errors.SessionNotFoundError("no session on this stream: its first message must open one")
        elif kind == "relay":
            hidden = validation.hidden_input(request.relay.hidden, state.serving.limits, state.session.batch_size)
            self.mailbox.relay(state.session.session_id, request.relay.position, hidden)
        elif kind not in ("step", "header"):
            raise errors.InvalidRequestError("an inference message must be an open, a step, a header or a relay")
        elif state.steps.qsize() >= self.max_queued_steps:
            raise errors.InvalidRequestError(
                f"more than {self.max_queued_steps} steps sent ahead of the server's answers"
            )
        else:
            state.steps.put_nowait(getattr(request, kind))

    async def rpc_push(self, requests: AsyncIterator[pb.PushRequest], context: P2PContext):
        """Outputs pushed by the previous server of a chain, for our sessions (anything else is dropped)."""
        peer = context.remote_id.to_base58()
        try:
            checked = False
            async for request in requests:
                if not checked:  # the stream is bound to the authenticated peer: one proof suffices
                    self.gate.check(peer, request.membership)
                    checked = True
                try:
                    validation.check_session_id(request.session_id, "session_id")
                    hidden = validation.hidden_input(request.hidden, self.current().limits, batch_size=None)
                except errors.StamenError as exc:
                    logger.info("Dropped a malformed push from %s: %s", peer, exc)
                    continue
                self.mailbox.push(request.session_id, request.position, hidden, peer)
        except errors.StamenError as exc:
            logger.info("Closed a push stream from %s: %s", peer, exc)
        return
        yield  # an async generator that answers nothing

    def _open(self, serving: Serving, request: pb.Open, peer: str) -> Session:
        self.gate.check(peer, request.membership)
        if serving.leaving or serving.draining:
            raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
        opened = validation.open_request(request, serving.limits)
        adapter = extras.adapter(request.adapter, serving.limits, opened.blocks, serving.adapters, trainable=False)
        self.registry.check_can_open(opened.session_id, peer)  # before anything is allocated
        session = serving.store.open(opened.session_id, peer, opened.blocks, opened.batch_size, opened.max_length)
        session.points = self.ledger.request_standing(peer, request)
        session.adapter = adapter
        try:
            self.registry.add(session)
        except BaseException:
            serving.store.close(session)
            raise
        self.mailbox.open(session.session_id, session.batch_size)  # with the pushes that came early
        logger.debug(
            "Opened session %s of %s: blocks %s, batch %d, max_length %d",
            session.session_id,
            peer,
            session.blocks,
            session.batch_size,
            session.max_length,
        )
        return session

    async def _step(self, state: _StreamState, request: pb.Step | pb.Header) -> pb.InferenceResponse:
        serving, session, spec = state.serving, state.session, request.spec
        if serving.draining:
            raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
        if spec.step != session.next_step:
            raise errors.InvalidRequestError(f"step {spec.step} out of order, expected {session.next_step}")
        if spec.position != session.position:
            raise errors.InvalidRequestError(f"position {spec.position} sent, session cache holds {session.position}")
        target, declared = validation.push_target(spec), validation.declared_round(spec)
        reorder = extras.reorder(spec.reorder, session.batch_size)
        compression = validation.output_compression(spec.compression)
        header = isinstance(request, pb.Header)
        if header:  # the legacy "any peer may push" is gone: a header names the previous server
            validation.check_peer_id(request.push_from, "push_from")
        session.next_step += 1
        if header:
            self.mailbox.expect(session.session_id, request.push_from)
            hidden = await self.mailbox.take(session.session_id, spec.position, self.idle_timeout)
        else:
            hidden = validation.hidden_input(request.hidden, serving.limits, session.batch_size)
        step = validation.step_input(hidden, spec.position_ids, spec.attention_mask, session.position, declared)
        batch, tokens, _ = step.hidden.shape
        prompts = extras.prompts(spec.prompts, serving.limits, session.blocks, batch, tokens)
        output = tensors.to_proto(await serving.inference_step(session, step, prompts, reorder), compression)
        self.mailbox.advance(session.session_id, session.position)
        pushed = False
        if target is not None:
            push = pb.PushRequest(session_id=target[1], position=spec.position, hidden=output)
            pushed = await self.pusher.push(target[0], push)
        logger.debug("inference %s step %d: %s", session.session_id, spec.step, list(step.hidden.shape))
        return pb.InferenceResponse(hidden=output, step=spec.step, pushed=pushed, draining=serving.leaving)

    async def rpc_receipt(self, request: pb.ReceiptRequest, context: P2PContext) -> pb.ReceiptResponse:
        """A client acknowledges the work this server did for it (see ``swarm.net.receipts``)."""
        peer = context.remote_id.to_base58()
        try:
            self.gate.check(peer, request.membership)
            self.ledger.accept(Receipt.from_proto(request.receipt), peer)
            return pb.ReceiptResponse()
        except Exception as exc:
            log_failure("receipt", peer, exc)
            return pb.ReceiptResponse(error=errors.to_proto(exc))

    async def rpc_info(self, request: pb.InfoRequest, context: P2PContext) -> pb.ServerRecord:
        self.gate.check(context.remote_id.to_base58(), request.membership)  # raised: the caller gets its text
        return self.record()
