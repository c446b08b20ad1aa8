"""RPC handler: translates protobuf requests into validated domain objects and back.

It validates and delegates (to the session store and the backend); it never touches nn.Modules.
Every exception is mapped to a ``pb.Error`` in one place, so a bad request gets a clear error and
the server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext

from proto import pb, rpc_name
from server import validation
from server.push import Pusher
from server.serving import Serving
from server.sessions import Session
from swarm import errors, tensors

logger = logging.getLogger(__name__)


class _StreamState:
    """Per-stream state of rpc_inference: its session and the queue of steps read from the client."""

    def __init__(self):
        self.session: Session | None = None
        self.steps: asyncio.Queue = asyncio.Queue()  # requests, then None at the end, or an exception


class Handler:
    def __init__(self, current: Callable[[], Serving], record: Callable[[], pb.ServerRecord], idle_timeout: float):
        self.current = current  # the Serving that takes new work (it changes when the server moves)
        self.record, self.idle_timeout = record, idle_timeout
        self.sessions: dict[str, Session] = {}  # open sessions of every span, by id (for pushes)
        self.pusher: Pusher | None = None

    async def register(self, p2p: P2P, pusher: Pusher) -> None:
        self.pusher = pusher
        await p2p.add_protobuf_handler(
            rpc_name("Inference"), self.rpc_inference, pb.InferenceRequest, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(rpc_name("Forward"), self.rpc_forward, pb.ForwardRequest)
        await p2p.add_protobuf_handler(rpc_name("Info"), self.rpc_info, pb.InfoRequest)
        await p2p.add_protobuf_handler(
            rpc_name("Push"), self.rpc_push, pb.PushRequest, stream_input=True, stream_output=True
        )

    async def rpc_inference(
        self, requests: AsyncIterator[pb.InferenceRequest], context: P2PContext
    ) -> AsyncIterator[pb.InferenceResponse]:
        peer = context.remote_id.to_base58()
        serving = self.current()  # a stream stays with the span it started on
        state = _StreamState()
        reader = asyncio.create_task(self._read_client(requests, state))
        try:
            while True:
                try:
                    request = await asyncio.wait_for(state.steps.get(), self.idle_timeout)
                except TimeoutError:
                    logger.info("Closing idle session %s of %s", state.session and state.session.session_id, peer)
                    error = errors.SessionNotFoundError(f"session closed after {self.idle_timeout:.0f} s idle")
                    yield pb.InferenceResponse(error=errors.to_proto(error))
                    return
                if request is None:
                    return
                try:
                    if isinstance(request, Exception):
                        raise request
                    if state.session is None:
                        state.session = self._open(serving, request, peer)
                        self.sessions[state.session.session_id] = state.session
                    response = await self._step(serving, state.session, request)
                    yield response
                except Exception as exc:  # mapped for the client; the server carries on
                    self._log_failure("inference", peer, exc)
                    step = request.step if isinstance(request, pb.InferenceRequest) else 0
                    yield pb.InferenceResponse(error=errors.to_proto(exc), step=step)
                    return
        finally:
            reader.cancel()
            if state.session is not None:
                self.sessions.pop(state.session.session_id, None)
                serving.store.close(state.session)
                logger.debug("Closed session %s of %s", state.session.session_id, peer)

    async def _read_client(self, requests: AsyncIterator[pb.InferenceRequest], state: _StreamState) -> None:
        """Steps and headers go to the step queue; fallback inputs go straight to the session."""
        try:
            async for request in requests:
                if not request.fallback:
                    state.steps.put_nowait(request)
                elif state.session is None:
                    raise errors.InvalidRequestError("a fallback input must follow its step's header")
                else:
                    state.session.deliver(request.position, tensors.from_proto(request.hidden, "hidden"))
            state.steps.put_nowait(None)
        except Exception as exc:
            state.steps.put_nowait(exc)

    async def rpc_push(self, requests: AsyncIterator[pb.PushRequest], context: P2PContext):
        """Outputs pushed by the previous server of a chain, for our sessions (unknown ids are dropped)."""
        async for request in requests:
            session = self.sessions.get(request.session_id)
            if session is None:
                continue
            try:
                session.deliver(request.position, tensors.from_proto(request.hidden, "hidden"))
            except errors.StamenError as exc:
                logger.info("Dropped a malformed push from %s: %s", context.remote_id.to_base58(), exc)
        return
        yield  # an async generator that answers nothing

    def _open(self, serving: Serving, request: pb.InferenceRequest, peer: str) -> Session:
        if serving.draining:
            raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
        if request.step != 0:
            raise errors.SessionNotFoundError(
                f"no session here to continue at step {request.step}; a stream must open its session at step 0"
            )
        opened = validation.open_request(request, serving.limits)
        if opened.session_id in self.sessions:
            raise errors.InvalidRequestError(f"session {opened.session_id!r} is already open")
        session = serving.store.open(opened.session_id, peer, opened.blocks, opened.batch_size, opened.max_length)
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
        session.next_step += 1
        hidden = await session.take(request.position, self.idle_timeout) if request.expect_push else request.hidden
        step = validation.step_input(
            hidden,
            request.position_ids,
            request.attention_mask,
            serving.limits,
            batch_size=session.batch_size,
            past=session.position,
        )
        if session.position + step.hidden.shape[1] > session.max_length:
            raise errors.InvalidRequestError(
                f"step of {step.hidden.shape[1]} tokens at position {session.position} exceeds max_length "
                f"{session.max_length}"
            )
        output = tensors.to_proto(await serving.backend.inference_step(session, step))
        session.last_used = asyncio.get_running_loop().time()
        pushed = False
        if request.push_peer_id:
            push = pb.PushRequest(session_id=request.push_session_id, position=request.position, hidden=output)
            pushed = await self.pusher.push(request.push_peer_id, push)
        logger.debug("inference %s step %d: %s", session.session_id, request.step, list(step.hidden.shape))
        return pb.InferenceResponse(hidden=output, step=request.step, pushed=pushed)

    async def rpc_forward(self, request: pb.ForwardRequest, context: P2PContext) -> pb.ForwardResponse:
        peer = context.remote_id.to_base58()
        serving = self.current()
        try:
            if serving.draining:
                raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
            blocks = validation.requested_blocks(request.start_block, request.end_block, serving.limits)
            step = validation.step_input(request.hidden, request.position_ids, request.attention_mask, serving.limits)
            hidden = await serving.backend.forward(blocks, step)
            logger.debug("forward %s from %s: %s", blocks, peer, list(step.hidden.shape))
            return pb.ForwardResponse(hidden=tensors.to_proto(hidden))
        except Exception as exc:
            self._log_failure("forward", peer, exc)
            return pb.ForwardResponse(error=errors.to_proto(exc))

    async def rpc_info(self, request: pb.InfoRequest, context: P2PContext) -> pb.ServerRecord:
        return self.record()

    @staticmethod
    def _log_failure(rpc: str, peer: str, exc: Exception) -> None:
        if isinstance(exc, errors.StamenError):
            logger.info("Rejected %s request from %s: %s", rpc, peer, exc)
        else:
            logger.exception("Internal error serving %s for %s", rpc, peer)
