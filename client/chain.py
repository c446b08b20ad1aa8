"""The client's one chain runner: sessions on a chain of servers that covers a span, run step by step.

A ``Chain`` opens one server-side session per server of a route chosen by the route manager
(``HopSession``, ``client.hop``), runs a step on one of its servers (``run``; push mode: ``send_headers``
first), replays a history of steps through all of them merged into a few prefill steps (``replay``), takes
over the servers of another chain in place of one of its own (``replace``, after a failover or a move), and
closes. Inference sessions (``client.session``) run their steps through one, hop by hop, with failover;
verification (``client.verify``) runs its shadows and third-server referees as chains fed by ``replay``.
``ChainSpec`` is what all the server sessions of one inference session share. A ``DeclaredRound`` is a
round of decode steps that one caller sends over many sessions at once (the API engine's lockstep rounds):
each server is told how many of the round's steps it gets, so it batches them as soon as they are in.

Concurrency: everything runs on the client's event loop, one caller at a time per chain.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from client.config import ClientConfig
from client.envelope import Envelope
from client.handle import ClientHandle
from client.hop import HopSession, HopTimeouts, StepInput, merge_steps
from client.verdicts import split_tokens
from swarm.models.adapters import LoraAdapter
from swarm.net.receipts import work_units
from swarm.net.rpc import InferenceStream
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

__all__ = ["Chain", "ChainSpec", "DeclaredRound"]


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """What the server sessions of one inference session share."""

    max_length: int  # tokens each server's cache must hold (per sequence)
    adapter: LoraAdapter | str | None  # LoRA weights (detached) or a preloaded adapter's name, for every step
    timeouts: HopTimeouts  # how long to wait for a step's answer
    max_message_bytes: int  # larger steps are split
    span: BlockRange | None = None  # the blocks the servers run (None: the whole model; less in private mode)

    @classmethod
    def of(
        cls, config: ClientConfig, max_length: int, adapter: LoraAdapter | str | None, span: BlockRange | None = None
    ) -> ChainSpec:
        timeouts = HopTimeouts(
            config.step_timeout, config.step_timeout_per_token, config.slow_step_factor, config.min_step_timeout
        )
        return cls(max_length, adapter, timeouts, config.max_message_bytes, span)

    def chunk_tokens(self, batch: int, hidden_size: int, prompts: bool = False) -> int:
        """Most new tokens per step that keep one message under the size limit (with deep prompts, which ride
        along with the first tokens, half as many)."""
        return max(1, self.max_message_bytes // ((2 if prompts else 1) * batch * hidden_size * 4))


@dataclasses.dataclass(eq=False)
class DeclaredRound:
    """Decode steps of several inference sessions sent together, declared to the servers (``round_id`` and
    ``round_size`` of each step): a server runs the round's steps for the same blocks as one batch as soon as
    all of them are in, instead of waiting on a timer for sessions that may or may not step."""

    id: int  # unique among the caller's rounds (servers tell rounds of different clients apart)
    members: list  # the sessions stepped in this round: objects with ``hops`` (their current HopSessions)

    def size_at(self, hop: HopSession) -> int:
        """How many of the round's steps ``hop``'s server gets for ``hop``'s blocks (at least this one)."""
        key = (hop.peer_id, hop.hop.span)
        return max(1, sum(1 for member in self.members if any((h.peer_id, h.hop.span) == key for h in member.hops)))

    def fields(self, hop: HopSession) -> dict[str, int]:
        """``send_step``'s keyword arguments for a step of this round on ``hop``."""
        return {"round_id": self.id, "round_size": self.size_at(hop)}


class Chain:
    """Sessions on consecutive servers (``hops``) that together cover one span."""

    def __init__(self, client: ClientHandle, spec: ChainSpec, hops: list[HopSession]):
        self.client, self.spec = client, spec
        self.hops = hops
        self.relayed = 0  # push mode: inputs the client had to relay because a server did not push them
        self.units = 0  # work done on replays (tokens x blocks, every server)

    @classmethod
    async def open(
        cls,
        client: ClientHandle,
        spec: ChainSpec,
        span: BlockRange | None,
        batch: int,
        exclude: frozenset[str] = frozenset(),
    ) -> Chain:
        """Choose servers for ``span`` (None: the whole model) without ``exclude``, waiting up to
        ``wait_for_blocks`` for missing ones, and open a session stream on each. Raises ``ServerFailure``
        if a stream does not open (none stays open), ``MissingBlocksError`` if no chain covers ``span``."""
        await client.measure_pings(span)
        adapter = spec.adapter if isinstance(spec.adapter, str) else None
        route = await client.routes.chain(span, batch * spec.max_length, False, exclude, adapter=adapter)
        chain = cls(client, spec, [])
        try:
            for hop in route:
                stream = InferenceStream(client.p2p, hop.peer_id)
                rtt = client.routes.pings().get(hop.peer_id)
                envelope = Envelope.for_server(client, hop.peer_id)
                chain.hops.append(HopSession(hop, stream, envelope, client.p2p, rtt))
                await stream.open(client.config.connect_timeout)
        except BaseException:
            chain.close()
            raise
        logger.debug("Session chain: %s", " -> ".join(f"{h.peer_id[-6:]}[{h.hop.span}]" for h in chain.hops))
        return chain

    @property
    def peer_ids(self) -> list[str]:
        return [hop.peer_id for hop in self.hops]

    def send_headers(self, item: StepInput, declared: DeclaredRound | None = None) -> None:
        """Push mode: the first server gets the step, the others a header naming where to push next
        (``declared``: the round the step belongs to, if its caller declared one)."""
        for index, hop in enumerate(self.hops):
            push_from = self.hops[index - 1].peer_id if index > 0 else None  # the only peer allowed to push
            after = self.hops[index + 1] if index + 1 < len(self.hops) else None
            push_to = (after.peer_id, after.session_id) if after is not None else None
            rounds = declared.fields(hop) if declared is not None else {}
            hop.send_step(item, self.spec.max_length, self.spec.adapter, push_from=push_from, push_to=push_to, **rounds)
            hop.sent = "step" if index == 0 else "header"

    async def run(
        self, hop: HopSession, item: StepInput, delivered: bool = False, declared: DeclaredRound | None = None
    ) -> tuple[torch.Tensor, bool]:
        """One step on one server of the chain: (its output, whether it pushed that output to the next server).
        ``delivered``: the previous server pushed this step's input to it (push mode); ``declared``: the round
        the step belongs to, if its caller declared one."""
        if hop.sent is None:
            rounds = declared.fields(hop) if declared is not None else {}
            hop.send_step(item, self.spec.max_length, self.spec.adapter, **rounds)
        elif hop.sent == "header" and not delivered:  # waiting for an input the previous server did not push
            self.relayed += 1
            hop.relay(item)
        hop.sent = None
        return await hop.answer(item, self.spec.timeouts)

    async def replay(self, steps: list[StepInput]) -> list[torch.Tensor]:
        """Send ``steps`` (inputs of the chain's span) through every server, merged into few steps; the
        chain's output of each step, in order. Each server's history keeps what it was sent. On any error
        the chain is closed (its servers' caches no longer match a history) and the error raised."""
        if not steps:
            return []
        batch, _, hidden_size = steps[0].hidden.shape
        prompted = any(step.prompts is not None for step in steps)
        merged = merge_steps(steps, self.spec.chunk_tokens(batch, hidden_size, prompted))
        try:
            for hop in self.hops:
                outputs = []
                for item in merged:
                    hidden, _ = await self.run(hop, item)
                    hop.history.append(item)
                    self.units += work_units(tuple(item.hidden.shape), hop.hop.span)
                    outputs.append(dataclasses.replace(item, hidden=hidden))
                merged = outputs
        except BaseException:
            self.close()
            raise
        return split_tokens([item.hidden for item in merged], [step.hidden.shape[1] for step in steps])

    def replace(self, old: HopSession, new: Chain) -> None:
        """Put ``new``'s servers in place of ``old`` (its stream is the caller's to close); they belong to
        this chain from now on."""
        index = self.hops.index(old)
        self.hops[index : index + 1] = new.hops
        new.hops = []

    def close(self) -> None:
        """Close every server's session stream. Idempotent."""
        hops, self.hops = self.hops, []
        for hop in hops:
            hop.stream.close()
