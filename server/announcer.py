"""Announcer: keeps this server's record fresh in the DHT, and marks it offline on the way out."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from swarm.dht import SwarmDHT
from swarm.records import ServerInfo, ServerState

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
