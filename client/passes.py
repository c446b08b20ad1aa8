"""Stateless passes through the swarm: forward (optionally with every block's output) and backward.

A pass over blocks ``span`` is split into bounded requests: rows of the batch go in chunks (rows are
independent sequences), and each server's part of the chain goes in pieces of a few blocks, so every
request and answer fits ``max_message_bytes`` (``split``, pure). Forward keeps each piece's input;
backward walks the pieces in reverse, asking a server to recompute that piece's activations and
back-propagate. When a server fails, the one retry policy (``client.retry``) decides; a forward pass
routes the rest of the span anew, a backward piece goes to another server of that span (forward
through a replacement chain first if no single server covers it). Every block computes the same
function wherever it runs, so the gradients do not change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from client.envelope import Envelope
from client.hop import adapter_message
from client.retry import Attempts
from proto import pb
from swarm.models.adapters import LoraAdapter
from swarm.net import tensors
from swarm.net.receipts import work_units
from swarm.net.rpc import ServerFailure, call_backward, call_forward
from swarm.spans import BlockRange

if TYPE_CHECKING:
    from client.handle import ClientHandle

logger = logging.getLogger(__name__)
ITEMSIZE = 4  # bytes per value on the wire (float32; smaller dtypes only shrink requests)


@dataclass(frozen=True)
class PassInputs:
    """What a pass sends besides hidden states (for all rows of the batch)."""

    span: BlockRange  # absolute blocks
    position_ids: torch.Tensor  # [batch, tokens] int64
    attention_mask: torch.Tensor | None = None  # [batch, tokens] bool, False marks padding
    prompts: torch.Tensor | None = None  # [len(span), 1 or batch, prefix, hidden] deep prompts
    adapter: LoraAdapter | str | None = None  # the client's LoRA weights (detached) or a preloaded adapter's name
    hidden_states: bool = False  # also return the output of every block

    def rows(self, part: slice) -> PassInputs:
        prompts = self.prompts
        if prompts is not None and prompts.shape[1] > 1:
            prompts = prompts[:, part]
        mask = self.attention_mask[part] if self.attention_mask is not None else None
        return dataclasses.replace(self, position_ids=self.position_ids[part], attention_mask=mask, prompts=prompts)

    def within(self, span: BlockRange) -> PassInputs:
        prompts = self.prompts
        if prompts is not None:
            prompts = prompts[span.start - self.span.start : span.end - self.span.start]
        return dataclasses.replace(self, span=span, prompts=prompts)


@dataclass
class Piece:
    """Blocks ``span`` of a forward pass, run by ``peer_id`` on ``hidden``."""

    peer_id: str
    span: BlockRange
    hidden: torch.Tensor  # [rows, tokens, hidden]: the piece's input


@dataclass
class Gradients:
    """What a backward pass of one chunk of rows accumulates besides the input's gradient."""

    origin: int  # the pass's first block
    prompts: torch.Tensor | None = None  # like PassInputs.prompts of the chunk
    lora: dict = field(default_factory=dict)  # (block, module) -> (grad a, grad b)

    def add_prompts(self, span: BlockRange, grad: torch.Tensor) -> None:
        self.prompts[span.start - self.origin : span.end - self.origin] += grad.to(self.prompts.dtype)

    def add_lora(self, weights: list[pb.LoraWeight]) -> None:
        for weight in weights:
            key = (weight.block, weight.module)
            grad_a, grad_b = tensors.from_proto(weight.a, "grad a"), tensors.from_proto(weight.b, "grad b")
            if key in self.lora:
                grad_a, grad_b = grad_a + self.lora[key][0], grad_b + self.lora[key][1]
            self.lora[key] = (grad_a, grad_b)


def request_bytes(blocks: int, rows: int, tokens: int, hidden: int, inputs: PassInputs, backward: bool) -> int:
    """The largest message (request or answer) of a pass over ``blocks`` blocks and ``rows`` rows."""
    per_row = tokens * hidden * ITEMSIZE
    prompts = 0
    if inputs.prompts is not None:
        prompts = blocks * inputs.prompts.shape[2] * hidden * ITEMSIZE * (rows if inputs.prompts.shape[1] > 1 else 1)
    lora = inputs.adapter if isinstance(inputs.adapter, LoraAdapter) else None
    per_block_lora = 0 if lora is None else math.ceil(lora.nbytes() / max(1, len({b for b, _ in lora.weights})))
    fixed = prompts + blocks * per_block_lora + rows * tokens * 9  # position ids and mask
    outputs = blocks if inputs.hidden_states else 1
    if backward:  # input and gradients in, gradients out
        return rows * per_row * (1 + outputs) + fixed
    return rows * per_row * outputs + fixed  # the answer (with every block's output) or the request


def fitting_rows(
    blocks: int, rows: int, tokens: int, hidden: int, inputs: PassInputs, backward: bool, budget: int
) -> int:
    """The most rows (at most ``rows``, at least one) whose requests over ``blocks`` blocks fit ``budget``."""
    fit = rows
    while fit > 1 and request_bytes(blocks, fit, tokens, hidden, inputs, backward) > budget:
        fit -= 1
    return fit


def split(
    num_blocks: int, rows: int, tokens: int, hidden: int, inputs: PassInputs, backward: bool, budget: int
) -> tuple[int, int]:
    """(blocks per piece, rows per chunk) so that every request and answer fits ``budget`` bytes, with the
    fewest requests (ties: more blocks per piece). At least one block and one row."""
    best = None
    for blocks in range(1, num_blocks + 1):
        chunk = fitting_rows(blocks, rows, tokens, hidden, inputs, backward, budget)
        if blocks > 1 and request_bytes(blocks, chunk, tokens, hidden, inputs, backward) > budget:
            break
        requests = math.ceil(num_blocks / blocks) * math.ceil(rows / chunk)
        if best is None or requests <= best[0]:
            best = (requests, blocks, chunk)
    return best[1], best[2]


def even_pieces(span: BlockRange, blocks: int) -> list[BlockRange]:
    """``span`` in as few pieces of at most ``blocks`` blocks as possible, of nearly equal sizes."""
    count = math.ceil(len(span) / blocks)
    bounds = [span.start + round(index * len(span) / count) for index in range(count + 1)]
    return [BlockRange(start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


class Passes:
    """Stateless forward and backward passes of one client; the async methods run on its loop."""

    def __init__(self, client: ClientHandle):
        self.client, self.config = client, client.config

    async def forward(
        self, hidden: torch.Tensor, inputs: PassInputs, blocks: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[Piece]]:
        """One chunk of rows through ``inputs.span``: (output, each block's output if asked, the pieces run)."""
        attempts = Attempts(self.client.routes, self.config.max_retries, "forward pass")
        name = inputs.adapter if isinstance(inputs.adapter, str) else None
        position, end, pieces, outputs = inputs.span.start, inputs.span.end, [], []
        while position < end:
            chain = await self._chain(BlockRange(position, end), name)
            peer = chain[0].peer_id
            for span in even_pieces(chain[0].span, blocks):
                try:
                    output, intermediate = await self._forward_piece(peer, span, hidden, inputs.within(span))
                except ServerFailure as failure:
                    attempts.failed(failure)
                    break  # route the rest of the span anew, from this piece
                pieces.append(Piece(peer, span, hidden))
                outputs.extend([*intermediate, output])
                hidden, position = output, span.end
        return hidden, outputs, pieces

    async def backward(
        self,
        pieces: list[Piece],
        grad_output: torch.Tensor,
        grad_blocks: torch.Tensor | None,
        inputs: PassInputs,
        blocks: int,
        gradients: Gradients,
        attempts: Attempts | None = None,
    ) -> torch.Tensor:
        """The gradient w.r.t. the input of ``pieces`` (one chunk of rows, in forward order) given the gradient
        at their output and, optionally, at every block's output [len(span) - 1, ...] of ``inputs.span``."""
        attempts = attempts or Attempts(self.client.routes, self.config.max_retries, "backward pass")
        grad, origin = grad_output, inputs.span.start
        for piece in reversed(pieces):
            piece_grads = None
            if grad_blocks is not None and len(piece.span) > 1:
                piece_grads = grad_blocks[piece.span.start - origin : piece.span.end - 1 - origin]
            grad = await self._backward_piece(piece, grad, piece_grads, inputs, blocks, gradients, attempts)
            if grad_blocks is not None and piece.span.start > origin:  # the previous block's output was used too
                grad = grad + grad_blocks[piece.span.start - 1 - origin]
        return grad

    async def _backward_piece(self, piece, grad, piece_grads, inputs, blocks, gradients, attempts) -> torch.Tensor:
        sub = inputs.within(piece.span)
        name = inputs.adapter if isinstance(inputs.adapter, str) else None
        peer = piece.peer_id if piece.peer_id not in self.client.routes.banned() else None
        while True:
            if peer is None:
                chain = await self._chain(piece.span, name)
                if len(chain) > 1:  # no one server covers the piece now: forward through the new chain, then back
                    _, _, replacement = await self.forward(piece.hidden, sub, blocks)
                    return await self.backward(replacement, grad, piece_grads, sub, blocks, gradients, attempts)
                peer = chain[0].peer_id
            try:
                return await self._backward_call(peer, piece, grad, piece_grads, sub, gradients)
            except ServerFailure as failure:
                attempts.failed(failure)
                peer = None

    async def _chain(self, span: BlockRange, adapter: str | None):
        return await self.client.routes.chain(span, 0, True, adapter=adapter)

    def _request(self, message, envelope: Envelope, span: BlockRange, hidden: torch.Tensor, inputs: PassInputs):
        """Fill the fields Forward and Backward requests share."""
        message.start_block, message.end_block = span.start, span.end
        message.hidden.CopyFrom(envelope.hidden(hidden))
        message.position_ids.CopyFrom(tensors.to_proto(inputs.position_ids))
        message.compression = envelope.compression
        envelope.credentials(message)
        if inputs.attention_mask is not None:
            message.attention_mask.CopyFrom(tensors.to_proto(inputs.attention_mask))
        if inputs.prompts is not None:
            message.prompts.CopyFrom(envelope.exact(inputs.prompts))
        if (adapter := adapter_message(inputs.adapter, span)) is not None:
            message.adapter.CopyFrom(adapter)
        return message

    def _timeout(self, hidden: torch.Tensor, span: BlockRange, factor: float = 1.0) -> float:
        tokens = hidden.shape[0] * hidden.shape[1]
        return factor * (self.config.step_timeout + self.config.step_timeout_per_token * tokens)

    async def _forward_piece(
        self, peer: str, span: BlockRange, hidden: torch.Tensor, inputs: PassInputs
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        request = self._request(pb.ForwardRequest(), Envelope.for_server(self.client, peer), span, hidden, inputs)
        request.output_hidden_states = inputs.hidden_states and len(span) > 1
        response = await call_forward(self.client.p2p, peer, request, self._timeout(hidden, span))
        output = _answer(response.hidden, hidden.shape, peer, "hidden").to(hidden.dtype)
        intermediate = []
        if request.output_hidden_states:
            stacked = _answer(response.block_outputs, (len(span) - 1, *hidden.shape), peer, "block_outputs")
            intermediate = list(stacked.to(hidden.dtype).unbind(0))
        self._done(peer, hidden, span, backward=False)
        return output, intermediate

    async def _backward_call(
        self, peer: str, piece: Piece, grad: torch.Tensor, piece_grads, inputs: PassInputs, gradients: Gradients
    ) -> torch.Tensor:
        envelope = Envelope.for_server(self.client, peer)
        request = self._request(pb.BackwardRequest(), envelope, piece.span, piece.hidden, inputs)
        request.grad_output.CopyFrom(envelope.exact(grad))
        if piece_grads is not None:
            request.grad_block_outputs.CopyFrom(envelope.exact(piece_grads))
        response = await call_backward(self.client.p2p, peer, request, self._timeout(piece.hidden, piece.span, 3.0))
        grad_input = _answer(response.grad_hidden, piece.hidden.shape, peer, "grad_hidden").to(grad.dtype)
        sent = inputs.adapter.within(piece.span).weights if isinstance(inputs.adapter, LoraAdapter) else {}
        if [(w.block, w.module) for w in response.grad_lora] != list(sent):
            raise ServerFailure(peer, "answered gradients for other LoRA weights than were sent")
        if inputs.prompts is not None:  # added only once the whole answer is good
            gradients.add_prompts(
                piece.span, _answer(response.grad_prompts, inputs.prompts.shape, peer, "grad_prompts")
            )
        gradients.add_lora(list(response.grad_lora))
        self._done(peer, piece.hidden, piece.span, backward=True)
        return grad_input

    def _done(self, peer: str, hidden: torch.Tensor, span: BlockRange, backward: bool) -> None:
        """A good answer: the server's failures decay, and its work goes into our receipts."""
        self.client.routes.mark_ok(peer)
        self.client.receipts.add(peer, work_units(tuple(hidden.shape), span, backward))


def _answer(message: pb.Tensor, shape, peer: str, field: str) -> torch.Tensor:
    """A tensor a server answered, of the expected shape (ServerFailure otherwise)."""
    try:
        value = tensors.from_proto(message, field)
    except Exception as exc:
        raise ServerFailure(peer, f"malformed answer: {exc}", exc) from exc
    if tuple(value.shape) != tuple(shape):
        raise ServerFailure(peer, f"answered {field} of shape {list(value.shape)}, expected {list(shape)}")
    return value


@dataclass
class PassRecord:
    """What a forward pass keeps for its backward pass."""

    inputs: PassInputs
    blocks: int  # blocks per piece
    chunks: list[tuple[slice, list[Piece]]]  # rows of each chunk and the pieces they went through


class PassRunner:
    """Synchronous entry points (any thread): whole batches, split into chunks of rows; with
    ``pass_concurrency`` > 1, chunks go through the chain concurrently (a server works on one chunk while
    the next server works on another)."""

    def __init__(self, client: ClientHandle):
        self.client, self.passes = client, Passes(client)
        self._said_unverified = False

    def forward(
        self, hidden: torch.Tensor, inputs: PassInputs, keep: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, PassRecord | None]:
        """(output [batch, tokens, hidden], every block's output but the last [len(span) - 1, batch, tokens,
        hidden] if asked, and with ``keep`` what the backward pass needs)."""
        if self.client.config.verify > 0 and not self._said_unverified:
            self._said_unverified = True
            logger.warning(
                "verify=%g checks inference sessions (generate) only: stateless forward and backward passes "
                "(model(...), training) are not checked on other servers",
                self.client.config.verify,
            )
        batch, tokens, size = hidden.shape
        budget = self.client.config.max_pass_bytes
        blocks, rows = split(len(inputs.span), batch, tokens, size, inputs, False, budget)
        if keep:  # pieces small enough for their backward requests too (those carry gradients as well)
            blocks = min(blocks, split(len(inputs.span), batch, tokens, size, inputs, True, budget)[0])
            rows = fitting_rows(blocks, batch, tokens, size, inputs, False, budget)
        parts = [slice(start, min(batch, start + rows)) for start in range(0, batch, rows)]
        coroutines = [self.passes.forward(hidden[part], inputs.rows(part), blocks) for part in parts]
        results = self.client.loop.run(self._all(coroutines))
        stacked = None
        if inputs.hidden_states:
            if len(inputs.span) > 1:
                stacked = torch.cat([torch.stack(all_outputs[:-1]) for _, all_outputs, _ in results], dim=1)
            else:
                stacked = hidden.new_zeros(0, *hidden.shape)
        output = torch.cat([output for output, _, _ in results])
        record = PassRecord(
            inputs, blocks, [(part, pieces) for part, (_, _, pieces) in zip(parts, results, strict=True)]
        )
        return output, stacked, (record if keep else None)

    def backward(
        self, record: PassRecord, grad_output: torch.Tensor, grad_blocks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(gradient w.r.t. the input, w.r.t. the deep prompts, w.r.t. each LoRA weight: key -> (a, b))."""
        inputs, budget = record.inputs, self.client.config.max_pass_bytes
        _, tokens, size = grad_output.shape
        coroutines, gradients = [], []
        for part, pieces in record.chunks:  # each forward chunk in smaller chunks of rows if need be
            rows = fitting_rows(record.blocks, part.stop - part.start, tokens, size, inputs, True, budget)
            for start in range(part.start, part.stop, rows):
                sub = slice(start, min(part.stop, start + rows))
                inside = slice(sub.start - part.start, sub.stop - part.start)
                chunk = inputs.rows(sub)
                sub_pieces = [dataclasses.replace(piece, hidden=piece.hidden[inside]) for piece in pieces]
                accumulated = Gradients(
                    inputs.span.start, torch.zeros_like(chunk.prompts) if chunk.prompts is not None else None
                )
                blocks_grad = grad_blocks[:, sub] if grad_blocks is not None else None
                gradients.append(accumulated)
                coroutines.append(
                    self.passes.backward(sub_pieces, grad_output[sub], blocks_grad, chunk, record.blocks, accumulated)
                )
        grads = self.client.loop.run(self._all(coroutines))
        lora = {}
        for accumulated in gradients:
            for key, (grad_a, grad_b) in accumulated.lora.items():
                lora[key] = (grad_a + lora[key][0], grad_b + lora[key][1]) if key in lora else (grad_a, grad_b)
        grad_prompts = None
        if inputs.prompts is not None:
            prompt_grads = [accumulated.prompts for accumulated in gradients]
            shared = inputs.prompts.shape[1] == 1
            grad_prompts = torch.stack(prompt_grads).sum(0) if shared else torch.cat(prompt_grads, dim=1)
        return torch.cat(grads), grad_prompts, lora

    async def _all(self, coroutines: list) -> list:
        """Run the chunks, at most ``pass_concurrency`` at a time; if one fails, cancel the others and raise."""
        limit = asyncio.Semaphore(max(1, self.client.config.pass_concurrency))

        async def limited(coroutine):
            async with limit:
                return await coroutine

        return await _all([limited(coroutine) for coroutine in coroutines])


async def _all(coroutines: list) -> list:
    """Run concurrently; if one fails, cancel the others and raise its error."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
