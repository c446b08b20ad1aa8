"""SwarmClient: the client's handle on a swarm (DHT, libp2p, routes), its inference sessions and its
stateless passes (``client.passes``)."""

from __future__ import annotations

import asyncio
import logging

import torch

from client.config import ClientConfig
from client.loop import LoopThread
from client.passes import PassRunner
from client.sequence import RouteManager
from client.session import InferenceSession
from swarm import tensors
from swarm.dht import DHTConfig, SwarmDHT
from swarm.membership import Membership, load_key
from swarm.models.adapters import LoraAdapter
from swarm.rpc import ping

logger = logging.getLogger(__name__)


class SwarmClient:
    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int):
        self.config, self.prefix, self.num_blocks = config, prefix, num_blocks
        key = load_key(config.swarm_key) if config.swarm_key else None
        self.dht = SwarmDHT(DHTConfig(initial_peers=list(config.initial_peers), client_mode=True, swarm_key=key))
        self.membership = Membership(key, self.dht.peer_id)
        self.loop = LoopThread()
        self.p2p = self.loop.run(self.dht.dht.replicate_p2p())
        self.routes = RouteManager(self.dht, prefix, num_blocks, config)
        self.passes = PassRunner(self)  # stateless forward and backward passes

    async def measure_pings(self, limit: int = 32) -> None:
        """Round trips to candidate servers whose ping is unknown or stale (concurrently, bounded)."""
        loop = asyncio.get_running_loop()
        servers = await loop.run_in_executor(None, self.routes.candidates)
        stale = self.routes.stale_pings([s.peer_id for s in servers])[:limit]
        results = await asyncio.gather(
            *(ping(self.p2p, peer, 1, 1.0, self.membership.proof_for(peer)) for peer in stale)
        )
        for peer, rtt in zip(stale, results, strict=True):
            if rtt is not None:
                self.routes.record_ping(peer, rtt)

    def server_dtype(self, peer_id: str) -> torch.dtype:
        info = self.routes.server(peer_id)
        return tensors.DTYPES.get(info.dtype, torch.float32) if info else torch.float32

    def inference_session(self, max_length: int, adapter: LoraAdapter | str | None = None) -> InferenceSession:
        return InferenceSession(self, max_length, adapter)

    def shutdown(self) -> None:
        try:
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            logger.debug("p2p shutdown failed", exc_info=True)
        self.loop.stop()
        self.dht.shutdown()
