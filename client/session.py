"""Inference session: streams hidden states through a chain of servers, one step at a time.

Each server of the chain holds its own session (KV cache) for its span. The client keeps, per
server, the inputs it sent in this session; when a server fails, the client bans it, finds a
replacement chain for that span only, replays those inputs step by step (same shapes, so the
rebuilt cache is the same as the lost one), and carries on. Other servers keep their sessions.

Beam search reorders the session's rows: ``reorder`` keeps the hypothesis indices until the next step,
which carries them to every server (each reorders its cache before running the step); the history
keeps them with that step, so a replay reorders at the same points. A session may carry a LoRA
adapter (sent when each server's session opens) and deep prompts (sent with the steps that hold the
first tokens).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import TYPE_CHECKING

import torch

from client.retry import Attempts
from proto import pb
from swarm import tensors
from swarm.errors import StamenError
from swarm.models.adapters import LoraAdapter
from swarm.routing import Hop
from swarm.rpc import InferenceStream, ServerFailure

if TYPE_CHECKING:
    from client.swarmclient import SwarmClient

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepInput:
    hidden: torch.Tensor  # [batch, new_tokens, hidden_size]
    position_ids: torch.Tensor  # [batch, new_tokens] int64
    attention_mask: torch.Tensor | None  # [batch, new_tokens] bool (False marks padding), or None
    prompts: torch.Tensor | None = None  # [num_blocks, 1 or batch, k, hidden]: deep prompts of the first k tokens
    reorder: torch.Tensor | None = None  # [batch] int64: rows the servers keep before this step (beam search)


def adapter_message(adapter: LoraAdapter | str | None, span) -> pb.Adapter | None:
    """The wire form of an adapter choice on ``span``: a preloaded adapter's name or the client's weights."""
    if adapter is None:
        return None
    if isinstance(adapter, str):
        return pb.Adapter(name=adapter)
    return pb.Adapter(lora=adapter.within(span).to_proto())


class _HopSession:
    """This session's state on one server: its stream, counters and the inputs sent so far."""

    def __init__(self, hop: Hop, stream: InferenceStream, dtype: torch.dtype):
        self.hop, self.stream, self.dtype = hop, stream, dtype
        self.session_id = uuid.uuid4().hex
        self.history: list[StepInput] = []
        self.next_step = 0
        self.position = 0
        self.decode_seconds: float | None = None  # moving average of single-token step times
        self.sent: str | None = None  # push mode: "step" or "header" already sent for the current step


class InferenceSession:
    """Use as a context manager. One caller at a time: a session is one conversation's state."""

    def __init__(self, client: SwarmClient, max_length: int, adapter: LoraAdapter | str | None = None):
        self.client, self.max_length = client, max_length
        self.config = client.config
        self.adapter = adapter  # LoRA weights (detached) or a preloaded adapter's name, for every step
        self.position = 0  # tokens processed so far (per sequence)
        self.prefix = 0  # of them, trainable prompt tokens the model put before the caller's tokens
        self.padding: torch.Tensor | None = None  # [batch, position] bool: the padding mask the servers hold
        self._reorder: torch.Tensor | None = None  # hypothesis indices for the next step (beam search)
        self.batch_size: int | None = None
        self._hops: list[_HopSession] = []
        self.closed = False
        self.relayed = 0  # push mode: inputs the client had to relay because a server did not push them

    @property
    def route(self) -> list[Hop]:
        """The servers this session currently goes through, with the blocks each one runs."""
        return [hop.hop for hop in self._hops]

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, batch_size: int = 1) -> InferenceSession:
        """Choose the chain and open its streams now (``step`` does it lazily otherwise)."""
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"session already opened for a batch of {self.batch_size}")
        self.batch_size = batch_size
        if not self._hops:
            self._hops = self.client.loop.run(self._open_with_retries(batch_size))
        return self

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row ``rows[i]`` of the session as row i from the next step on (beam search)."""
        rows = rows.to(torch.int64).reshape(-1)
        if self.batch_size is not None and rows.numel() != self.batch_size:
            raise ValueError(f"reorder needs {self.batch_size} row indices, got {rows.numel()}")
        if self.position == 0:
            raise ValueError("nothing to reorder yet: the session holds no tokens")
        self._reorder = rows if self._reorder is None else self._reorder[rows]
        self.padding = self.padding[rows]

    def step(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run new tokens through all blocks; returns the last block's hidden states for them.

        ``hidden`` [batch, new_tokens, hidden_size], ``position_ids`` [batch, new_tokens], ``attention_mask``
        [batch, new_tokens] bool (False marks padding) or None, ``prompts`` [num_blocks, 1 or batch, k, hidden]
        deep prompts of the session's first k tokens (or None). Synchronous; any thread may call it."""
        return self.client.loop.run(self.step_async(hidden, position_ids, attention_mask, prompts))

    async def step_async(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``step`` for code running on the client's event loop (e.g. one engine stepping many sessions)."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        batch, tokens, hidden_size = hidden.shape
        if self.batch_size is None:
            self.batch_size = batch
        if batch != self.batch_size:
            raise ValueError(f"session was opened for a batch of {self.batch_size}, got {batch}")
        if self.position + tokens > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded ({self.position} + {tokens} tokens)")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, tokens):
            raise ValueError(f"attention_mask must be [{batch}, {tokens}] (the new tokens), got {attention_mask.shape}")
        new_padding = attention_mask if attention_mask is not None else torch.ones(batch, tokens, dtype=torch.bool)
        self.padding = new_padding if self.padding is None else torch.cat([self.padding, new_padding], dim=1)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        chunk = max(1, self.config.max_message_bytes // (batch * hidden_size * 4 * (2 if prompts is not None else 1)))
        outputs = []
        for start in range(0, tokens, chunk):
            end = min(tokens, start + chunk)
            mask = attention_mask[:, start:end] if attention_mask is not None else None
            first = self.position  # the chunk's first token in the session; deep prompts cover the first k tokens
            chunk_prompts = prompts[:, :, first : end - start + first] if prompts is not None else None
            if chunk_prompts is not None and chunk_prompts.shape[2] == 0:
                chunk_prompts = None
            reorder, self._reorder = self._reorder, None
            item = StepInput(hidden[:, start:end], position_ids[:, start:end], mask, chunk_prompts, reorder)
            outputs.append(await self._step(item))
            self.position += end - start
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    async def _step(self, inputs: StepInput) -> torch.Tensor:
        attempts = Attempts(self.client.routes, self.config.max_retries, "inference step")
        batch = inputs.hidden.shape[0]
        if not self._hops:
            self._hops = await self._open_with_retries(batch, attempts)
        if self.config.push and len(self._hops) > 1:
            self._send_headers(inputs)
        index, current, pushed = 0, inputs, False
        while index < len(self._hops):
            hop = self._hops[index]
            try:
                output, pushed = await self._run(hop, current, delivered=pushed)
            except ServerFailure as failure:
                attempts.failed(failure)
                self._hops[index : index + 1] = await self._retrying(attempts, lambda h=hop: self._replace(h, batch))
                pushed = False
                continue  # the replacement replayed the history; now run this step through it
            hop.history.append(current)
            current = dataclasses.replace(current, hidden=output)
            index += 1
        return current.hidden

    async def _open_with_retries(self, batch: int, attempts: Attempts | None = None) -> list[_HopSession]:
        attempts = attempts or Attempts(self.client.routes, self.config.max_retries, "inference step")
        return await self._retrying(attempts, lambda: self._open_chain(None, batch))

    @staticmethod
    async def _retrying(attempts: Attempts, action):
        """Run ``action`` (open or replace part of the chain) until it succeeds or attempts run out."""
        while True:
            try:
                return await action()
            except ServerFailure as failure:
                attempts.failed(failure)

    async def _open_chain(self, span, batch: int) -> list[_HopSession]:
        loop = asyncio.get_running_loop()
        needed = batch * self.max_length
        await self.client.measure_pings()
        adapter = self.adapter if isinstance(self.adapter, str) else None
        chain = await loop.run_in_executor(None, lambda: self.client.routes.chain(span, needed, adapter=adapter))
        hops = []
        try:
            for hop in chain:
                stream = InferenceStream(self.client.p2p, hop.peer_id)
                hops.append(_HopSession(hop, stream, self.client.server_dtype(hop.peer_id)))
                await stream.open(self.config.connect_timeout)
        except BaseException:
            for hop in hops:
                hop.stream.close()
            raise
        logger.debug("Session chain: %s", " -> ".join(f"{h.hop.peer_id[-6:]}[{h.hop.span}]" for h in hops))
        return hops

    async def _replace(self, failed: _HopSession, batch: int) -> list[_HopSession]:
        """New servers for ``failed``'s span, with its inputs so far replayed into them."""
        failed.stream.close()
        replacement = await self._open_chain(failed.hop.span, batch)
        try:
            inputs = failed.history
            for hop in replacement:
                outputs = []
                for item in inputs:
                    hidden, _ = await self._run(hop, item)
                    hop.history.append(item)
                    outputs.append(dataclasses.replace(item, hidden=hidden))
                inputs = outputs
        except BaseException:
            for hop in replacement:
                hop.stream.close()
            raise
        logger.info("Replayed %d steps into %d replacement server(s)", len(failed.history), len(replacement))
        return replacement

    def _request(self, hop: _HopSession, item: StepInput, with_hidden: bool = True) -> pb.InferenceRequest:
        """The message for ``hop``'s next step (opening its session on step 0)."""
        batch = item.hidden.shape[0]
        request = pb.InferenceRequest(
            step=hop.next_step, position=hop.position, position_ids=tensors.to_proto(item.position_ids)
        )
        if with_hidden:
            request.hidden.CopyFrom(tensors.to_proto(item.hidden.to(hop.dtype)))
        else:
            request.expect_push = True
        if item.attention_mask is not None:
            request.attention_mask.CopyFrom(tensors.to_proto(item.attention_mask))
        span = hop.hop.span
        if item.prompts is not None:  # the session's prompts cover every block of the model
            request.prompts.CopyFrom(tensors.to_proto(item.prompts[span.start : span.end].to(hop.dtype)))
        if item.reorder is not None:
            request.reorder.CopyFrom(tensors.to_proto(item.reorder))
        if hop.next_step == 0:
            if (adapter := adapter_message(self.adapter, span)) is not None:
                request.adapter.CopyFrom(adapter)
            request.membership = self.client.membership.proof_for(hop.hop.peer_id)
            request.session_id = hop.session_id
            request.start_block, request.end_block = hop.hop.span.start, hop.hop.span.end
            request.max_length, request.batch_size = self.max_length, batch
        hop.next_step += 1
        return request

    def _send_headers(self, item: StepInput) -> None:
        """Push mode: the first server gets the step, the others a header naming where to push next."""
        for index, hop in enumerate(self._hops):
            request = self._request(hop, item, with_hidden=index == 0)
            if index > 0:  # the only peer allowed to push this step's input
                request.push_from_peer_id = self._hops[index - 1].hop.peer_id
            if index + 1 < len(self._hops):
                request.push_peer_id = self._hops[index + 1].hop.peer_id
                request.push_session_id = self._hops[index + 1].session_id
            hop.stream.send(request)
            hop.sent = "step" if index == 0 else "header"

    async def _run(self, hop: _HopSession, item: StepInput, delivered: bool = False) -> tuple[torch.Tensor, bool]:
        """One step on one server: (its output, whether it pushed that output to the next server)."""
        batch, tokens, _ = item.hidden.shape
        if hop.sent is None:
            hop.stream.send(self._request(hop, item))
        elif hop.sent == "header" and not delivered:  # waiting for an input the previous server did not push
            self.relayed += 1
            fallback = pb.InferenceRequest(fallback=True, position=hop.position)
            fallback.hidden.CopyFrom(tensors.to_proto(item.hidden.to(hop.dtype)))
            hop.stream.send(fallback)
        hop.sent = None
        started = time.perf_counter()
        response = await hop.stream.receive(self._timeout(hop, batch * tokens))
        if tokens == 1:
            elapsed = time.perf_counter() - started
            hop.decode_seconds = elapsed if hop.decode_seconds is None else 0.8 * hop.decode_seconds + 0.2 * elapsed
        try:
            hidden = tensors.from_proto(response.hidden, "hidden")
        except StamenError as exc:
            raise ServerFailure(hop.hop.peer_id, f"malformed answer: {exc}", exc) from exc
        if hidden.shape != item.hidden.shape:
            raise ServerFailure(hop.hop.peer_id, f"answered shape {list(hidden.shape)} for {list(item.hidden.shape)}")
        hop.position += tokens
        return hidden.to(item.hidden.dtype), response.pushed

    def _timeout(self, hop: _HopSession, tokens: int) -> float:
        """How long to wait for a step: generous at first, then adapted to the server's usual speed."""
        config = self.config
        timeout = config.step_timeout + config.step_timeout_per_token * tokens
        if tokens == 1 and hop.decode_seconds is not None:
            timeout = min(timeout, max(config.min_step_timeout, config.slow_step_factor * hop.decode_seconds))
        return timeout

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        hops, self._hops = self._hops, []
        for hop in hops:
            self.client.loop.loop.call_soon_threadsafe(hop.stream.close)
