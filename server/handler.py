"""RPC handler: translates protobuf requests into validated domain objects and back.

It validates and delegates (to the session store and the span's Serving); it never touches nn.Modules.
Stateless passes (Forward, Backward) are ``server.passes``; this module registers them with the rest.
Every exception is mapped to a ``pb.Error`` in one place, so a bad request gets a clear error and
the server keeps serving everyone else.

What one peer can hold is bounded: its sessions (``max_sessions_per_peer``), its streams of each
kind (``server.streams``), the size of each message, the steps queued on a stream
(``max_queued_steps``), its forward passes in flight, and the inputs pushed ahead of a session's steps.
A session is bound to the stream that opened it; a push fills a header's input only if it comes
from the peer the header named (``push_from_peer_id``).
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
from server.passes import PassHandler, log_failure
from server.push import Pusher
from server.serving import Serving
from server.sessions import Session, SessionRegistry
from server.streams import BoundedStreams
from swarm import errors, tensors
from swarm.receipts import Receipt

logger = logging.getLogger(__name__)

PUSH_STREAMS_PER_PEER = 8  # a server pushes to us over one stream; a few more cover its reconnections


class _StreamState:
    """Per-stream state of rpc_inference: its session and the queue of steps read from the client."""

    def __init__(self):
        self.session: Session | None = None
        self.steps: asyncio.Queue = asyncio.Queue()  # requests, then None at the end, or an exception
        self.ended: Exception | None = None  # set when the client's side of the stream is over

    def end(self, reason: Exception) -> None:
        self.ended = reason
        if self.session is not None:
            self.session.end_inputs(reason)


class Handler:
    def __init__(self, current: Callable[[], Serving], record: Callable[[], pb.ServerRecord], config: ServerConfig):
        self.current = current  # the Serving that takes new work (it changes when the server moves)
        self.record = record
        self.idle_timeout = config.session_idle_timeout
        self.max_queued_steps = config.max_queued_steps
        self.max_per_peer = config.max_sessions_per_peer
        self.registry = SessionRegistry(config.max_sessions_per_peer)  # open sessions of every span
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
            "early_pushes": len(registry.early.held),
            "passes_peers": len(self.passes.in_flight),
            "stream_peers": len(self.streams.open) if self.streams is not None else 0,
        }

    async def rpc_inference(
        self, requests: AsyncIterator[pb.InferenceRequest], context: P2PContext
    ) -> AsyncIterator[pb.InferenceResponse]:
        peer = context.remote_id.to_base58()
        serving = self.current()  # a stream stays with the span it started on
        state = _StreamState()
        reader = asyncio.create_task(self._read_client(requests, state, serving.limits))
        try:
            while True:
                request = await self._next_request(state)
                if request is None:
                    return
                try:
                    if isinstance(request, Exception):
                        raise request
                    if state.session is None:
                        state.session = self._open(serving, request, peer)
                        if state.ended is not None:
                            state.session.end_inputs(state.ended)
                    yield await self._step(serving, state.session, request)
                except Exception as exc:  # mapped for the client; the server carries on
                    log_failure("inference", peer, exc)
                    step = request.step if isinstance(request, pb.InferenceRequest) else 0
                    yield pb.InferenceResponse(error=errors.to_proto(exc), step=step)
                    return
        finally:
            reader.cancel()
            if state.session is not None:
                self.registry.remove(state.session)
                serving.store.close(state.session)
                logger.debug("Closed session %s of %s", state.session.session_id, peer)

    async def _next_request(self, state: _StreamState) -> pb.InferenceRequest | Exception | None:
        """The client's next step or header; an exception if the stream failed or stayed idle too long."""
        try:
            return await asyncio.wait_for(state.steps.get(), self.idle_timeout)
        except TimeoutError:
            return errors.SessionNotFoundError(f"session closed after {self.idle_timeout:.0f} s idle")

    async def _read_client(
        self, requests: AsyncIterator[pb.InferenceRequest], state: _StreamState, limits: validation.Limits
    ) -> None:
        """Steps and headers go to the (bounded) step queue; fallback inputs go straight to the session."""
        try:
            async for request in requests:
                if request.fallback:
                    self._relay(state.session, request, limits)
                elif state.steps.qsize() >= self.max_queued_steps:
                    raise errors.InvalidRequestError(
                        f"more than {self.max_queued_steps} steps sent ahead of the server's answers"
                    )
                else:
                    state.steps.put_nowait(request)
            state.steps.put_nowait(None)
            state.end(errors.SessionNotFoundError("the stream ended before the input of a header's step arrived"))
        except Exception as exc:
            state.steps.put_nowait(exc)
            state.end(exc)

    @staticmethod
    def _relay(session: Session | None, request: pb.InferenceRequest, limits: validation.Limits) -> None:
        """A fallback: the client relays the input of a header's step (its previous server did not push)."""
        if session is None:
            raise errors.InvalidRequestError("a fallback input must follow its step's header")
        session.deliver(request.position, validation.pushed_input(request.hidden, limits, session.batch_size))

    async def rpc_push(self, requests: AsyncIterator[pb.PushRequest], context: P2PContext):
        """Outputs pushed by the previous server of a chain, for our sessions (anything else is dropped)."""
        peer = context.remote_id.to_base58()
        try:
            checked = False
            async for request in requests:
                if not checked:  # the stream is bound to the authenticated peer: one proof suffices
                    self.gate.check(peer, request.membership)
                    checked = True
                self._accept_push(request, peer)
        except errors.StamenError as exc:
            logger.info("Closed a push stream from %s: %s", peer, exc)
        return
        yield  # an async generator that answers nothing

    def _accept_push(self, request: pb.PushRequest, peer: str) -> None:
        session = self.registry.get(request.session_id)
        if session is None:
            self._hold_early_push(request, peer)
            return
        if not session.may_push(peer):
            logger.info(
                "Dropped a push from %s into session %s: its client named another previous server",
                peer,
                session.session_id,
            )
            return
        try:
            hidden = validation.pushed_input(request.hidden, self.current().limits, session.batch_size)
        except errors.StamenError as exc:
            logger.info("Dropped a malformed push from %s: %s", peer, exc)
            return
        if not session.deliver(request.position, hidden, peer):
            logger.debug("Dropped a push from %s for position %d of %s", peer, request.position, session.session_id)

    def _hold_early_push(self, request: pb.PushRequest, peer: str) -> None:
        """A push for a session not open (yet): its header may be a moment behind; keep it briefly."""
        try:
            validation.check_session_id(request.session_id, "session_id")
            hidden = validation.pushed_input(request.hidden, self.current().limits, batch_size=None)
        except errors.StamenError as exc:
            logger.info("Dropped a malformed push from %s: %s", peer, exc)
            return
        if not self.registry.early.hold(request.session_id, request.position, hidden, peer):
            logger.debug("Dropped a push from %s for a session this server does not hold", peer)

    def _open(self, serving: Serving, request: pb.InferenceRequest, peer: str) -> Session:
        self.gate.check(peer, request.membership)
        if serving.leaving or serving.draining:
            raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
        if request.step != 0:
            raise errors.SessionNotFoundError(
                f"no session here to continue at step {request.step}; a stream must open its session at step 0"
            )
        opened = validation.open_request(request, serving.limits)
        validation.push_fields(request)
        adapter = extras.adapter(request.adapter, serving.limits, opened.blocks, serving.adapters, trainable=False)
        self.registry.check_can_open(opened.session_id, peer)  # before anything is allocated
        session = serving.store.open(opened.session_id, peer, opened.blocks, opened.batch_size, opened.max_length)
        session.points = self.ledger.request_standing(peer, request)
        session.adapter = adapter
        try:
            if request.expect_push:  # before the pushes that came early are handed over
                session.expect_input(request.push_from_peer_id)
            self.registry.add(session)
        except BaseException:
            serving.store.close(session)
            raise
        logger.debug(
            "Opened session %s of %s: blocks %s, batch %d, max_length %d",
            session.session_id,
            peer,
            session.blocks,
            session.batch_size,
            session.max_length,
        )
        return session

    async def _step(self, serving: Serving, session: Session, request: pb.InferenceRequest) -> pb.InferenceResponse:
        if serving.draining:
            raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
        if request.step != session.next_step:
            raise errors.InvalidRequestError(f"step {request.step} out of order, expected {session.next_step}")
        if request.position != session.position:
            raise errors.InvalidRequestError(
                f"position {request.position} sent, session cache holds {session.position}"
            )
        if request.expect_push == request.HasField("hidden"):
            raise errors.InvalidRequestError("a step carries its hidden states unless it is a header (expect_push)")
        if request.step and request.HasField("adapter"):
            raise errors.InvalidRequestError("an adapter is chosen when the session opens (step 0) and kept")
        validation.push_fields(request)
        reorder = extras.reorder(request.reorder, session.batch_size)
        session.next_step += 1
        hidden = request.hidden
        if request.expect_push:
            session.expect_input(request.push_from_peer_id)
            hidden = await session.take(request.position, self.idle_timeout)
        step = validation.step_input(
            hidden,
            request.position_ids,
            request.attention_mask,
            serving.limits,
            batch_size=session.batch_size,
            past=session.position,
        )
        compression = validation.output_compression(request.compression)
        batch, tokens, _ = step.hidden.shape
        prompts = extras.prompts(request.prompts, serving.limits, session.blocks, batch, tokens)
        output = tensors.to_proto(await serving.inference_step(session, step, prompts, reorder), compression)
        session.drop_stale_inputs()
        pushed = False
        if request.push_peer_id:
            push = pb.PushRequest(session_id=request.push_session_id, position=request.position, hidden=output)
            pushed = await self.pusher.push(request.push_peer_id, push)
        logger.debug("inference %s step %d: %s", session.session_id, request.step, list(step.hidden.shape))
        return pb.InferenceResponse(hidden=output, step=request.step, pushed=pushed, draining=serving.leaving)

    async def rpc_receipt(self, request: pb.ReceiptRequest, context: P2PContext) -> pb.ReceiptResponse:
        """A client acknowledges the work this server did for it (see ``swarm.receipts``)."""
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
