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
from server.serving import Serving
from server.sessions import Session
from swarm import errors, tensors

logger = logging.getLogger(__name__)


class Handler:
    def __init__(self, current: Callable[[], Serving], record: Callable[[], pb.ServerRecord], idle_timeout: float):
        self.current = current  # the Serving that takes new work (it changes when the server moves)
        self.record, self.idle_timeout = record, idle_timeout

    async def register(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(
            rpc_name("Inference"), self.rpc_inference, pb.InferenceRequest, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(rpc_name("Forward"), self.rpc_forward, pb.ForwardRequest)
        await p2p.add_protobuf_handler(rpc_name("Info"), self.rpc_info, pb.InfoRequest)

    async def rpc_inference(
        self, requests: AsyncIterator[pb.InferenceRequest], context: P2PContext
    ) -> AsyncIterator[pb.InferenceResponse]:
        peer = context.remote_id.to_base58()
        session: Session | None = None
        serving = self.current()  # a stream stays with the span it started on
        iterator = requests.__aiter__()
        try:
            while True:
                try:
                    request = await asyncio.wait_for(iterator.__anext__(), self.idle_timeout)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    logger.info("Closing idle session %s of %s", session and session.session_id, peer)
                    error = errors.SessionNotFoundError(f"session closed after {self.idle_timeout:.0f} s idle")
                    yield pb.InferenceResponse(error=errors.to_proto(error))
                    return
                try:
                    if session is None:
                        session = self._open(serving, request, peer)
                    hidden = await self._step(serving, session, request)
                    yield pb.InferenceResponse(hidden=tensors.to_proto(hidden), step=request.step)
                except Exception as exc:  # mapped for the client; the server carries on
                    self._log_failure("inference", peer, exc)
                    yield pb.InferenceResponse(error=errors.to_proto(exc), step=request.step)
                    return
        finally:
            if session is not None:
                serving.store.close(session)
                logger.debug("Closed session %s of %s", session.session_id, peer)

    def _open(self, serving: Serving, request: pb.InferenceRequest, peer: str) -> Session:
        if serving.draining:
            raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
        if request.step != 0:
            raise errors.SessionNotFoundError(
                f"no session here to continue at step {request.step}; a stream must open its session at step 0"
            )
        opened = validation.open_request(request, serving.limits)
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

    async def _step(self, serving: Serving, session: Session, request: pb.InferenceRequest):
        if serving.draining:
            raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
        if request.step != session.next_step:
            raise errors.InvalidRequestError(f"step {request.step} out of order, expected {session.next_step}")
        if request.position != session.position:
            raise errors.InvalidRequestError(
                f"position {request.position} sent, session cache holds {session.position}"
            )
        step = validation.step_input(
            request.hidden,
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
        session.next_step += 1
        hidden = await serving.backend.inference_step(session, step)
        session.last_used = asyncio.get_running_loop().time()
        logger.debug("inference %s step %d: %s", session.session_id, request.step, list(step.hidden.shape))
        return hidden

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
