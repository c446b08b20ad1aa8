"""Server lifecycle: join the swarm, pick and load a span, serve, announce, rebalance; stop gracefully.

Concurrency: one asyncio event loop (uvloop) in the main thread runs the libp2p handlers, the
announcer, the pinger and the rebalancer; torch work runs on each span's single compute thread;
DHT calls are awaited as futures (the DHT node runs on its own loop thread, see ``swarm.net.dht``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
from collections.abc import Callable

import torch

from server import throughput
from server.announcer import Announcer, Pinger
from server.config import ServerConfig
from server.gate import Gate
from server.handler import Handler
from server.ledger import Ledger
from server.push import Pusher
from server.serving import Serving
from swarm import __version__
from swarm.core.blocks import load_block_stack
from swarm.core.cache import CacheBudget, KVGeometry
from swarm.models.families import family_for, load_config
from swarm.models.modelpath import DEFAULT_MODEL, default_cache_dir, resolve_model
from swarm.net import control, tensors
from swarm.net.dht import DHTConfig, SwarmDHT
from swarm.net.membership import Membership, load_key
from swarm.net.records import PeerUsage, ServerInfo, ServerState
from swarm.routing.selection import choose_span, should_move
from swarm.spans import BlockRange, model_prefix

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


class Server:
    """Create, then ``run(on_ready)``; ``stop()`` (or SIGTERM/SIGINT) ends it gracefully. ``on_listening`` is
    called once its DHT node listens (before the weights load), ``on_ready`` once it serves."""

    def __init__(self, config: ServerConfig):
        if (config.blocks is None) == (config.num_blocks is None):
            raise ValueError("give exactly one of --blocks and --num-blocks")
        self.config = config
        self.model_name = config.model or DEFAULT_MODEL
        self.prefix = config.dht_prefix or model_prefix(self.model_name)
        self.dtype = resolve_dtype(config.dtype)
        self.swarm_key = load_key(config.swarm_key) if config.swarm_key else None
        self.speed = throughput.Throughput(0.0, 0.0)
        self.state = ServerState.JOINING
        self.serving: Serving | None = None
        self.pusher: Pusher | None = None
        self._p2p = None  # the handle the RPC handlers are registered on (set with them)
        self.span: BlockRange | None = config.blocks
        self.next_pings: dict[str, float] = {}
        self._stop: asyncio.Event | None = None
        self.on_move: Callable[[Server], None] | None = None

    def run(
        self,
        on_ready: Callable[[Server], None] | None = None,
        on_listening: Callable[[Server], None] | None = None,
    ) -> None:
        import uvloop

        uvloop.run(self._main(on_ready, on_listening))

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _main(self, on_ready, on_listening) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.folder = await loop.run_in_executor(None, resolve_model, config.model)
        self.model_config = load_config(self.folder)
        family_for(self.model_config)  # an unsupported family fails here, before joining the swarm
        self.num_blocks = self.model_config.num_hidden_layers
        if config.blocks is not None and config.blocks.end > self.num_blocks:
            raise ValueError(f"--blocks {config.blocks} is outside the model ({self.num_blocks} blocks)")
        self.budget = CacheBudget(config.cache_tokens)

        self.dht = await loop.run_in_executor(None, SwarmDHT, self._dht_config())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._log_sizes)
        self.peer_id, self.maddrs = self.dht.peer_id, self.dht.maddrs
        if on_listening is not None:
            on_listening(self)
        self.ledger = Ledger(self.peer_id)
        self.announcer = Announcer(self.dht, self.prefix, self.info, config.announce_period, config.record_ttl)
        tasks: list[asyncio.Task] = []
        try:
            self.span = self.span or await self._choose_span()
            await self.announcer.announce()  # JOINING: others choosing spans count us in
            self.serving = await self._load(self.span)
            p2p = self._p2p = await self.dht.replicate_p2p()
            self.handler = Handler(lambda: self.serving, lambda: self.info().to_proto(), config)
            self.membership = Membership(self.swarm_key, self.peer_id)
            self.handler.gate = Gate(self.swarm_key, self.peer_id)
            self.handler.ledger = self.ledger
            self.pusher = Pusher(p2p, drop_all=config.test_drop_pushes, membership=self.membership)
            await self.handler.register(p2p, self.pusher)
            self.state = ServerState.ONLINE
            await self.announcer.announce()
            pinger = Pinger(p2p, self.dht, self.prefix, self.num_blocks, self.next_pings, config, self.membership)
            tasks = [
                asyncio.create_task(self.announcer.run()),
                asyncio.create_task(pinger.run(lambda: self.span)),
                asyncio.create_task(self._refresh_standings_forever()),
            ]
            if config.num_blocks is not None:
                tasks.append(asyncio.create_task(self._rebalance_forever()))
            if on_ready is not None:
                on_ready(self)
            await self._stop.wait()
            await self._shutdown()
        finally:
            for task in tasks:
                task.cancel()
            if self.serving is not None:
                self.serving.scheduler.shutdown()
            self.dht.shutdown()

    async def _load(self, span: BlockRange) -> Serving:
        loop = asyncio.get_running_loop()
        logger.info("Loading blocks %s of %s (%s) from %s", span, self.model_name, self.dtype, self.folder)
        stack = await loop.run_in_executor(None, load_block_stack, self.folder, self.model_config, span, self.dtype)
        serving = Serving.build(stack, self.config, self.model_config, self.dtype, self.budget)
        cache_file = self.config.throughput_cache or default_cache_dir() / "throughput.json"
        key = throughput.cache_key(str(self.folder), self.dtype, self.model_config.to_json_string(use_diff=False))
        geometry = KVGeometry.from_config(self.model_config, self.dtype)
        await loop.run_in_executor(None, throughput.warm_up, stack, geometry, self.dtype)
        self.speed = await loop.run_in_executor(
            None, throughput.cached_measure, stack, geometry, self.dtype, key, cache_file, self.config.test_step_delay
        )
        return serving

    async def _choose_span(self) -> BlockRange:
        servers = await self.dht.fetch_servers_async(self.prefix, self.num_blocks)
        servers = [s for s in servers if s.peer_id != self.peer_id]
        span = choose_span(servers, self.num_blocks, self.config.num_blocks, self.speed.inference or 1.0)
        logger.info("Chose blocks %s (the weakest part of the swarm)", span)
        return span

    async def _rebalance_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.rebalance_period * random.uniform(0.5, 1.5))
            try:
                servers = await self.dht.fetch_servers_async(self.prefix, self.num_blocks)
                servers = [s for s in servers if s.peer_id != self.peer_id] + [self.info()]
                target = should_move(servers, self.peer_id, self.num_blocks, self.config.balance_quality)
                if target is None:
                    continue
                # others may be deciding the same right now: wait a random beat, look again, then go
                await asyncio.sleep(random.uniform(0, min(2.0, self.config.rebalance_period)))
                servers = await self.dht.fetch_servers_async(self.prefix, self.num_blocks)
                servers = [s for s in servers if s.peer_id != self.peer_id] + [self.info()]
                if should_move(servers, self.peer_id, self.num_blocks, self.config.balance_quality) == target:
                    await self._move(target)
            except Exception:
                logger.exception("Rebalancing check failed; will retry")

    async def _move(self, target: BlockRange) -> None:
        """Announce the new span, load it, switch new work to it, then retire the old span."""
        old, self.span = self.serving, target
        logger.info("Moving from blocks %s to %s to balance the swarm", old.span, target)
        self.state = ServerState.JOINING
        await self.announcer.announce()
        self.serving = await self._load(target)
        self.state = ServerState.ONLINE
        await self.announcer.announce()
        if self.on_move is not None:
            self.on_move(self)
        await old.retire(self.config.move_grace)
        logger.info("Now serving blocks %s", target)

    async def _shutdown(self) -> None:
        """Tell clients to move and announce offline, serve open sessions until they have moved (at most
        ``shutdown_grace`` seconds), let steps in flight finish, then stop."""
        serving = self.serving
        logger.info("Shutting down: announcing offline, moving %d sessions elsewhere", len(serving.store))
        self.state = ServerState.OFFLINE
        serving.leaving = True
        try:
            await asyncio.wait_for(self.announcer.announce(), self.config.shutdown_grace)
        except (TimeoutError, Exception):
            logger.warning("Could not announce offline state before shutdown")
        await serving.wind_down(self.config.shutdown_grace)

    def _dht_config(self) -> DHTConfig:
        c = self.config
        return DHTConfig(
            initial_peers=c.initial_peers,
            host=c.host,
            port=c.port,
            identity_path=c.identity_path,
            announce_host=c.announce_host,
            swarm_key=self.swarm_key,
            nat_traversal=c.nat_traversal,
            auto_relay=c.auto_relay,
            announce_port=c.announce_port,
        )

    async def _refresh_standings_forever(self) -> None:
        """Keep the points every server announces at hand: they order this server's queue when it is busy."""
        while True:
            try:
                servers = await self.dht.fetch_servers_async(self.prefix, self.num_blocks)
                standings = {server.peer_id: server.points for server in servers if server.points > 0}
                self.ledger.update_standings(standings)
                logger.debug("Standings: %s", standings)
            except Exception:
                logger.debug("Could not refresh the servers' points", exc_info=True)
            await asyncio.sleep(self.config.announce_period * random.uniform(0.8, 1.2))

    def sizes(self) -> dict[str, int]:
        """Entries of the server's long-lived structures. None grows with the sessions, steps, peers or receipts
        served: each is bounded (by count or age) where it is declared."""
        serving = self.serving
        sizes = {"store_sessions": len(serving.store), "next_pings": len(self.next_pings), **serving.scheduler.sizes()}
        sizes |= control.sizes(self._p2p)
        return sizes | self.handler.sizes() | self.pusher.sizes() | self.ledger.sizes()

    def _log_sizes(self) -> None:
        """``kill -USR1 <pid>``: one line with ``sizes()`` (soak benchmarks and tests read it)."""
        started = self.pusher is not None  # set last of what ``sizes`` reads
        logger.info("Structure sizes: %s", json.dumps(self.sizes() if started else {}, sort_keys=True))

    def info(self) -> ServerInfo:
        return ServerInfo(
            peer_id=self.peer_id,
            state=self.state,
            span=self.span,
            throughput=self.speed.inference,
            forward_throughput=self.speed.forward,
            dtype=str(self.dtype).removeprefix("torch."),
            cache_tokens_left=self.budget.tokens_left,
            version=__version__,
            public_name=self.config.public_name,
            model=self.model_name,
            maddrs=tuple(self.maddrs),
            hidden_size=self.model_config.hidden_size,
            max_request_tokens=self.config.max_request_tokens,
            next_pings=dict(self.next_pings),
            points=self.ledger.points,
            compressions=tuple(tensors.COMPRESSIONS.values()),
            adapters=tuple(self.config.adapters),
            fair_share=self.config.fair_share,
            usage=tuple(PeerUsage(**row) for row in self.serving.scheduler.usage()) if self.serving else (),
        )
