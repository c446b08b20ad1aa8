"""A span's compute: a queue of typed work (``swarm.core.work``) and one worker thread that runs it in slices.

The scheduler only orders, batches and runs slices: what runs next (fair share between peers, then
urgency) and how long a decode batch waits for more steps are pure decisions (``swarm.core.batching``);
what a slice does to an item is the item's own (``swarm.core.work.run_slice``), so no kind of work is
special here. It counts what it ran for each peer (its fair share, and ``usage`` for status).

Concurrency: handlers on the event loop ``submit`` work and await its result; a single worker thread
takes slices from the queue, runs them on the block stack, and hands results back to the loop with
``call_soon_threadsafe``. Only the worker touches modules and KV caches while
work is queued, so no locks guard them. A slice that fails with several items in it is not blamed on
all of them: each item runs again alone (a cache is written in place but only advances once a step
has gone through all its blocks, so running a slice again is harmless); only an item that fails
alone gets the error. Work whose awaiting handler was cancelled (the peer went away) is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

from swarm.core.batching import MAX_PEERS, ActiveSessions, FairShare, hold_seconds, next_batch
from swarm.core.blocks import BlockStack
from swarm.core.work import Kind, Work, run_slice
from swarm.errors import ShuttingDownError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 256  # rows x tokens of decode steps run as one batch
    chunk_token_blocks: int = 4096  # a slice of other work runs at most about this many tokens x blocks
    decode_tokens: int = 16  # inference steps of at most this many rows x tokens count as decode steps
    batch_wait: float = 0.1  # at most this many seconds a decode batch waits for the rest of a declared round...
    active_window: float = 0.5  # ...or (half a decode slice at most) for undeclared sessions that stepped within
    # this many seconds (or 4 slices) and are not queued
    fair_share: bool = True  # share compute fairly between peers when several wait (False: urgency order only)
    step_delay: float = 0.0  # test only: extra seconds per slice with inference work (a slow server)


class _Pending:
    """A submitted work item's way back to the event loop that awaits it."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop):
        self.work, self.loop = work, loop
        self.future: asyncio.Future = loop.create_future()

    def settle(self, result: torch.Tensor | None, error: BaseException | None = None) -> None:
        def _settle():
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(_settle)


class Scheduler:
    def __init__(self, stack: BlockStack, config: SchedulerConfig | None = None):
        self.stack, self.config = stack, config or SchedulerConfig()
        self._ready: dict[Work, _Pending] = {}
        self._cond = threading.Condition()
        self._counter = itertools.count()
        self._stopped = False
        self.in_flight = 0  # submitted and not finished, for graceful shutdown
        self.slices = 0  # slices run so far (tests and benchmarks read how work was batched)
        self.batched_items = 0  # items run in those slices
        self._active = ActiveSessions(self.config.active_window)
        self._fair = FairShare()
        self.served: dict[str, int] = {}  # peer -> rows x tokens x blocks run for it (the MAX_PEERS largest)
        self._decode_seconds = 0.0  # moving average of a decode slice's time
        self._thread = threading.Thread(target=self._work_loop, name="stamen-compute", daemon=True)
        self._thread.start()

    def sizes(self) -> dict[str, int]:
        """Entries of its long-lived structures (diagnostics: they must not grow with the work served)."""
        return {
            "queued_work": len(self._ready),
            "active_sessions": len(self._active),
            "fair_share_peers": len(self._fair),
            "served_peers": len(self.served),
        }

    def usage(self, top: int = 8) -> list[dict]:
        """The peers this span served most: rows x tokens x blocks run for each, and its items queued now."""
        with self._cond:
            queued: dict[str, int] = {}
            for work in self._ready:
                queued[work.peer] = queued.get(work.peer, 0) + 1
            served = dict(self.served)
        peers = sorted(set(served) | set(queued), key=lambda peer: (-served.get(peer, 0), peer))[:top]
        return [{"peer_id": peer, "served": served.get(peer, 0), "queued": queued.get(peer, 0)} for peer in peers]

    async def submit(self, work: Work) -> torch.Tensor:
        """Queue ``work`` and wait for its output (the hidden states after its last block)."""
        pending = _Pending(work, asyncio.get_running_loop())
        with self._cond:
            if self._stopped:
                raise ShuttingDownError("server is shutting down")
            work.seq = next(self._counter)
            self._ready[work] = pending
            self._active.saw(work, time.monotonic())
            self._cond.notify()
        self.in_flight += 1
        try:
            return await pending.future
        except asyncio.CancelledError:  # the peer went away: drop the work unless it is running right now
            with self._cond:
                self._ready.pop(work, None)
            raise
        finally:
            self.in_flight -= 1

    def _work_loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                batch, blocks = self._next_batch()
                pendings = [self._ready.pop(work) for work in batch if work in self._ready]  # none cancelled
            if pendings:
                self._run_slice(pendings, blocks)

    def _decide(self) -> tuple[list[Work], int]:
        """``next_batch`` over the queue now (with the peers' fair-share counts unless that is off)."""
        served = None
        if self.config.fair_share:
            self._fair.catch_up({work.peer for work in self._ready})
            served = self._fair.served
        return next_batch(list(self._ready), self.config.max_batch_tokens, self.config.chunk_token_blocks, served)

    def _next_batch(self) -> tuple[list[Work], int]:
        """The next slice; a decode batch first waits briefly for steps not queued yet (``hold_seconds``)."""
        config = self.config
        batch, blocks = self._decide()
        if batch[0].kind != Kind.DECODE:
            return batch, blocks
        chosen = time.monotonic()
        while not self._stopped:
            now = time.monotonic()
            window = max(config.active_window, 4 * self._decode_seconds)
            expected = self._active.expected(batch[0].blocks, now, window)
            ready = list(self._ready)
            hold = hold_seconds(
                batch, ready, expected, config.max_batch_tokens, config.batch_wait, self._decode_seconds
            )
            if now >= chosen + hold:
                break
            self._cond.wait(chosen + hold - now)
            if self._ready:
                batch, blocks = self._decide()
        return batch, blocks

    def _run_slice(self, pendings: list[_Pending], blocks: int) -> None:
        works = [pending.work for pending in pendings]
        if self.config.step_delay and any(work.cache is not None for work in works):
            time.sleep(self.config.step_delay)  # test only, on the compute thread
        started = time.perf_counter()
        try:
            results = run_slice(self.stack, works, blocks)
        except Exception as exc:
            if len(pendings) == 1:
                if not isinstance(exc, ShuttingDownError):
                    logger.exception("Work of kind %s failed", works[0].kind.name)
                pendings[0].settle(None, exc)
                return
            logger.warning("A batch of %d failed (%r); running its items one by one", len(pendings), exc)
            self._requeue(pendings, solo=True)
            return
        self.slices += 1
        self.batched_items += len(works)
        self._count(works, blocks)
        if works[0].kind == Kind.DECODE:
            elapsed = time.perf_counter() - started
            self._decode_seconds = elapsed if not self._decode_seconds else 0.8 * self._decode_seconds + 0.2 * elapsed
        self._log_slice(works, blocks, started)
        unfinished = []
        for pending, result in zip(pendings, results, strict=True):
            if result is None:
                unfinished.append(pending)
            else:
                pending.settle(result)
        self._requeue(unfinished)

    def _count(self, works: list[Work], blocks: int) -> None:
        """Each peer's share of a slice that ran: its fair-share count, and the usage shown in status."""
        with self._cond:
            self._fair.charge(works, blocks)
            for work in works:
                self.served[work.peer] = self.served.get(work.peer, 0) + work.size * blocks
            if len(self.served) > MAX_PEERS:
                del self.served[min(self.served, key=self.served.__getitem__)]

    @staticmethod
    def _log_slice(works: list[Work], blocks: int, started: float) -> None:
        logger.debug(
            "slice: %d x %s, %d rows x tokens, %d blocks, %d peers, standing %.1f, %.1f ms",
            len(works),
            works[0].kind.name,
            sum(work.size for work in works),
            blocks,
            len({work.peer for work in works}),
            works[0].points,
            1000 * (time.perf_counter() - started),
        )

    def _requeue(self, pendings: list[_Pending], solo: bool = False) -> None:
        with self._cond:
            for pending in pendings:
                if pending.future.done():  # its handler gave up on it
                    continue
                pending.work.solo = pending.work.solo or solo
                self._ready[pending.work] = pending
            self._cond.notify()

    def shutdown(self) -> None:
        """Stop the worker; queued work fails with ShuttingDownError."""
        with self._cond:
            self._stopped = True
            pendings, self._ready = list(self._ready.values()), {}
            self._cond.notify_all()
        for pending in pendings:
            pending.settle(None, ShuttingDownError("server is shutting down"))


__all__ = ["Kind", "Scheduler", "SchedulerConfig", "Work"]
