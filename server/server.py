"""Server lifecycle: load the span, join the swarm, serve, announce; shut down gracefully.

Concurrency: one asyncio event loop (uvloop) in the main thread runs the libp2p handlers and the
announcer; torch work runs on the backend's single worker thread; DHT calls block in the default
executor (hivemind runs the DHT node in a child process).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

import torch
from transformers import AutoConfig

from server import validation
from server.announcer import Announcer
from server.backend import Backend
from server.blocks import load_block_stack
from server.cache import CacheBudget, KVGeometry
from server.config import ServerConfig
from server.handler import Handler
from server.sessions import SessionStore
from swarm import __version__
from swarm.dht import DHTConfig, SwarmDHT
from swarm.modelpath import DEFAULT_MODEL, resolve_model
from swarm.records import ServerInfo, ServerState
from swarm.spans import model_prefix

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


class Server:
    """Create, then ``run(on_ready)``; ``stop()`` (or SIGTERM/SIGINT) ends it gracefully."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_name = config.model or DEFAULT_MODEL
        self.prefix = config.dht_prefix or model_prefix(self.model_name)
        self.dtype = resolve_dtype(config.dtype)
        self.throughput = 0.0
        self.state = ServerState.JOINING
        self._stop: asyncio.Event | None = None

    def run(self, on_ready: Callable[[Server], None] | None = None) -> None:
        import uvloop

        uvloop.run(self._main(on_ready))

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _main(self, on_ready) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)

        folder = await loop.run_in_executor(None, resolve_model, config.model)
        model_config = AutoConfig.from_pretrained(folder)
        if config.blocks.end > model_config.num_hidden_layers:
            raise ValueError(f"--blocks {config.blocks} is outside the model ({model_config.num_hidden_layers} blocks)")
        self.hidden_size = model_config.hidden_size
        logger.info("Loading blocks %s of %s (%s) from %s", config.blocks, self.model_name, self.dtype, folder)
        stack = await loop.run_in_executor(None, load_block_stack, folder, model_config, config.blocks, self.dtype)

        geometry = KVGeometry.from_config(model_config, self.dtype)
        self.budget = CacheBudget(config.cache_tokens)
        self.backend = Backend(stack, self.dtype)
        self.throughput = await self.backend.run(self.backend.measure_throughput, geometry)
        limits = validation.Limits(
            config.blocks, model_config.hidden_size, self.dtype, config.max_request_tokens, config.max_length_limit
        )
        self.store = SessionStore(self.budget, geometry, config.blocks)
        self.handler = Handler(
            self.backend, self.store, limits, lambda: self.info().to_proto(), config.session_idle_timeout
        )

        self.dht = await loop.run_in_executor(None, SwarmDHT, self._dht_config())
        # only now: a DHT process forked after this would inherit the handlers and ignore SIGTERM
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.peer_id, self.maddrs = self.dht.peer_id, self.dht.maddrs
        try:
            p2p = await self.dht.dht.replicate_p2p()
            await self.handler.register(p2p)
            self.announcer = Announcer(self.dht, self.prefix, self.info, config.announce_period, config.record_ttl)
            self.state = ServerState.ONLINE
            await self.announcer.announce()
            refresher = asyncio.create_task(self.announcer.run())
            if on_ready is not None:
                on_ready(self)
            await self._stop.wait()
            refresher.cancel()
            await self._shutdown()
        finally:
            self.backend.shutdown()
            self.dht.shutdown()

    async def _shutdown(self) -> None:
        """Announce offline first, let steps in flight finish, then stop."""
        logger.info("Shutting down: announcing offline, finishing %d steps in flight", self.backend.in_flight)
        self.state = ServerState.OFFLINE
        self.handler.draining = True
        try:
            await asyncio.wait_for(self.announcer.announce(ttl=self.config.record_ttl), self.config.shutdown_grace)
        except (TimeoutError, Exception):
            logger.warning("Could not announce offline state before shutdown")
        deadline = time.monotonic() + self.config.shutdown_grace
        while self.backend.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _dht_config(self) -> DHTConfig:
        c = self.config
        return DHTConfig(c.initial_peers, c.host, c.port, False, c.identity_path, c.announce_host)

    def info(self) -> ServerInfo:
        return ServerInfo(
            peer_id=self.peer_id,
            state=self.state,
            span=self.config.blocks,
            throughput=self.throughput,
            dtype=str(self.dtype).removeprefix("torch."),
            cache_tokens_left=self.budget.tokens_left,
            version=__version__,
            public_name=self.config.public_name,
            model=self.model_name,
            maddrs=tuple(self.maddrs),
            hidden_size=self.hidden_size,
            max_request_tokens=self.config.max_request_tokens,
        )
