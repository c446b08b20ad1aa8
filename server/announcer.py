"""Announcer: keeps this server's record fresh in the DHT; Pinger: measures round trips to next servers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable

from swarm.net.dht import SwarmDHT
from swarm.net.records import ServerInfo, ServerState
from swarm.net.rpc import ping
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(self, dht: SwarmDHT, prefix: str, record: Callable[[], ServerInfo], period: float, ttl: float):
        self.dht, self.prefix, self.record = dht, prefix, record
        self.period, self.ttl = period, ttl

    async def announce(self, state: ServerState | None = None, ttl: float | None = None) -> bool:
        info = self.record()
        if state is not None:
            info = dataclasses.replace(info, state=state)
        ok = await self.dht.announce(self.prefix, info, ttl or self.ttl)
        if not ok:
            logger.warning("DHT did not accept the announcement of blocks %s (%s)", info.span, info.state.name)
        return ok

    async def run(self) -> None:
        """Refresh the record every ``period`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.announce()
            except Exception:
                logger.exception("Failed to refresh the announcement; will retry")


class Pinger:
    """Measures round trips to the servers hosting the blocks right after this server's span."""

    def __init__(self, p2p, dht: SwarmDHT, prefix: str, num_blocks: int, results: dict[str, float], config, membership):
        self.p2p, self.dht, self.prefix, self.num_blocks = p2p, dht, prefix, num_blocks
        self.membership = membership
        self.results, self.period, self.max_pinged = results, config.ping_period, config.max_pinged

    async def run(self, span: Callable[[], BlockRange]) -> None:
        while True:
            try:
                await self.ping_next(span())
            except Exception:
                logger.debug("Pinging next servers failed", exc_info=True)
            await asyncio.sleep(self.period * random.uniform(0.8, 1.2))

    async def ping_next(self, span: BlockRange) -> None:
        if span.end >= self.num_blocks:
            self.results.clear()
            return
        servers = await self.dht.fetch_servers_async(self.prefix, self.num_blocks)
        following = [s.peer_id for s in servers if s.state == ServerState.ONLINE and span.end in s.span]
        following = random.sample(following, min(len(following), self.max_pinged))
        measured = {}
        for peer in following:
            rtt = await ping(self.p2p, peer, membership=self.membership.proof_for(peer))
            if rtt is not None:
                measured[peer] = rtt
        self.results.clear()
        self.results.update(measured)
