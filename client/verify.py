"""Verification on the client: another server recomputes a server's steps, and a referee settles disputes.

For each hop of a session (server S serving span P) the client keeps a *shadow*: its own session on
another server V that holds P (chosen like any chain, without S, preferring servers at least as precise
as S's announced dtype), fed the same inputs as S. Outputs are compared per token (``client.verdicts``:
relative L2 distance, tolerance of the less precise dtype of the pair).

- ``verify=1``: every step goes to S and to V at once; S's output is used only once V agrees, so the
  generated text never depends on a cheater (at the cost of a second server per hop and the slower of
  the two answers per step). A step nobody can check is never used silently: the step waits for a
  verifier (looking the swarm up again every 0.25 s, up to ``wait_for_blocks``; a shadow that appears
  catches up on the span's inputs first), tries other ones when a verifier fails, and if none can check
  it fails with ``VerificationImpossible``, or, with ``allow_unverified``, is used with a WARNING naming
  the step and the server.
- ``0 < verify < 1``: lazy checks. Every ``W = round(1 / verify)`` steps of a hop, in the background,
  V catches up on the steps since its last check as one merged prefill step, and each of those steps'
  outputs is compared with what S answered (the client keeps S's outputs until they are checked). A
  hop's first step (the prompt, usually) is checked at once: the shadow has to compute it anyway to hold
  the same cache. Steps nobody could check stay pending: the next try (after a second, with the swarm
  looked up again, so servers that joined meanwhile are found) checks them all. Every step is checked,
  only late, and never too late: a session waits for a hop's check in flight rather than run more than
  ``lag_limit(W)`` steps past its first step (W + 8), so a cheat is caught within that many steps of its
  start whatever the check's latency, as long as some other server holds the span.
  A merged catch-up of W tokens costs far less server time than W decode steps, which keeps the extra
  compute low.
  Default ``verify = 1/12`` (W = 12; ``client.verdicts.DEFAULT_VERIFY``): a merged catch-up costs a
  server about as much as 3 decode steps whatever W (per-block overheads dominate on small models), so
  the verifiers' extra busy time is about 3/W (W = 8 measured 38 %, W = 16 about 19 %); W = 12 stays near
  25 % and catches a cheat within 20 steps. The README gives the measured numbers.
  ``confirm`` checks every step so far at once and waits (``generate`` and the HTTP API do so before they
  answer); the steps of a session's last window are otherwise checked in the background when it closes,
  and so are those of a hop that left the session (failover, move).
- ``verify=0``: nothing is checked.

On a mismatch a referee recomputes the step: the client itself when it has the span's weights and can
run that family (``client.referee``), else a third server (a fresh session on another server of P, fed
the span's whole input history up to the disputed step as a few prefill steps). While a background check
settles a dispute the session waits at its next step. Whoever disagrees with the referee while the other
agrees is flagged: never used again by this client (``RouteManager.flag``, ``model.flagged_servers``),
and a WARNING names it with the evidence. With ``verify=1`` a convicted S fails the step, which then runs
on a replacement (its history replayed into an honest server, the failover path of ``client.session``,
and checked again): its wrong output was never used. With lazy checks the session did use S's wrong
outputs, and so did every server after S: at its next step (or ``confirm``) the session goes back to the
last verified token (the disputed step's first token) on a new chain without S, fed the session's inputs
up to there, and raises ``SessionRewound`` so its caller generates again from there (``generate`` does it
itself: ``client.resume``). A convicted shadow is simply replaced. Without a majority (the referee
disagrees with both) S is banned like a failing server, and the session goes back as well.

When a hop's server fails, its shadow holds the span's inputs up to its last check: with lazy checks it
catches up on the rest (a check like any other) and becomes the session's replacement (``take_over``), so
failover replays nothing; the new hop gets a shadow of its own in the background.

Work that was checked is counted as verified in the points receipts (``client.points``), both S's and V's.
A server that fails as a verifier or referee (down, or too busy for one more session) is not banned; this
session just asks others for a while.

Shadows and third-server referees are chains of their own (``client.chain``), opened and fed by
``client.shadows``; the verifier gets the client (``client.handle``) and the session's ``ChainSpec``, not
the session.

Concurrency: everything runs on the client's event loop; background checks are tasks owned by the
``Verifier`` of one session, at most one in flight per hop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import torch

from client.chain import Chain, ChainSpec
from client.handle import ClientHandle
from client.hop import HopSession, StepInput
from client.shadows import Pending, Shadow, Verifiers
from client.verdicts import (
    Detection,
    Evidence,
    lag_limit,
    mismatch,
    tolerance,
    verdict,
    window,
    worst_token,
)
from swarm.errors import CheatingDetected, VerificationImpossible
from swarm.net import tensors
from swarm.net.receipts import work_units
from swarm.net.rpc import ServerFailure
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # lazy: after a check found no verifier, the next try waits this long (and looks the swarm up)
MAX_UNCHECKED = 256  # lazy: steps of a hop kept for a check while nobody can check them (older ones give up)
POLL_SECONDS = 0.25  # verify=1: how often a step without a verifier looks for one again, until wait_for_blocks


class Verifier:
    """Checks one inference session's hops (see the module docstring)."""

    def __init__(self, client: ClientHandle, spec: ChainSpec, verify: float, position: Callable[[], int]):
        """Checks for the session whose chains share ``spec``; ``position()`` is its processed tokens (for
        the reports of detections)."""
        self.client, self.spec, self.position, self.window = client, spec, position, window(verify)
        self.full = verify >= 1.0
        self.shadows: dict[HopSession, Shadow] = {}
        self.leaving: set[asyncio.Task] = set()  # last checks of shadows whose hops left the session
        self.rewind: int | None = None  # lazy: a used output was wrong: the session must go back to this many tokens
        self.referee = ""  # who settled the last dispute (for the log)
        self.verifiers = Verifiers(client, spec)
        self._calm = asyncio.Event()  # set while no background check is settling a dispute
        self._calm.set()
        self._disputes = 0  # background checks settling a dispute now
        self.routes, self.stats, self.receipts = client.routes, client.verification, client.receipts

    # -- the session's entry points --

    def start(self, hop: HopSession, item: StepInput, hops: list[HopSession]) -> asyncio.Future | None:
        """Before ``item`` goes to ``hop``: with verify=1, the same step starts on the hop's shadow."""
        self.prune(hops)
        if not self.full:
            return None
        shadow = self.shadows.setdefault(hop, Shadow(hop.history))
        return asyncio.ensure_future(self.verifiers.run(hop, shadow, [item], item.hidden.shape[0]))

    async def check(
        self, hop: HopSession, item: StepInput, output: torch.Tensor, started: asyncio.Future | None
    ) -> torch.Tensor:
        """``hop`` answered ``output`` for ``item``: with verify=1 return it once checked (raises
        ``ServerFailure`` if the hop cheated, ``VerificationImpossible`` if nobody could check it); with lazy
        checks keep it for the window's check."""
        if self.full:
            return await self._check_now(hop, item, output, started)
        shadow = self.shadows.get(hop)
        first = shadow is None
        if first:  # the first step (often the prompt) is checked at once: the shadow must compute it anyway
            shadow = self.shadows[hop] = Shadow(hop.history)
        shadow.pending.append(Pending(item, output, shadow.tokens))
        shadow.tokens += item.hidden.shape[1]
        running = shadow.task is not None and not shadow.task.done()
        if running and shadow.checking + len(shadow.pending) >= lag_limit(self.window):
            await asyncio.wait({shadow.task})  # the check lags: wait for it rather than run further ahead of it
        idle = shadow.task is None or shadow.task.done()
        due = first or (idle and len(shadow.pending) >= self.window and await self._retry_now(hop, shadow))
        if due and idle:
            shadow.task = asyncio.ensure_future(_logged(self._check_window(hop, shadow)))
        return output

    async def _retry_now(self, hop: HopSession, shadow: Shadow) -> bool:
        """Lazy: a window is due for its check unless the last one found no verifier, its retry time has not
        come and the current view still shows none (a server that just joined is used at once)."""
        return time.monotonic() >= shadow.retry_at or await self.verifiers.available(hop)

    async def settled(self) -> None:
        """Wait while a background check settles a dispute: the session does not go on using a server
        that was just caught disagreeing before the referee has spoken."""
        await self._calm.wait()

    def take_rewind(self) -> int | None:
        """Lazy: the tokens the session must go back to (a check found a wrong output it used), once."""
        rewind, self.rewind = self.rewind, None
        return rewind

    async def confirm(self) -> None:
        """Check every step so far now, and wait for all checks (also those of hops that left the session).
        Steps nobody could check stay pending (logged) for a later check."""
        for hop, shadow in list(self.shadows.items()):
            if shadow.task is not None and not shadow.task.done():
                await asyncio.wait({shadow.task})
            if shadow.pending and self.shadows.get(hop) is shadow:
                shadow.task = asyncio.ensure_future(_logged(self._check_window(hop, shadow)))
        tasks = {s.task for s in self.shadows.values() if s.task is not None} | self.leaving
        if tasks:
            await asyncio.wait(tasks)

    async def take_over(self, hop: HopSession) -> Chain | None:
        """Lazy checks: ``hop``'s server failed. Its shadow holds the span's inputs up to its last check: it is
        fed the rest (which checks the failed server's unchecked outputs, as any check does) and handed over to
        the session as the replacement, so no history is replayed; the new hop gets a new shadow in the
        background. None when there is no shadow to hand over (the caller replays the history elsewhere)."""
        shadow = self.shadows.get(hop)
        if self.full or shadow is None:
            return None
        if shadow.task is not None and not shadow.task.done():
            await asyncio.wait({shadow.task})
        if shadow.chain is None:
            return None
        if shadow.pending:
            await self._check_window(hop, shadow)
        if shadow.chain is None or shadow.pending or shadow.fed != len(shadow.known):
            return None  # no verifier could take them, or it was the one caught: the caller replays instead
        chain, shadow.chain = shadow.chain, None
        del self.shadows[hop]
        return chain

    def prune(self, hops: list[HopSession], obsolete_from: int | None = None) -> None:
        """Stop shadowing hops no longer in the session (replaced, moved, rewound): their unchecked steps
        are still checked, in the background (but not those from ``obsolete_from`` tokens on: a rewind
        dropped them)."""
        for hop in [hop for hop in self.shadows if hop not in hops]:
            shadow = self.shadows.pop(hop)
            if obsolete_from is not None:
                shadow.obsolete_from = obsolete_from
                shadow.pending = [p for p in shadow.pending if p.start < obsolete_from]
            task = asyncio.ensure_future(_logged(self._final_check(hop, shadow)))
            self.leaving.add(task)
            task.add_done_callback(self.leaving.discard)

    def finish(self) -> None:
        """The session closed: check the steps of its last windows in the background, then close."""
        self.prune([])

    # -- checks --

    async def _check_now(
        self, hop: HopSession, item: StepInput, output: torch.Tensor, started: asyncio.Future | None
    ) -> torch.Tensor:
        shadow = self.shadows[hop]
        answers = await started if started is not None else None
        if answers is None:
            answers = await self._wait_for_shadow(hop, shadow, item)
        if answers is None:
            return self._unchecked(hop, shadow, item, output)
        evidence = self._compare(hop, shadow, item, output, answers[0])
        if evidence is None:
            return output
        culprit = await self._settle(hop, shadow, len(shadow.known) - 1, output, answers[0], evidence)
        if culprit == "suspect":
            raise ServerFailure(hop.peer_id, f"wrong answer ({evidence})", CheatingDetected(str(evidence)))
        if culprit is None:  # no majority: treat it as a failing server, not a cheater
            raise ServerFailure(hop.peer_id, f"answers disputed without a majority ({evidence})")
        return output

    async def _wait_for_shadow(self, hop: HopSession, shadow: Shadow, item: StepInput) -> list[torch.Tensor] | None:
        """verify=1, no shadow answered: look for one until ``wait_for_blocks`` (only once per hop while none
        is found; a shadow that appears meanwhile catches up on the span's inputs and runs ``item``)."""
        deadline = time.monotonic() + (0.0 if shadow.waited else self.client.config.wait_for_blocks)
        while time.monotonic() < deadline:
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            answers = await self.verifiers.run(hop, shadow, [item], item.hidden.shape[0])
            if answers is not None:
                shadow.waited = False
                return answers
        shadow.waited = True
        return None

    def _unchecked(self, hop: HopSession, shadow: Shadow, item: StepInput, output: torch.Tensor) -> torch.Tensor:
        """verify=1 and nobody could check ``item``: fail the step, or (``allow_unverified``) use it, logged."""
        self.stats.skipped += 1
        position = int(item.position_ids.min()) if item.position_ids.numel() else 0
        where = f"the step at position {position} on server {hop.peer_id} (blocks {hop.hop.span})"
        if not self.client.config.allow_unverified:
            raise VerificationImpossible(
                f"verify=1: no other server could check {where} within {self.client.config.wait_for_blocks:.0f} s; "
                "its output was not used (allow_unverified=True uses such steps, with a warning)"
            )
        logger.warning("Using %s unchecked: no other server could check it (allow_unverified)", where)
        shadow.known.append(item)  # a later shadow must still hold it
        return output

    async def _check_window(self, hop: HopSession, shadow: Shadow) -> None:
        pairs, shadow.pending = shadow.pending, []
        shadow.checking = len(pairs)
        try:
            await self._check_pairs(hop, shadow, pairs)
        finally:
            shadow.checking = 0

    async def _check_pairs(self, hop: HopSession, shadow: Shadow, pairs: list[Pending]) -> None:
        answers = await self.verifiers.run(hop, shadow, [p.item for p in pairs], pairs[0].item.hidden.shape[0])
        if answers is None:  # nobody could check them now: they wait for the next check (the oldest give up)
            shadow.pending = pairs + shadow.pending
            shadow.retry_at = time.monotonic() + RETRY_SECONDS
            dropped = max(0, len(shadow.pending) - MAX_UNCHECKED)
            shadow.known.extend(p.item for p in shadow.pending[:dropped])  # a later shadow must still hold them
            shadow.pending = shadow.pending[dropped:]
            self.stats.skipped += dropped
            return
        for offset, (pair, answer) in enumerate(zip(pairs, answers, strict=True)):
            evidence = self._compare(hop, shadow, pair.item, pair.output, answer)
            if evidence is None:
                continue
            self._disputes += 1
            self._calm.clear()
            try:
                index = len(shadow.known) - len(pairs) + offset
                culprit = await self._settle(hop, shadow, index, pair.output, answer, evidence)
            finally:
                self._disputes -= 1
                if not self._disputes:
                    self._calm.set()
            if culprit is None:  # no majority: treat it as a failing server, not a cheater
                self.routes.ban(hop.peer_id, f"answers disputed without a majority ({evidence})")
            if culprit != "shadow":  # the session used a wrong output: it goes back to before this step
                if shadow.obsolete_from is None or pair.start < shadow.obsolete_from:
                    self.rewind = pair.start if self.rewind is None else min(self.rewind, pair.start)
                return
            rest = pairs[offset + 1 :]  # the shadow lied: a new one checks the steps after this one
            del shadow.known[len(shadow.known) - len(rest) :]
            shadow.pending = rest + shadow.pending
            return

    async def _final_check(self, hop: HopSession, shadow: Shadow) -> None:
        try:
            if shadow.task is not None:
                await asyncio.wait({shadow.task})
            left = len(shadow.pending) + 1
            while 0 < len(shadow.pending) < left:  # until all are checked, or a check makes no progress
                left = len(shadow.pending)
                await self._check_window(hop, shadow)
            if shadow.pending:
                self.stats.skipped += len(shadow.pending)
                known = hop.peer_id in self.stats.unchecked  # already warned about: the rest is detail
                logger.log(
                    logging.INFO if known else logging.WARNING,
                    "%d steps of server %s (blocks %s) were never checked: no other server could check them",
                    len(shadow.pending),
                    hop.peer_id,
                    hop.hop.span,
                )
        finally:
            shadow.close()

    def _compare(
        self, hop: HopSession, shadow: Shadow, item: StepInput, output: torch.Tensor, answer: torch.Tensor
    ) -> Evidence | None:
        """Compare S's and V's outputs of one step; agreed work is counted verified for both."""
        distance, token = worst_token(output, answer, item.attention_mask)
        allowed = tolerance(hop.dtype, shadow.dtype)
        evidence = Evidence(distance, allowed, token) if distance > allowed else None
        pair = "/".join(sorted(tensors.DTYPE_NAMES.get(d, str(d)) for d in (hop.dtype, shadow.dtype)))
        self.stats.largest[pair] = max(self.stats.largest.get(pair, 0.0), distance)
        units = work_units(tuple(item.hidden.shape), hop.hop.span)
        self.stats.checks += 1
        self.stats.tokens += item.hidden.shape[0] * item.hidden.shape[1]
        if evidence is not None:
            self.stats.mismatches += 1
            return evidence
        self.receipts.confirm(hop.peer_id, units)
        for shadow_hop in shadow.hops:
            self.receipts.add(shadow_hop.peer_id, work_units(tuple(item.hidden.shape), shadow_hop.hop.span), True)
        return None

    # -- shadows and referees --

    async def _settle(
        self, hop: HopSession, shadow: Shadow, index: int, output: torch.Tensor, answer: torch.Tensor, evidence
    ) -> str | None:
        """A referee recomputes step ``index`` of the span's inputs; flag whoever disagrees with it.
        Returns "suspect", "shadow" or None (no majority, or no referee)."""
        item = shadow.known[index]
        found = await self.verifiers.referee(hop, shadow, index)
        if found is None:
            return None
        truth, referee_dtype, self.referee = found
        mask = item.attention_mask
        culprit = verdict(
            mismatch(output, truth, hop.dtype, referee_dtype, mask),
            mismatch(answer, truth, shadow.dtype, referee_dtype, mask),
        )
        if culprit == "suspect":
            self._flag(hop.peer_id, hop.hop.span, item, evidence, culprit)
        elif culprit == "shadow" and len(shadow.hops) == 1:
            self._flag(shadow.hops[0].peer_id, shadow.hops[0].hop.span, item, evidence, culprit)
        elif culprit == "shadow":  # one of several servers is wrong, which one is not known: flag nobody
            logger.warning("The verifier chain of blocks %s disagrees with a referee; replacing it", hop.hop.span)
        if culprit == "shadow":
            shadow.close()
        return culprit

    def _flag(self, peer_id: str, span: BlockRange, item: StepInput, evidence: Evidence, role: str) -> None:
        step_position = int(item.position_ids.min()) if item.position_ids.numel() else 0
        position = self.position()
        self.routes.flag(peer_id)
        self.stats.detections.append(Detection(peer_id, span, position, step_position, evidence, role))
        logger.warning(
            "Flagged server %s (blocks %s, %s): its output of the step at position %d disagrees with %s's "
            "(%s) and with %s; no longer using it",
            peer_id,
            span,
            "serving" if role == "suspect" else "verifying",
            step_position,
            "its verifier" if role == "suspect" else "the server it checked",
            evidence,
            self.referee,
        )


async def _logged(coroutine) -> None:
    """Run a background check; an unexpected error is logged (the steps it covered stay unchecked)."""
    try:
        await coroutine
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("A background check failed")
