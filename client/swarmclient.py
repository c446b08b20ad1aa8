"""SwarmClient: the client's handle on a swarm (DHT, libp2p, routes), its inference sessions and its
stateless passes (``client.passes``).

A client not shut down by its user is shut down when the interpreter exits (``atexit``), before Python
tears down the modules its loop threads still run in (a script that dropped its models without
``shutdown()`` could otherwise crash at exit, and its daemons outlive it).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading

import torch

from client.config import ClientConfig
from client.loop import LoopThread
from client.passes import PassRunner
from client.points import ReceiptBook, VoucherSource
from client.private import LocalBlocks
from client.referee import LocalReferee
from client.sequence import RouteManager
from client.session import InferenceSession
from client.verdicts import VerifyStats
from proto import pb
from swarm.models.adapters import LoraAdapter
from swarm.net import tensors
from swarm.net.dht import DHTConfig, SwarmDHT
from swarm.net.membership import Membership, load_key
from swarm.net.rpc import ping
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

PING_TIMEOUT = 1.0  # seconds a routing ping may take (a far server answers in its round trip)
RECEIPT_FLUSH_SECONDS = 3.0  # at shutdown: how long to spend handing out the last receipts


_OPEN: set[SwarmClient] = set()  # clients not shut down yet (bounded by the clients a process opens)
_OPEN_LOCK = threading.Lock()


@atexit.register
def _shut_down_open_clients() -> None:
    """All at once: each may wait seconds for servers that are gone (receipts, daemon)."""
    with _OPEN_LOCK:
        clients = list(_OPEN)
    threads = [threading.Thread(target=client.shutdown, name="stamen-exit") for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class SwarmClient:
    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int):
        self.config, self.prefix, self.num_blocks = config, prefix, num_blocks
        if config.compression not in tensors.COMPRESSIONS:
            raise ValueError(
                f"compression must be one of {', '.join(tensors.COMPRESSIONS)}, got {config.compression!r}"
            )
        key = load_key(config.swarm_key) if config.swarm_key else None
        dht_config = DHTConfig(
            initial_peers=list(config.initial_peers),
            client_mode=True,
            swarm_key=key,
            nat_traversal=config.nat_traversal,
        )
        self.dht = SwarmDHT(dht_config)
        self.membership = Membership(key, self.dht.peer_id)
        self.loop = LoopThread()
        self.p2p = self.loop.run(self.dht.replicate_p2p())
        self.routes = RouteManager(self.dht, prefix, num_blocks, config)
        self.receipts = ReceiptBook(self.dht.identity)  # points: the work servers did for us, acknowledged
        self.vouchers = VoucherSource(config.points_key, self.dht.peer_id)
        self.verification = VerifyStats()  # what the sessions' verifiers checked and found (``client.verify``)
        self.referee: LocalReferee | None = None  # the client's own computation of disputed spans, if it can
        self.local: LocalBlocks | None = None  # private mode: the blocks the client computes itself
        self.passes = PassRunner(self)  # stateless forward and backward passes
        self._receipting = self.loop.run(self._start_receipting())
        with _OPEN_LOCK:
            _OPEN.add(self)

    async def _start_receipting(self) -> asyncio.Task:
        return asyncio.ensure_future(self._receipt_forever())

    async def _receipt_forever(self) -> None:
        """Hand the servers signed receipts for their work every ``receipt_period`` seconds."""
        while True:
            await asyncio.sleep(self.config.receipt_period)
            try:
                await self.receipts.send_due(self.p2p, self.membership)
            except Exception:
                logger.debug("Handing out receipts failed", exc_info=True)

    async def measure_pings(self, span: BlockRange | None = None, limit: int = 32) -> None:
        """Round trips to candidate servers (of ``span``'s blocks, if given) whose ping is unknown or stale,
        concurrently and bounded: a server that does not answer within PING_TIMEOUT is left unmeasured."""
        servers = await self.routes.candidates()
        if span is not None:
            servers = [s for s in servers if s.span.start < span.end and span.start < s.span.end]
        stale = self.routes.stale_pings([s.peer_id for s in servers])[:limit]
        results = await asyncio.gather(
            *(ping(self.p2p, peer, 1, PING_TIMEOUT, self.membership.proof_for(peer)) for peer in stale)
        )
        for peer, rtt in zip(stale, results, strict=True):
            if rtt is not None:
                self.routes.record_ping(peer, rtt)

    def server_dtype(self, peer_id: str) -> torch.dtype:
        info = self.routes.server(peer_id)
        return tensors.DTYPES.get(info.dtype, torch.float32) if info else torch.float32

    def compression_for(self, peer_id: str) -> int:
        """The activation compression to use with a server: the configured one if the server supports it."""
        wanted = tensors.COMPRESSIONS[self.config.compression]
        info = self.routes.server(peer_id)
        return wanted if info is not None and wanted in info.compressions else pb.COMPRESSION_NONE

    def inference_session(self, max_length: int, adapter: LoraAdapter | str | None = None) -> InferenceSession:
        return InferenceSession(self, max_length, adapter)

    async def _stop_receipting(self) -> None:
        self._receipting.cancel()
        await asyncio.wait_for(self.receipts.send_due(self.p2p, self.membership), RECEIPT_FLUSH_SECONDS)

    def shutdown(self) -> None:
        """Hand out the last receipts, then stop the libp2p handle, the loop and the DHT. Idempotent."""
        with _OPEN_LOCK:
            if self not in _OPEN:
                return
            _OPEN.discard(self)
        try:
            self.loop.run(self._stop_receipting(), timeout=RECEIPT_FLUSH_SECONDS + 1)
        except Exception:
            logger.debug("Final receipts not handed out", exc_info=True)
        try:
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            logger.debug("p2p shutdown failed", exc_info=True)
        self.loop.stop()
        self.dht.shutdown()
