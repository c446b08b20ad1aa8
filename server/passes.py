"""RPC handlers of stateless passes: Forward (optionally with every block's output) and Backward.

Like ``server.handler``: validate, delegate to the span's Serving, map every exception to a
``pb.Error`` in one place. One peer has at most ``max_per_peer`` passes in flight, forward and
backward together.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from hivemind.p2p import P2PContext

from proto import pb
from server import extras, validation
from server.gate import Gate
from server.ledger import Ledger
from server.serving import Serving
from swarm import errors
from swarm.net import tensors

logger = logging.getLogger(__name__)


class PassHandler:
    def __init__(
        self, current: Callable[[], Serving], max_per_peer: int, gate: Callable[[], Gate], ledger: Callable[[], Ledger]
    ):
        self.current, self.max_per_peer, self.gate, self.ledger = current, max_per_peer, gate, ledger
        self.in_flight: dict[str, int] = {}  # passes in flight, by peer

    async def rpc_forward(self, request: pb.ForwardRequest, context: P2PContext) -> pb.ForwardResponse:
        peer = context.remote_id.to_base58()
        try:
            serving, blocks, step = self._admit(request, peer)
            shape = tuple(step.hidden.shape)
            prompts = extras.prompts(request.prompts, serving.limits, blocks, shape[0], shape[1])
            adapter = extras.adapter(request.adapter, serving.limits, blocks, serving.adapters, trainable=False)
            if request.output_hidden_states:
                extras.block_outputs_fit(blocks, shape, serving.limits)
            compression = validation.output_compression(request.compression)
            points = self.ledger().request_standing(peer, request)
            logger.debug("forward %s from %s: %s, standing %.1f", blocks, peer, list(shape), points)
            with self._counted(peer):
                hidden, outputs = await serving.forward(
                    blocks, step, prompts, adapter, request.output_hidden_states, points, peer
                )
            response = pb.ForwardResponse(hidden=tensors.to_proto(hidden, compression))
            if outputs is not None:
                stacked = torch.stack(outputs) if outputs else hidden.new_empty(0, *shape)
                response.block_outputs.CopyFrom(tensors.to_proto(stacked, compression))
            return response
        except Exception as exc:
            log_failure("forward", peer, exc)
            return pb.ForwardResponse(error=errors.to_proto(exc))

    async def rpc_backward(self, request: pb.BackwardRequest, context: P2PContext) -> pb.BackwardResponse:
        peer = context.remote_id.to_base58()
        try:
            serving, blocks, step = self._admit(request, peer)
            limits, shape = serving.limits, tuple(step.hidden.shape)
            grad_output = extras.gradient(request.grad_output, "grad_output", shape, limits)
            grad_blocks = extras.block_gradients(request.grad_block_outputs, limits, blocks, shape)
            prompts = extras.prompts(request.prompts, limits, blocks, shape[0], shape[1])
            if prompts is not None:
                prompts.requires_grad_()
            adapter = extras.adapter(request.adapter, limits, blocks, serving.adapters, trainable=True)
            compression = validation.output_compression(request.compression)
            points = self.ledger().request_standing(peer, request)
            logger.debug("backward %s from %s: %s, standing %.1f", blocks, peer, list(shape), points)
            with self._counted(peer):
                grad = await serving.backward(blocks, step, grad_output, grad_blocks, prompts, adapter, points, peer)
            response = pb.BackwardResponse(grad_hidden=tensors.to_proto(grad, compression))
            if prompts is not None:
                grad_prompts = prompts.grad if prompts.grad is not None else torch.zeros_like(prompts)
                response.grad_prompts.CopyFrom(tensors.to_proto(grad_prompts))
            if adapter is not None and request.adapter.WhichOneof("source") == "lora":
                response.grad_lora.extend(extras.lora_gradients(adapter))
            return response
        except Exception as exc:
            log_failure("backward", peer, exc)
            return pb.BackwardResponse(error=errors.to_proto(exc))

    def _admit(self, request, peer: str):
        """Checks every stateless pass starts with: membership, draining, per-peer bound, blocks, input."""
        serving = self.current()
        self.gate().check(peer, request.membership)
        if serving.leaving or serving.draining:
            raise errors.ShuttingDownError("server is shutting down or moving to other blocks")
        if self.in_flight.get(peer, 0) >= self.max_per_peer:
            raise errors.TooManyRequestsError(f"this peer already has {self.max_per_peer} passes running here")
        blocks = validation.requested_blocks(request.start_block, request.end_block, serving.limits)
        hidden = validation.hidden_input(request.hidden, serving.limits, batch_size=None)
        step = validation.step_input(hidden, request.position_ids, request.attention_mask)
        return serving, blocks, step

    @contextlib.contextmanager
    def _counted(self, peer: str):
        self.in_flight[peer] = self.in_flight.get(peer, 0) + 1
        try:
            yield
        finally:
            left = self.in_flight.pop(peer) - 1
            if left:
                self.in_flight[peer] = left


def log_failure(rpc: str, peer: str, exc: Exception) -> None:
    if isinstance(exc, errors.StamenError):
        logger.info("Rejected %s request from %s: %s", rpc, peer, exc)
    else:
        logger.exception("Internal error serving %s for %s", rpc, peer)
