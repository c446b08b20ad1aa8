"""One inference session's part on one server: its stream, counters, the inputs sent so far, and how
one step runs there (request, answer, liveness).

A late answer is not waited out blindly: once a step is later than 1.5 times the server's usual
step time (and than twice the measured round trip to it), the client pings the server; one whose ping is
refused (a dead server's answer, in about a millisecond) is given up at once, one whose ping goes unanswered
for 0.3 s (or 3 round trips, for far servers) gets a second ping 3x as long before it is given up (a busy
server on a loaded machine can be that slow), and one that answers is waited for up to the step's timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import torch

from client.envelope import Envelope
from proto import pb
from swarm.errors import StamenError
from swarm.models.adapters import LoraAdapter
from swarm.net import tensors
from swarm.net.rpc import InferenceStream, ServerFailure, call_info
from swarm.routing.chains import Hop

PROBE_AFTER = 0.05  # seconds: a step later than this (and than 1.5x the server's usual step) gets a liveness ping
PROBE_TIMEOUT = 0.3  # seconds a liveness ping may take (at least 3x the measured round trip to the server)


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


def merge_steps(steps: list[StepInput], max_tokens: int) -> list[StepInput]:
    """Consecutive steps joined into as few steps of at most ``max_tokens`` new tokens as possible (a
    replay sends a history as a few prefill steps instead of one step per token). A step that reorders
    the rows starts a new step (the reorder comes before its tokens); deep prompts stay on the first
    tokens of a merged step."""
    merged: list[list[StepInput]] = []
    for step in steps:
        tokens = step.hidden.shape[1]
        if merged and sum(s.hidden.shape[1] for s in merged[-1]) + tokens <= max_tokens and _joinable(merged[-1], step):
            merged[-1].append(step)
        else:
            merged.append([step])
    return [_join(group) for group in merged]


def _joinable(group: list[StepInput], step: StepInput) -> bool:
    if step.reorder is not None:
        return False
    if step.prompts is None:
        return True
    return all(s.prompts is not None and s.prompts.shape[2] == s.hidden.shape[1] for s in group)


def _join(group: list[StepInput]) -> StepInput:
    if len(group) == 1:
        return group[0]
    masks = None
    if any(step.attention_mask is not None for step in group):
        masks = torch.cat([_mask(step) for step in group], dim=1)
    prompted = [step.prompts for step in group if step.prompts is not None]
    return StepInput(
        torch.cat([step.hidden for step in group], dim=1),
        torch.cat([step.position_ids for step in group], dim=1),
        masks,
        torch.cat(prompted, dim=2) if prompted else None,
        group[0].reorder,
    )


def _mask(step: StepInput) -> torch.Tensor:
    if step.attention_mask is not None:
        return step.attention_mask
    return torch.ones(step.hidden.shape[:2], dtype=torch.bool)


@dataclasses.dataclass
class HopTimeouts:
    base: float  # seconds to wait for a step's answer...
    per_token: float  # ...plus this many per token it carries
    slow_factor: float  # once the server has answered decode steps: at most this x its usual time...
    floor: float  # ...but never less than this


class HopSession:
    """This session's state on one server. The owner runs one step at a time on it."""

    def __init__(self, hop: Hop, stream: InferenceStream, envelope: Envelope, p2p, rtt: float | None = None):
        self.hop, self.stream, self.envelope, self.p2p = hop, stream, envelope, p2p
        self.rtt = rtt or 0.0  # measured round trip to the server: far servers get longer before a ping, and for it
        self.session_id = uuid.uuid4().hex
        self.history: list[StepInput] = []
        self.next_step = 0
        self.position = 0
        self.decode_seconds: float | None = None  # moving average of single-token step times
        self.sent: str | None = None  # push mode: "step" or "header" already sent for the current step
        self.draining = False  # the server said it is leaving: move this session elsewhere soon

    @property
    def peer_id(self) -> str:
        return self.hop.peer_id

    @property
    def dtype(self) -> torch.dtype:
        """The server's compute dtype (what its answers are rounded to)."""
        return self.envelope.dtype

    def send_step(
        self,
        item: StepInput,
        max_length: int,
        adapter: LoraAdapter | str | None = None,
        *,
        push_from: str | None = None,
        push_to: tuple[str, str] | None = None,
        round_id: int = 0,
        round_size: int = 0,
    ) -> None:
        """Send this hop's next step, after the message that opens its session (on step 0, with the session's
        adapter). With ``push_from``, a header: the input comes from that server (or a later ``relay``).
        ``push_to`` (peer id, its session id) sends the output on to the next server too; ``round_id`` and
        ``round_size`` (0: none) declare the round of steps of several sessions this step is part of."""
        if self.next_step == 0:
            self.stream.send(pb.InferenceRequest(open=self._open(item, max_length, adapter)))
        spec = pb.StepSpec(
            step=self.next_step,
            position=self.position,
            position_ids=tensors.to_proto(item.position_ids),
            compression=self.envelope.compression,
            round_id=round_id,
            round_size=round_size,
        )
        if item.attention_mask is not None:
            spec.attention_mask.CopyFrom(tensors.to_proto(item.attention_mask))
        if item.prompts is not None:  # the session's prompts cover every block of the model
            spec.prompts.CopyFrom(self.envelope.exact(item.prompts[self.hop.span.start : self.hop.span.end]))
        if item.reorder is not None:
            spec.reorder.CopyFrom(tensors.to_proto(item.reorder))
        if push_to is not None:
            spec.push_to.peer_id, spec.push_to.session_id = push_to
        if push_from is None:
            request = pb.InferenceRequest(step=pb.Step(spec=spec, hidden=self.envelope.hidden(item.hidden)))
        else:
            request = pb.InferenceRequest(header=pb.Header(spec=spec, push_from=push_from))
        self.next_step += 1
        self.stream.send(request)

    def _open(self, item: StepInput, max_length: int, adapter: LoraAdapter | str | None) -> pb.Open:
        span = self.hop.span
        message = pb.Open(
            session_id=self.session_id,
            start_block=span.start,
            end_block=span.end,
            max_length=max_length,
            batch_size=item.hidden.shape[0],
        )
        if (chosen := adapter_message(adapter, span)) is not None:
            message.adapter.CopyFrom(chosen)
        self.envelope.credentials(message)
        return message

    def relay(self, item: StepInput) -> None:
        """Push mode: send the input of a header's step that the previous server did not push."""
        relay = pb.Relay(position=self.position, hidden=self.envelope.hidden(item.hidden))
        self.stream.send(pb.InferenceRequest(relay=relay))

    async def answer(self, item: StepInput, timeouts: HopTimeouts) -> tuple[torch.Tensor, bool]:
        """The server's answer to the step just sent: (its output, whether it pushed it onwards)."""
        batch, tokens, _ = item.hidden.shape
        started = time.perf_counter()
        response = await self._receive(self._timeout(batch * tokens, timeouts))
        if tokens == 1:
            elapsed = time.perf_counter() - started
            self.decode_seconds = elapsed if self.decode_seconds is None else 0.8 * self.decode_seconds + 0.2 * elapsed
        try:
            hidden = tensors.from_proto(response.hidden, "hidden")
        except StamenError as exc:
            raise ServerFailure(self.peer_id, f"malformed answer: {exc}", exc) from exc
        if hidden.shape != item.hidden.shape:
            raise ServerFailure(self.peer_id, f"answered shape {list(hidden.shape)} for {list(item.hidden.shape)}")
        self.position += tokens
        self.draining = self.draining or response.draining
        return hidden.to(item.hidden.dtype), response.pushed

    async def _receive(self, timeout: float) -> pb.InferenceResponse:
        """The next answer within ``timeout``; a server that is late and does not answer a ping is given up."""
        answer = asyncio.ensure_future(self.stream.receive(timeout))
        probe_after = max(PROBE_AFTER, 1.5 * (self.decode_seconds or 0.0), 2 * self.rtt)
        probe_timeout = max(PROBE_TIMEOUT, 3 * self.rtt)
        try:
            while True:
                done, _ = await asyncio.wait({answer}, timeout=probe_after)
                if done:
                    return answer.result()
                probe = asyncio.ensure_future(self._alive(probe_timeout))
                await asyncio.wait({answer, probe}, return_when=asyncio.FIRST_COMPLETED)
                if answer.done():
                    probe.cancel()
                    return answer.result()
                if not await probe:
                    raise ServerFailure(
                        self.peer_id, f"stopped answering (no reply to two pings, {probe_timeout:.2f} s and more)"
                    )
                probe_after = min(2 * probe_after, max(1.0, 2 * self.rtt))
        finally:
            if not answer.done():
                answer.cancel()

    async def _alive(self, timeout: float) -> bool:
        """Whether the server answers a liveness ping. A refused call (a dead server's, about 1 ms) says no at
        once; a ping that only timed out gets one more try, 3x as long: a busy server on a loaded machine can
        take longer than ``timeout`` to answer, and one lost reply must not make every session on it fail
        over (as once banned a busy server under 8 users, and the API answered 503 ``missing_blocks``)."""
        for attempt in range(2):
            try:
                await call_info(self.p2p, self.peer_id, timeout * (3 if attempt else 1), self.envelope.membership)
                return True
            except ServerFailure as failure:
                if not isinstance(failure.__cause__, asyncio.TimeoutError | TimeoutError):
                    return False
        return False

    def _timeout(self, tokens: int, timeouts: HopTimeouts) -> float:
        """How long to wait for a step: generous at first, then adapted to the server's usual speed."""
        timeout = timeouts.base + timeouts.per_token * tokens
        if tokens == 1 and self.decode_seconds is not None:
            timeout = min(timeout, max(timeouts.floor, timeouts.slow_factor * self.decode_seconds))
        return timeout
