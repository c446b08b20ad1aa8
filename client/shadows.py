"""Verification's shadows (``client.verify``): the other servers that recompute a hop's steps.

A ``Shadow`` is what the client keeps for one hop of a session: the chain of other servers of the hop's span
(opened when first needed, reopened on others when it fails), every input of the span it must hold, and the
hop's outputs not checked yet. ``Verifiers`` opens such chains (without the checked server, preferring
servers at least as precise as its announced dtype, in a view of the swarm at most a second old when none
is known: a server may have joined since), feeds them, remembers servers that failed as verifiers for a
while, and finds the referee of a dispute (the client's own computation, else a third server).

Concurrency: everything runs on the client's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time

import torch

from client.chain import Chain, ChainSpec
from client.handle import ClientHandle
from client.hop import HopSession, StepInput
from client.verdicts import least_precise, less_precise
from swarm.net import tensors
from swarm.net.rpc import ServerFailure
from swarm.routing.chains import uncovered_blocks

logger = logging.getLogger(__name__)

AVOID_SECONDS = 30.0  # a server that failed as a verifier or referee is not asked again for this long
LOOKUP_AGE = 1.0  # a span without a verifier is looked up in a view at most this old (look-ups are shared)
SHADOW_ATTEMPTS = 4  # shadows tried per check before its steps are left unchecked (each failed one is avoided)


@dataclasses.dataclass(frozen=True)
class Pending:
    """Lazy: a step whose output the session used, not checked yet."""

    item: StepInput
    output: torch.Tensor  # what the hop's server answered
    start: int  # the step's first token in the session (tokens before it)


class Shadow:
    """A hop's shadow: sessions on other servers of the span, and the span's inputs they must hold."""

    def __init__(self, known: list[StepInput]):
        self.chain: Chain | None = None  # the shadow chain (None: open one before the next check)
        self.known = list(known)  # every input of the span so far that a shadow has been or must be fed
        self.fed = 0  # how many of ``known`` the current shadow chain holds
        self.pending: list[Pending] = []  # lazy: steps whose output is not checked yet, in order
        self.task: asyncio.Task | None = None  # lazy: the check in flight
        self.retry_at = 0.0  # lazy: no verifier was found: the next check waits until then (monotonic)
        self.waited = False  # verify=1: a step already waited in vain for a verifier (later ones try once)
        self.checking = 0  # lazy: steps the check in flight covers
        self.tokens = sum(step.hidden.shape[1] for step in known)  # lazy: the span's input tokens so far
        self.obsolete_from: int | None = None  # a rewind took back the session's tokens from here on

    @property
    def hops(self) -> list[HopSession]:
        """The shadow chain's servers (none while it has no chain)."""
        return self.chain.hops if self.chain is not None else []

    @property
    def dtype(self) -> torch.dtype:
        """The least precise dtype along the shadow chain."""
        return least_precise([hop.dtype for hop in self.hops])

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()
        self.chain, self.fed = None, 0


class Verifiers:
    """Opens and feeds the verifier chains of one session."""

    def __init__(self, client: ClientHandle, spec: ChainSpec):
        self.client, self.spec, self.routes, self.stats = client, spec, client.routes, client.verification
        self.avoided: dict[str, float] = {}  # server that failed as a verifier or referee -> asked again after

    async def run(
        self, hop: HopSession, shadow: Shadow, steps: list[StepInput], batch: int
    ) -> list[torch.Tensor] | None:
        """Feed ``steps`` to the hop's shadow (opening one first and catching it up if needed); their
        outputs, or None if no shadow could do it (the steps stay unchecked; a later check feeds them)."""
        for _ in range(SHADOW_ATTEMPTS):
            try:
                if shadow.chain is None:
                    shadow.chain = await self.open(hop, frozenset({hop.peer_id}), batch)
                    if shadow.chain is None:
                        break
                await self.feed(shadow.chain, shadow.known[shadow.fed :])
                shadow.fed = len(shadow.known)
                answers = await self.feed(shadow.chain, steps)
            except ServerFailure as failure:
                self.avoid(failure, "verifier")
                shadow.close()
                continue
            shadow.known.extend(steps)
            shadow.fed = len(shadow.known)
            return answers
        return None

    def avoid(self, failure: ServerFailure, role: str) -> None:
        """A server failed as a verifier or referee (down, or too busy for another session): this session
        asks others from now on (no ban: it may still serve well)."""
        logger.info("Server %s failed as a %s: %s", failure.peer_id, role, failure.reason)
        self.avoided[failure.peer_id] = time.monotonic() + AVOID_SECONDS

    async def open(self, hop: HopSession, exclude: frozenset[str], batch: int) -> Chain | None:
        """A chain over ``hop``'s span on other servers, preferring ones at least as precise as ``hop``'s
        server; None if no other server holds the span (logged)."""
        exclude = self._excluding(exclude)
        span = hop.hop.span
        servers = await self.routes.candidates(exclude=exclude)
        if uncovered_blocks(servers, span):  # a server may have joined since the view was fetched: look again
            servers = await self.routes.candidates(exclude=exclude, max_age=LOOKUP_AGE)
        if uncovered_blocks(servers, span):
            if hop.peer_id not in self.stats.unchecked:  # once per server and client (not per session)
                logger.warning("No other server holds blocks %s: server %s goes unchecked", span, hop.peer_id)
                self.stats.unchecked.add(hop.peer_id)
            return None
        avoid = less_precise(servers, span, tensors.DTYPE_NAMES.get(hop.dtype, "float32"))
        return await Chain.open(self.client, self.spec, span, batch, exclude | avoid)

    async def available(self, hop: HopSession) -> bool:
        """Whether the current view of the swarm (no look-up) has another server for ``hop``'s span: a check
        that found no verifier is tried again as soon as one is known, without waiting for its retry time."""
        servers = await self.routes.candidates(exclude=self._excluding(frozenset({hop.peer_id})))
        return not uncovered_blocks(servers, hop.hop.span)

    def _excluding(self, exclude: frozenset[str]) -> frozenset[str]:
        """``exclude`` and the servers avoided as verifiers right now."""
        now = time.monotonic()
        return exclude | {peer for peer, until in self.avoided.items() if until > now}

    async def feed(self, chain: Chain, steps: list[StepInput]) -> list[torch.Tensor]:
        """Run ``steps`` through a shadow or referee chain; each step's output (in order). Its work counts
        as the verifiers' (``VerifyStats.shadow_units``)."""
        before = chain.units
        try:
            return await chain.replay(steps)
        finally:
            self.stats.shadow_units += chain.units - before

    async def referee(
        self, hop: HopSession, shadow: Shadow, index: int
    ) -> tuple[torch.Tensor, torch.dtype, str] | None:
        """(the referee's output of step ``index``, its dtype, who it is): the client's own computation if it
        can, else a third server of the span fed the span's inputs up to that step; None if there is none."""
        steps = shadow.known[: index + 1]
        local = self.client.referee
        if local is not None and local.can_run(steps, self.spec.adapter):
            loop = asyncio.get_running_loop()
            try:
                run = functools.partial(local.run, hop.hop.span, steps, adapter=self.spec.adapter)
                truth = await loop.run_in_executor(None, run)
                return truth, torch.float32, "the client's own computation"
            except Exception:
                logger.exception("The client could not recompute blocks %s; asking a server", hop.hop.span)
        suspects = frozenset({hop.peer_id} | {h.peer_id for h in shadow.hops})
        referee = await self.open(hop, suspects, steps[0].hidden.shape[0])
        if referee is None:
            logger.warning("No referee for blocks %s: cannot tell %s from its verifier", hop.hop.span, hop.peer_id)
            return None
        hops = list(referee.hops)
        try:
            truth = (await self.feed(referee, steps))[-1]
        except ServerFailure as failure:
            self.avoid(failure, "referee")
            return None
        finally:
            referee.close()
        names = ", ".join(h.peer_id for h in hops)
        return truth, least_precise([h.dtype for h in hops]), f"server {names}"
