"""A wide-area link on loopback: a TCP proxy that delays every byte by a one-way latency and caps the
bandwidth of each direction, for benchmarks (``benchmarks/wan.py``).

``LinkProxy(target_port, delay, mbit)`` listens on 127.0.0.1 (a free port, ``.port``) and forwards each
connection to ``127.0.0.1:target_port``. Each direction of each connection is a queue: a chunk read at
time t leaves at ``max(t, when the link is free) + size / bandwidth + delay``, so the proxy models
serialisation at the bandwidth cap and propagation delay, in order. It runs its own event loop in a
daemon thread; ``close()`` stops it. Nothing leaves 127.0.0.1.

``Link`` and the functions after it put the servers of a ``LocalSwarm`` behind such proxies (each server
listens on a free port and announces its proxy's) and check that no traffic goes around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time

import psutil

from swarm.tools.localswarm import LocalSwarm

CHUNK = 64 << 10  # bytes read at a time


class LinkProxy:
    def __init__(self, target_port: int, delay: float, mbit: float | None = None):
        self.target_port, self.delay = target_port, delay
        self.bytes_per_second = mbit * 1e6 / 8 if mbit else None
        self.bytes = 0  # forwarded so far, both directions
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("link proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._connect, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        # close() cancels this task: end quietly (Python 3.11's start_server callback logs a cancelled task)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: read, stamp each chunk with its departure time, write in order when it is due."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer))
        free_at = 0.0  # when the link finishes sending what is queued
        try:
            while chunk := await reader.read(CHUNK):
                now = time.monotonic()
                serialise = len(chunk) / self.bytes_per_second if self.bytes_per_second else 0.0
                free_at = max(now, free_at) + serialise
                queue.put_nowait((free_at + self.delay, chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            await sender

    async def _send(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        try:
            while (item := await queue.get()) is not None:
                due, chunk = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                self.bytes += len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _shutdown(self) -> None:
        """Stop accepting, cancel every connection's tasks (closing their sockets), then stop the loop."""
        self._server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.stop()

    def close(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            self._thread.join(timeout=5)


@dataclasses.dataclass
class Link:
    """A server's proxy: the server listens on ``port`` and announces ``proxy.port``."""

    proxy: LinkProxy
    port: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_links(links: list[Link], swarm: LocalSwarm, spans: list[str], delay: float, args) -> None:
    """Start one server per span (in parallel), each behind a new proxy with ``delay``, added to ``links``
    first so that the caller closes them whatever happens."""
    specs = []
    for span in spans:
        links.append(Link(LinkProxy(port := free_port(), delay), port))
        announce = ("--port", str(port), "--announce-host", "127.0.0.1", "--announce-port", str(links[-1].proxy.port))
        specs.append((span, (*announce, "--num-threads", str(args.num_threads))))
    swarm.start(args.model, specs)


def set_links(links: list[Link], delay: float, mbit: float | None = None) -> None:
    for link in links:
        link.proxy.delay = delay
        link.proxy.bytes_per_second = mbit * 1e6 / 8 if mbit else None


def wire_bytes(links: list[Link]) -> int:
    return sum(link.proxy.bytes for link in links)


def direct_connections(links: list[Link], swarm: LocalSwarm) -> list[str]:
    """TCP connections that descendants of this process, but the bootstrap node (which has no proxy, so
    servers reach it straight from their listening port), hold to a real (unproxied) server port."""
    real, found = {link.port for link in links}, []
    bootstrap = psutil.Process(swarm.bootstrap.proc.pid)
    skip = {bootstrap.pid, *(child.pid for child in bootstrap.children(recursive=True))}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections("tcp") if proc.pid not in skip else ():
                if conn.raddr and conn.raddr.port in real:
                    found.append(f"{proc.name()}[{proc.pid}] {conn.laddr.port}->{conn.raddr.port} {conn.status}")
    return found


def check_records(model, links: list[Link]) -> str:
    """The client's view of the servers: every announced address must be a proxy port."""
    proxies = {str(link.proxy.port) for link in links}
    servers = model.client.loop.run(model.client.routes.servers(refresh=True))
    bad = [addr for info in servers for addr in info.maddrs if addr.split("/tcp/")[1].split("/")[0] not in proxies]
    return f"{len(servers)} server records, addresses outside the proxies: {bad or 'none'}"
