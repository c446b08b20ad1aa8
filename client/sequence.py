"""Route manager: the client's view of the swarm, bans, and chains through it.

The decisions themselves are ``swarm.routing.chains.fastest_chain`` and ``spread_forward`` (pure); this class
gathers their inputs (DHT records, pings, bans, allow/block lists) and waits a bounded time for missing blocks.

Concurrency: look-ups (``servers``, ``candidates``, ``chain``) are coroutines for the client's event loop: DHT
look-ups are awaited (``SwarmDHT.fetch_servers_async``), a stale view is refreshed by a background task, and
waiting for missing blocks is a deadline loop of look-ups. Code on another thread runs them through the client's
loop (``client.loop``). The plain methods (bans, pings, flags, ``view``, ``server``) never wait for the DHT and
are safe from any thread: a lock guards the fields, never held across an ``await``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

from client.bans import BanPolicy, BanRecord, after_failure, after_success
from client.config import ClientConfig
from swarm.errors import MissingBlocksError
from swarm.net.dht import SwarmDHT
from swarm.net.records import ServerInfo
from swarm.routing.chains import Hop, fastest_chain, spread_forward, usable
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.25  # seconds between DHT look-ups while waiting for missing blocks
PING_MEMORY = 3600.0  # seconds a measured round trip is kept at the latest (servers come and go)


class RouteManager:
    """The swarm as this client sees it; its look-ups run on the client's event loop."""

    def __init__(self, dht: SwarmDHT, prefix: str, num_blocks: int, config: ClientConfig):
        self.dht, self.prefix, self.num_blocks, self.config = dht, prefix, num_blocks, config
        self._servers: list[ServerInfo] = []
        self._fetched_at = -float("inf")
        self._began = -float("inf")  # when the look-up of the current view began
        self._bans: dict[str, BanRecord] = {}  # peer id -> its ban and failures held (until they are forgotten)
        self._ban_policy = BanPolicy(config.ban_base, config.ban_max, config.ban_forgive_steps, config.ban_forget_after)
        self._pings: dict[str, tuple[float, float]] = {}  # peer id -> (round trip seconds, measured at), PING_MEMORY
        # servers caught computing wrong answers (``client.verify``): never used again (grows only with cheaters caught)
        self.flagged: set[str] = set()
        self._lock = threading.Lock()  # guards the fields above; never held across an await
        self._fetching: asyncio.Lock | None = None  # one DHT look-up at a time (made on the loop, when first needed)
        self._refresh: asyncio.Task | None = None  # the background look-up in flight, if any
        self._rng = random.Random()

    async def servers(self, refresh: bool = False, max_age: float | None = None) -> list[ServerInfo]:
        """The swarm's servers as last fetched from the DHT. A view older than ``update_period`` is returned
        as is while a fresh one is fetched in the background (a DHT look-up can take long when some DHT
        peers have died, and a failover must not wait for it). ``refresh`` (or no view yet) waits for a view
        whose look-up began after this call; ``max_age``: for one that began at most that many seconds ago.
        Callers that ask at once share look-ups (a swarm where many sessions look for something that is
        not there makes one look-up at a time, not one each)."""
        now = time.monotonic()
        with self._lock:
            fetched_at, began, cached = self._fetched_at, self._began, list(self._servers)
        if refresh or fetched_at == -float("inf"):
            return await self._fetch(now)
        if max_age is not None and now - began > max_age:
            return await self._fetch(now - max_age)
        stale = now - fetched_at > self.config.update_period
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self._refresh_quietly())
        return cached

    def view(self) -> list[ServerInfo]:
        """The last fetched view of the swarm, without looking anything up (empty before the first look-up)."""
        with self._lock:
            return list(self._servers)

    async def _fetch(self, since: float) -> list[ServerInfo]:
        """A view whose look-up began at ``since`` or later: the current one if so, else a new look-up."""
        if self._fetching is None:
            self._fetching = asyncio.Lock()
        async with self._fetching:  # one look-up at a time; readers of the current view never wait for it
            with self._lock:
                if self._began >= since and self._fetched_at > -float("inf"):
                    return list(self._servers)  # a look-up that began late enough ended while this one waited
            began = time.monotonic()
            servers = await self.dht.fetch_servers_async(self.prefix, self.num_blocks)
            with self._lock:
                self._servers, self._fetched_at, self._began = servers, time.monotonic(), began
        return list(servers)

    async def _refresh_quietly(self) -> None:
        try:
            await self._fetch(time.monotonic())
        except Exception:
            logger.debug("Refreshing the view of the swarm failed", exc_info=True)

    def invalidate(self) -> None:
        """Forget the fetched view of the swarm (e.g. a server no longer serves what it announced)."""
        with self._lock:
            self._fetched_at = self._began = -float("inf")

    def record_ping(self, peer_id: str, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._pings = {peer: ping for peer, ping in self._pings.items() if now - ping[1] <= PING_MEMORY}
            self._pings[peer_id] = (seconds, now)

    def pings(self) -> dict[str, float]:
        with self._lock:
            return {peer: rtt for peer, (rtt, _) in self._pings.items()}

    def stale_pings(self, peers: list[str]) -> list[str]:
        """Peers whose round trip is unknown or older than ``ping_period``."""
        now = time.monotonic()
        with self._lock:
            return [p for p in peers if p not in self._pings or now - self._pings[p][1] > self.config.ping_period]

    def ban(self, peer_id: str, reason: str = "") -> float:
        """Avoid ``peer_id`` for a while; each failure still held against it doubles the ban (see
        ``client.bans``). Returns the ban's length in seconds."""
        now = time.monotonic()
        forget = self._ban_policy.forget_after
        with self._lock:
            # records whose ban is over and whose failures are forgotten count as none (``client.bans``)
            self._bans = {p: r for p, r in self._bans.items() if r.until > now or now - r.last_failure <= forget}
            record = self._bans[peer_id] = after_failure(self._bans.get(peer_id), now, self._ban_policy)
        duration = record.until - now
        logger.warning("Banning server %s for %.0f s: %s", peer_id, duration, reason)
        return duration

    def flag(self, peer_id: str) -> None:
        """Never route through ``peer_id`` again (it answered wrongly; see ``client.verify``)."""
        with self._lock:
            self.flagged.add(peer_id)

    def mark_ok(self, peer_id: str) -> None:
        """``peer_id`` answered a call correctly: its past failures decay (see ``client.bans``)."""
        with self._lock:
            record = self._bans.get(peer_id)
            if record is None:
                return
            record = after_success(record, time.monotonic(), self._ban_policy)
            if record is None:
                del self._bans[peer_id]
            else:
                self._bans[peer_id] = record

    def banned(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            return {peer for peer, record in self._bans.items() if record.until > now}

    async def candidates(
        self,
        refresh: bool = False,
        exclude: frozenset[str] = frozenset(),
        adapter: str | None = None,
        max_age: float | None = None,
    ) -> list[ServerInfo]:
        """Servers to route through: online, not banned, flagged, blocked or ``exclude``d, allowed, and (if ``adapter``
        is given) announcing that preloaded adapter. ``refresh``, ``max_age``: as for ``servers``."""
        servers = await self.servers(refresh, max_age)
        excluded = self.banned() | set(self.config.blocked_peers) | self.flagged | exclude
        servers = usable(servers, excluded)
        if self.config.allowed_peers is not None:
            servers = [s for s in servers if s.peer_id in self.config.allowed_peers]
        if adapter is not None:
            servers = [s for s in servers if adapter in s.adapters]
        return servers

    async def chain(
        self,
        span: BlockRange | None = None,
        min_cache_tokens: int = 0,
        forward: bool = False,
        exclude: frozenset[str] = frozenset(),
        adapter: str | None = None,
    ) -> list[Hop]:
        """A chain covering ``span`` (default: the whole model) without the ``exclude``d servers, waiting up
        to ``wait_for_blocks``.

        Inference: the lowest expected latency per token (measured pings, announced throughputs,
        servers short of cache penalised). Forward and backward passes: load spread by forward throughput.
        With ``adapter``, only servers that announce that preloaded adapter.
        """
        span = span or BlockRange(0, self.num_blocks)
        deadline = time.monotonic() + self.config.wait_for_blocks
        refresh = False
        while True:
            servers = await self.candidates(refresh, exclude, adapter)
            try:
                if forward:
                    return spread_forward(servers, span, self._rng, client_pings=self.pings())
                return fastest_chain(
                    servers, span, self.pings(), min_cache_tokens=min_cache_tokens, push=self.config.push
                )
            except MissingBlocksError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MissingBlocksError(exc.blocks, f"waited {self.config.wait_for_blocks:.0f} s") from None
                self._log_waiting(exc.blocks, len(exclude))
            await asyncio.sleep(min(POLL_INTERVAL, left))  # then look again
            refresh = True

    def _log_waiting(self, blocks: list[int], excluded: int) -> None:
        known = self.view()
        logger.info(
            "Waiting for servers of blocks %s (the swarm lists %d servers: %s; banned here: %d; excluded: %d)",
            blocks,
            len(known),
            ", ".join(f"{s.peer_id[-6:]}[{s.span}] {s.state.name}" for s in known[:8]),
            len(self.banned()),
            excluded,
        )

    def server(self, peer_id: str) -> ServerInfo | None:
        """``peer_id``'s record in the last fetched view (no look-up)."""
        return next((s for s in self.view() if s.peer_id == peer_id), None)
