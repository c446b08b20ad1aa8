"""Verification on the client: another server recomputes a server's steps, and a referee settles disputes.

For each hop of a session (server S serving span P) the client keeps a *shadow*: its own session on
another server V that holds P (chosen like any chain, without S, preferring servers at least as precise
as S's announced dtype), fed the same inputs as S. Outputs are compared per token (``client.verdicts``:
relative L2 distance, tolerance of the less precise dtype of the pair).

- ``verify=1``: every step goes to S and to V at once; S's output is used only once V agrees, so the
  generated text never depends on a cheater (at the cost of a second server per hop and the slower of
  the two answers per step).
- ``0 < verify < 1``: lazy checks. Every ``W = round(1 / verify)`` steps of a hop, in the background,
  V catches up on the steps since its last check as one merged prefill step, and each of those steps'
  outputs is compared with what S answered (the client keeps S's outputs of the unchecked window only).
  Every step is still checked, only late: a server that cheats on every step from some step on is
  caught at the end of that window, W steps at most plus the check's own latency. A hop's first step
  (the prompt, usually) is checked at once: the shadow has to compute it anyway to hold the same cache.
  A merged catch-up of W tokens costs far less server time than W decode steps, which keeps the extra
  compute low.
  Default ``verify = 1/12`` (W = 12; ``client.verdicts.DEFAULT_VERIFY``): a merged catch-up costs a
  server about as much as 3 decode steps whatever W (per-block overheads dominate on small models), so
  the verifiers' extra busy time is about 3/W (W = 8 measured 38 %, W = 16 about 19 %); W = 12 stays near
  25 % and leaves W + the check's latency under 20 steps. The README gives the measured numbers.
  The steps of a session's last, incomplete window are checked in the background when it closes.
- ``verify=0``: nothing is checked.

On a mismatch a referee recomputes the step: the client itself when it has the span's weights and can
run that family (``client.referee``), else a third server (a fresh session on another server of P, fed
the span's whole input history up to the disputed step as a few prefill steps). While a background check
settles a dispute the session waits at its next step. Whoever disagrees with the referee while the other
agrees is flagged: never used again by this client
(``RouteManager.flag``, ``model.flagged_servers``), a WARNING names it with the evidence, and its hop
is replaced by replaying its history into an honest server (the failover path of ``client.session``).
With ``verify=1`` a convicted S fails the step, which then runs on the replacement (and is checked
again); with lazy checks the replacement happens at the next step boundary. A convicted shadow is
simply replaced. Without a majority (the referee disagrees with both) S is banned like a failing server.

Work that was checked is counted as verified in the points receipts (``client.points``), both S's and V's.
A server that fails as a verifier or referee (down, or too busy for one more session) is not banned; this
session just asks others for a while.

Shadows and third-server referees are chains of their own (``client.chain``), fed with ``Chain.replay``; the
verifier gets the client (``client.handle``) and the session's ``ChainSpec``, not the session.

Concurrency: everything runs on the client's event loop; background checks are tasks owned by the
``Verifier`` of one session, at most one in flight per hop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import torch

from client.chain import Chain, ChainSpec
from client.handle import ClientHandle
from client.hop import HopSession, StepInput
from client.verdicts import (
    Detection,
    Evidence,
    least_precise,
    less_precise,
    mismatch,
    tolerance,
    verdict,
    window,
    worst_token,
)
from swarm.errors import StamenError
from swarm.net import tensors
from swarm.net.receipts import work_units
from swarm.net.rpc import ServerFailure
from swarm.routing.chains import uncovered_blocks
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

AVOID_SECONDS = 30.0  # a server that failed as a verifier or referee is not asked again for this long
SHADOW_ATTEMPTS = 4  # shadows tried per check before its steps are left unchecked (each failed one is avoided)


class CheatingDetected(StamenError):
    """A server's answer disagreed with another server's and with a referee's."""


class Shadow:
    """A hop's shadow: sessions on other servers of the span, and the span's inputs they must hold."""

    def __init__(self, known: list[StepInput]):
        self.chain: Chain | None = None  # the shadow chain (None: open one before the next check)
        self.known = list(known)  # every input of the span so far that a shadow has been or must be fed
        self.fed = 0  # how many of ``known`` the current shadow chain holds
        self.pending: list[tuple[StepInput, torch.Tensor]] = []  # lazy: (input, S's output), unchecked
        self.task: asyncio.Task | None = None  # lazy: the check in flight

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


class Verifier:
    """Checks one inference session's hops (see the module docstring)."""

    def __init__(self, client: ClientHandle, spec: ChainSpec, verify: float, position: Callable[[], int]):
        """Checks for the session whose chains share ``spec``; ``position()`` is its processed tokens (for
        the reports of detections)."""
        self.client, self.spec, self.position, self.window = client, spec, position, window(verify)
        self.full = verify >= 1.0
        self.shadows: dict[HopSession, Shadow] = {}
        self.convicted: set[HopSession] = set()  # lazy: hops found cheating, to replace at the next step
        self.referee = ""  # who settled the last dispute (for the log)
        self.unchecked: set[str] = set()  # servers found without another server of their span (logged once)
        self._calm = asyncio.Event()  # set while no background check is settling a dispute
        self._calm.set()
        self._disputes = 0  # background checks settling a dispute now
        self.avoided: dict[str, float] = {}  # server that failed as a verifier or referee -> asked again after
        self.routes, self.stats, self.receipts = client.routes, client.verification, client.receipts

    # -- the session's entry points --

    def start(self, hop: HopSession, item: StepInput, hops: list[HopSession]) -> asyncio.Future | None:
        """Before ``item`` goes to ``hop``: with verify=1, the same step starts on the hop's shadow."""
        self.prune(hops)
        if not self.full:
            return None
        shadow = self.shadows.setdefault(hop, Shadow(hop.history))
        return asyncio.ensure_future(self._run_shadow(hop, shadow, [item], item.hidden.shape[0]))

    async def check(
        self, hop: HopSession, item: StepInput, output: torch.Tensor, started: asyncio.Future | None
    ) -> torch.Tensor:
        """``hop`` answered ``output`` for ``item``: with verify=1 return it once checked (raises
        ``ServerFailure`` if the hop cheated); with lazy checks keep it for the window's check."""
        if self.full:
            return await self._check_now(hop, item, output, started)
        shadow = self.shadows.get(hop)
        first = shadow is None
        if first:  # the first step (often the prompt) is checked at once: the shadow must compute it anyway
            shadow = self.shadows[hop] = Shadow(hop.history)
        shadow.pending.append((item, output))
        if (first or len(shadow.pending) >= self.window) and (shadow.task is None or shadow.task.done()):
            shadow.task = asyncio.ensure_future(_logged(self._check_window(hop, shadow)))
        return output

    async def settled(self) -> None:
        """Wait while a background check settles a dispute: the session does not go on using a server
        that was just caught disagreeing before the referee has spoken."""
        await self._calm.wait()

    def take_convicted(self, hops: list[HopSession]) -> list[HopSession]:
        """Hops of ``hops`` found cheating by a background check (each reported once)."""
        found = [hop for hop in hops if hop in self.convicted]
        self.convicted.difference_update(found)
        return found

    def prune(self, hops: list[HopSession]) -> None:
        """Close the shadows of hops no longer in the session (replaced, moved)."""
        for hop in [hop for hop in self.shadows if hop not in hops]:
            shadow = self.shadows.pop(hop)
            if shadow.task is not None and not shadow.task.done():
                shadow.task.add_done_callback(lambda _, s=shadow: s.close())
            else:
                shadow.close()

    def finish(self) -> None:
        """The session closed: check the steps of its last windows in the background, then close."""
        for hop, shadow in self.shadows.items():
            asyncio.ensure_future(_logged(self._final_check(hop, shadow)))
        self.shadows = {}

    # -- checks --

    async def _check_now(
        self, hop: HopSession, item: StepInput, output: torch.Tensor, started: asyncio.Future | None
    ) -> torch.Tensor:
        shadow = self.shadows[hop]
        answers = await started if started is not None else None
        if answers is None:
            return output
        evidence = self._compare(hop, shadow, item, output, answers[0])
        if evidence is None:
            return output
        culprit = await self._settle(hop, shadow, len(shadow.known) - 1, output, answers[0], evidence)
        if culprit == "suspect":
            raise ServerFailure(hop.peer_id, f"wrong answer ({evidence})", CheatingDetected(str(evidence)))
        if culprit is None:  # no majority: treat it as a failing server, not a cheater
            raise ServerFailure(hop.peer_id, f"answers disputed without a majority ({evidence})")
        return output

    async def _check_window(self, hop: HopSession, shadow: Shadow) -> None:
        pairs, shadow.pending = shadow.pending, []
        answers = await self._run_shadow(hop, shadow, [item for item, _ in pairs], pairs[0][0].hidden.shape[0])
        if answers is None:  # these steps stay unchecked; a later shadow must still hold their inputs
            shadow.known.extend(item for item, _ in pairs)
            return
        first = len(shadow.known) - len(pairs)
        for offset, ((item, output), answer) in enumerate(zip(pairs, answers, strict=True)):
            evidence = self._compare(hop, shadow, item, output, answer)
            if evidence is None:
                continue
            self._disputes += 1
            self._calm.clear()
            try:
                culprit = await self._settle(hop, shadow, first + offset, output, answer, evidence)
            finally:
                self._disputes -= 1
                if not self._disputes:
                    self._calm.set()
            if culprit is None:  # no majority: treat it as a failing server, not a cheater
                self.routes.ban(hop.peer_id, f"answers disputed without a majority ({evidence})")
            if culprit != "shadow":
                self.convicted.add(hop)
            return

    async def _final_check(self, hop: HopSession, shadow: Shadow) -> None:
        try:
            if shadow.task is not None:
                await asyncio.wait({shadow.task})
            if shadow.pending:
                await self._check_window(hop, shadow)
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

    async def _run_shadow(
        self, hop: HopSession, shadow: Shadow, steps: list[StepInput], batch: int
    ) -> list[torch.Tensor] | None:
        """Feed ``steps`` to the hop's shadow (opening one first and catching it up if needed); their
        outputs, or None if no shadow could do it (the steps stay unchecked; a later check feeds them)."""
        for _ in range(SHADOW_ATTEMPTS):
            try:
                if shadow.chain is None:
                    shadow.chain = await self._open(hop, frozenset({hop.peer_id}), batch)
                    if shadow.chain is None:
                        break
                await self._feed(shadow.chain, shadow.known[shadow.fed :])
                shadow.fed = len(shadow.known)
                answers = await self._feed(shadow.chain, steps)
            except ServerFailure as failure:
                self._avoid(failure, "verifier")
                shadow.close()
                continue
            shadow.known.extend(steps)
            shadow.fed = len(shadow.known)
            return answers
        self.stats.skipped += len(steps)
        return None

    def _avoid(self, failure: ServerFailure, role: str) -> None:
        """A server failed as a verifier or referee (down, or too busy for another session): this session
        asks others from now on (no ban: it may still serve well)."""
        logger.info("Server %s failed as a %s: %s", failure.peer_id, role, failure.reason)
        self.avoided[failure.peer_id] = time.monotonic() + AVOID_SECONDS

    async def _open(self, hop: HopSession, exclude: frozenset[str], batch: int) -> Chain | None:
        """A chain over ``hop``'s span on other servers, preferring ones at least as precise as ``hop``'s
        server; None if no other server holds the span (logged)."""
        now = time.monotonic()
        exclude = exclude | {peer for peer, until in self.avoided.items() if until > now}
        span = hop.hop.span
        servers = await self.routes.candidates(exclude=exclude)
        if uncovered_blocks(servers, span):
            if hop.peer_id not in self.unchecked:  # once per server and session
                logger.warning("No other server holds blocks %s: server %s goes unchecked", span, hop.peer_id)
                self.unchecked.add(hop.peer_id)
            return None
        avoid = less_precise(servers, span, tensors.DTYPE_NAMES.get(hop.dtype, "float32"))
        return await Chain.open(self.client, self.spec, span, batch, exclude | avoid)

    async def _feed(self, chain: Chain, steps: list[StepInput]) -> list[torch.Tensor]:
        """Run ``steps`` through a shadow or referee chain; each step's output (in order). Its work counts
        as the verifiers' (``VerifyStats.shadow_units``)."""
        before = chain.units
        try:
            return await chain.replay(steps)
        finally:
            self.stats.shadow_units += chain.units - before

    async def _settle(
        self, hop: HopSession, shadow: Shadow, index: int, output: torch.Tensor, answer: torch.Tensor, evidence
    ) -> str | None:
        """A referee recomputes step ``index`` of the span's inputs; flag whoever disagrees with it.
        Returns "suspect", "shadow" or None (no majority, or no referee)."""
        item = shadow.known[index]
        found = await self._referee(hop, shadow, index)
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

    async def _referee(
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
        referee = await self._open(hop, suspects, steps[0].hidden.shape[0])
        if referee is None:
            logger.warning("No referee for blocks %s: cannot tell %s from its verifier", hop.hop.span, hop.peer_id)
            return None
        hops = list(referee.hops)
        try:
            truth = (await self._feed(referee, steps))[-1]
        except ServerFailure as failure:
            self._avoid(failure, "referee")
            return None
        finally:
            referee.close()
        names = ", ".join(h.peer_id for h in hops)
        return truth, least_precise([h.dtype for h in hops]), f"server {names}"

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
