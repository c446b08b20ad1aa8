"""The monitor's web server: polls the DHT for each watched model and serves the page and its JSON.

Concurrency: one asyncio loop (the main thread) runs aiohttp and the poller; DHT look-ups are awaited
on the DHT's own loop thread (``swarm.net.dht``). The page polls ``/api/v1/state`` by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from swarm.net.dht import SwarmDHT
from swarm.tools.status import build_report

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class WatchedModel:
    name: str  # model name or folder, as given
    prefix: str  # its DHT key prefix
    num_blocks: int


@dataclass
class Snapshot:
    report: dict[str, Any] | None = None  # ``swarm.tools.status.build_report`` of the latest look-up
    updated_at: float | None = None  # unix time of that look-up
    error: str | None = None  # why the latest look-up failed, if it did
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Monitor:
    """Keeps a fresh ``build_report`` per watched model, looked up every ``refresh`` seconds."""

    def __init__(self, dht: SwarmDHT, models: list[WatchedModel], refresh: float):
        self.dht, self.models, self.refresh = dht, models, refresh
        self.snapshots = {model.prefix: Snapshot() for model in models}

    async def update(self, model: WatchedModel) -> None:
        snapshot = self.snapshots[model.prefix]
        async with snapshot.lock:
            try:
                servers = await self.dht.fetch_servers_async(model.prefix, model.num_blocks)
                snapshot.report, snapshot.error = build_report(servers, model.num_blocks), None
            except Exception as exc:  # keep serving the last good report, and say why it is stale
                logger.warning("Looking up %s failed: %s", model.prefix, exc)
                snapshot.error = f"{type(exc).__name__}: {exc}"
            snapshot.updated_at = time.time()

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self.update(model) for model in self.models))
            await asyncio.sleep(self.refresh)

    def model(self, prefix: str | None) -> WatchedModel | None:
        if prefix is None:
            return self.models[0]
        return next((model for model in self.models if model.prefix == prefix), None)


def build_app(monitor: Monitor) -> web.Application:
    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def models(request: web.Request) -> web.Response:
        rows = []
        for model in monitor.models:
            snapshot = monitor.snapshots[model.prefix]
            rows.append(
                {
                    "model": model.name,
                    "prefix": model.prefix,
                    "num_blocks": model.num_blocks,
                    "updated_at": snapshot.updated_at,
                    "error": snapshot.error,
                }
            )
        return web.json_response({"models": rows, "refresh": monitor.refresh})

    async def state(request: web.Request) -> web.Response:
        """The same JSON as ``python -m swarm status --json`` for ``?model=<prefix>`` (default: the first)."""
        model = monitor.model(request.query.get("model"))
        if model is None:
            raise web.HTTPNotFound(text=f"not watching a model with prefix {request.query.get('model')!r}")
        snapshot = monitor.snapshots[model.prefix]
        if snapshot.report is None:
            raise web.HTTPServiceUnavailable(text=snapshot.error or "no look-up finished yet")
        return web.json_response(snapshot.report, headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/v1/models", models)
    app.router.add_get("/api/v1/state", state)
    app.router.add_static("/static/", STATIC)
    return app


async def serve(monitor: Monitor, host: str, port: int, stop: asyncio.Event) -> None:
    """Look up every model once, serve until ``stop`` is set, printing the address once listening."""
    await asyncio.gather(*(monitor.update(model) for model in monitor.models))
    runner = web.AppRunner(build_app(monitor), access_log=None)
    await runner.setup()
    poller = asyncio.create_task(monitor.run())
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        print(f"Serving the monitor on http://{_url_host(bound_host)}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        poller.cancel()
        await runner.cleanup()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
