"""A small typed wrapper over hivemind's DHT: start/join a swarm, announce and fetch server records.

The DHT node runs in this process, on its own event loop in a daemon thread (``SwarmDHT``), beside
the libp2p daemon (p2pd) it starts, which ends when that thread does (``swarm.net.lifetime``). Blocking
calls (``fetch_servers``, ``.result()``) wait for that loop; async code awaits the returned futures instead.
``p2p_options`` decides, as a pure function of the config, which NAT-traversal features the daemon runs:
none on a loopback address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
import pathlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from swarm.errors import StamenError
from swarm.net.control import harden
from swarm.net.identity import Identity
from swarm.net.lifetime import daemons_end_with_parent
from swarm.net.membership import SwarmKeyAuthorizer
from swarm.net.records import ServerInfo, signed_record
from swarm.spans import block_key

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class DHTConfig:
    """How a node joins the swarm."""

    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any swarm member; empty = new swarm
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0 for all)
    port: int = 0  # TCP port; 0 picks a free one
    client_mode: bool = False  # True: reach others but accept no DHT requests (clients, status)
    identity_path: str | None = None  # private key file for a fixed peer id (bootstrap nodes)
    announce_host: str | None = None  # public address to advertise instead of the listening one
    swarm_key: bytes | None = None  # private swarm: only nodes holding this key can use its DHT
    announce_port: int | None = None  # port to advertise with announce_host; None = the listening port
    # NAT traversal: None = on unless ``host`` is a loopback address (see ``p2p_options``)
    nat_traversal: bool | None = None
    auto_relay: bool = False  # behind NAT: become reachable through relays (needs NAT traversal on)


NAT_CHOICES = {"auto": None, "on": True, "off": False}  # --nat-traversal values -> DHTConfig.nat_traversal


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def p2p_options(config: DHTConfig) -> dict[str, bool]:
    """The libp2p daemon's NAT-traversal switches for ``config`` (hivemind turns most on by default).

    NAT traversal on means: UPnP / NAT-PMP port mapping and AutoNAT (nodes that accept connections
    only), and circuit relays to reach peers behind NAT. A node listening on a loopback address runs
    none of it unless it is a client that asked for relays (``client_mode`` and ``nat_traversal=True``),
    so it opens no socket on any other address. Raises ValueError for contradictory settings.
    """
    loopback = is_loopback(config.host)
    enabled = (not loopback) if config.nat_traversal is None else config.nat_traversal
    if enabled and loopback and not config.client_mode:
        raise ValueError(f"NAT traversal needs a non-loopback --host (a node on {config.host} stays on loopback)")
    if config.auto_relay and (not enabled or config.client_mode):
        raise ValueError("auto relay needs NAT traversal on, and a node that accepts connections")
    listening = enabled and not config.client_mode
    return {
        "nat_port_map": listening,  # UPnP / NAT-PMP: ask the router to forward a port (UDP multicast)
        "auto_nat": listening,  # AutoNAT: ask peers to dial back to learn if we are reachable
        "use_relay": enabled,  # circuit relay: reach peers behind NAT through relays
        "use_auto_relay": config.auto_relay,  # become reachable through relays ourselves
    }


def add_nat_arguments(parser, listening: bool = True) -> None:
    """Add --nat-traversal (and, for nodes that accept connections, --auto-relay) to an argparse parser."""
    if listening:
        help_text = "port mapping (UPnP/NAT-PMP), AutoNAT and relays; auto = on unless --host is loopback"
    else:
        help_text = "reach servers behind NAT through relays (default auto: off, this node listens on loopback)"
    parser.add_argument("--nat-traversal", choices=list(NAT_CHOICES), default="auto", help=help_text)
    if listening:
        parser.add_argument(
            "--auto-relay", action="store_true", help="behind NAT without port forwarding: be reachable via relays"
        )


EXPIRY_SLACK = 1.0  # seconds of rounding allowed between a record's signed expiry and the DHT's


class SignedRecordValidator(RecordValidatorBase):
    """Runs in every node's DHT, on every store it is asked to make and every value it receives: a
    value stored under a peer id (as servers store their records) must be that peer's own signed record,
    kept no longer than it signed for. So no one can overwrite, fake or prolong another server's record."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
        except Exception:
            return False
        if not isinstance(subkey, str) or not subkey.startswith(("Qm", "12D3")):
            return True  # not a server record: no rule of ours applies
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return False
        info = signed_record(value)
        return info is not None and info.peer_id == subkey and record.expiration_time <= info.expires_at + EXPIRY_SLACK


class SwarmJoinError(StamenError):
    """No initial peer let this node in: unreachable, or a private swarm we are not a member of."""


class DHTFuture(concurrent.futures.Future):
    """A DHT call's result: ``.result(timeout)`` from any thread, or ``await`` it in any event loop."""

    def __await__(self):
        return asyncio.wrap_future(self).__await__()


class SwarmDHT:
    """Handle to a running DHT node.

    The node (hivemind's ``DHTNode``) runs in this process, on an event loop of its own in a daemon
    thread, beside the libp2p daemon it starts; no second Python process. Methods are thread-safe.
    """

    def __init__(self, config: DHTConfig):
        self.config = config
        self.identity = Identity.load_or_create(config.identity_path)  # signs this node's announcements
        daemons_end_with_parent()  # the daemon is started on the loop thread: it ends when that thread does
        self._loop, self._thread = _start_loop_thread()
        try:
            self.node = self._submit(_create_node(config, str(self.identity.path))).result()
        except BaseException as exc:
            self._stop_loop()
            if isinstance(exc, RuntimeError) and config.initial_peers:
                raise _join_error(config) from exc
            raise
        finally:
            if config.identity_path is None:  # a throwaway identity: the daemon has read it
                self.identity.path.unlink(missing_ok=True)
        # full multiaddrs (with /p2p/<peer id>) that others can use as initial peers
        self.maddrs = [str(addr) for addr in self._submit(self.node.p2p.get_visible_maddrs()).result()]

    @property
    def peer_id(self) -> str:
        return self.node.peer_id.to_base58()

    def run_coroutine(self, function: Callable[..., Awaitable[T]], *args, **kwargs) -> DHTFuture:
        """Run ``function(node, *args, **kwargs)`` on the DHT's event loop; returns its future."""
        return self._submit(function(self.node, *args, **kwargs))

    async def replicate_p2p(self) -> P2P:
        """A libp2p handle for the caller's event loop, sharing this node's daemon (and its peer id)."""
        return harden(await P2P.replicate(self.node.p2p.daemon_listen_maddr))

    def announce(self, prefix: str, info: ServerInfo, ttl: float) -> DHTFuture:
        """Store ``info`` under the key of every block it hosts, expiring after ``ttl`` seconds.

        Returns a future (``.result()`` to block, ``await`` in async code) that says if the DHT took it.
        """
        keys = [block_key(prefix, block) for block in range(info.span.start, info.span.end)]
        now = get_dht_time()
        info = dataclasses.replace(info, announced_at=now, expires_at=now + ttl).signed(self.identity)
        return self.run_coroutine(
            store_records, keys=keys, subkey=info.peer_id, value=info.to_bytes(), ttl=ttl, expiration=info.expires_at
        )

    def fetch_servers(self, prefix: str, num_blocks: int) -> list[ServerInfo]:
        """Every well-formed record announced for blocks 0..num_blocks-1, one per peer (freshest kept)."""
        keys = [block_key(prefix, block) for block in range(num_blocks)]
        return parse_records(prefix, num_blocks, self.run_coroutine(get_records, keys=keys).result())

    async def fetch_servers_async(self, prefix: str, num_blocks: int) -> list[ServerInfo]:
        """``fetch_servers`` for async code: waits without blocking the event loop."""
        keys = [block_key(prefix, block) for block in range(num_blocks)]
        return parse_records(prefix, num_blocks, await self.run_coroutine(get_records, keys=keys))

    def shutdown(self) -> None:
        """Stop the node and its libp2p daemon, then the loop thread. Idempotent."""
        if self._loop.is_closed() or not self._loop.is_running():
            return
        try:
            self._submit(_stop_node(self.node)).result(timeout=SHUTDOWN_TIMEOUT)
        except Exception:
            logger.warning("The DHT node did not stop cleanly", exc_info=True)
        finally:
            self._stop_loop()

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> DHTFuture:
        future = DHTFuture()
        inner = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        future.add_done_callback(lambda outer: inner.cancel() if outer.cancelled() else None)
        inner.add_done_callback(partial(_copy_outcome, future))
        return future

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=SHUTDOWN_TIMEOUT)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()


SHUTDOWN_TIMEOUT = 5.0  # seconds to wait for the node and its daemon to stop


def _start_loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    import uvloop

    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="stamen-dht", daemon=True)
    thread.start()
    return loop, thread


async def _stop_node(node: DHTNode) -> None:
    """Stop the node, then its daemon, then whatever background tasks hivemind left on the loop."""
    try:
        await asyncio.wait_for(node.shutdown(), SHUTDOWN_TIMEOUT / 2)
    finally:
        await node.p2p.shutdown()  # the node does not own the daemon: we started it
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=1.0)


def _copy_outcome(target: concurrent.futures.Future, source: concurrent.futures.Future) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


def _join_error(config: DHTConfig) -> SwarmJoinError:
    hint = (
        "this swarm may be private and your swarm key wrong"
        if config.swarm_key
        else "if the swarm is private, pass its --swarm-key"
    )
    return SwarmJoinError(
        f"could not join the swarm: none of the initial peers answered as a member ({hint}); "
        f"peers tried: {', '.join(config.initial_peers)}"
    )


async def _create_node(config: DHTConfig, identity_path: str) -> DHTNode:
    """Start the libp2p daemon with ``p2p_options`` and a DHT node on it (runs on the DHT loop)."""
    options = p2p_options(config)
    if config.identity_path is not None and config.initial_peers:
        if await _identity_taken(identity_path, config, options):
            raise P2PDaemonError(f"identity {config.identity_path} is in use by another peer of the swarm")
    announce = f"/ip4/{config.announce_host}/tcp/{config.announce_port or config.port}"
    p2p = await P2P.create(
        initial_peers=list(config.initial_peers),
        host_maddrs=[f"/ip4/{config.host}/tcp/{config.port}"],
        announce_maddrs=[announce] if config.announce_host else None,
        identity_path=identity_path,
        check_if_identity_free=False,  # checked above, with our options
        dht_mode="client" if config.client_mode else "server",
        **options,
    )
    harden(p2p)  # the DHT's own RPCs are unary calls with timeouts too
    try:
        return await DHTNode.create(
            p2p=p2p,
            initial_peers=list(config.initial_peers),
            client_mode=config.client_mode,
            record_validator=CompositeValidator([SignedRecordValidator()]),
            authorizer=SwarmKeyAuthorizer(config.swarm_key) if config.swarm_key is not None else None,
        )
    except BaseException:
        await p2p.shutdown()
        raise


async def _identity_taken(identity_path: str, config: DHTConfig, options: dict[str, Any]) -> bool:
    """Whether a peer with this identity is already reachable through the initial peers.

    hivemind's own check probes with NAT traversal on whatever the options; this one uses ours.
    """
    peer_id = PeerID.from_identity(pathlib.Path(identity_path).read_bytes())
    probe = await P2P.create(
        initial_peers=list(config.initial_peers),
        host_maddrs=[f"/ip4/{config.host}/tcp/0"],
        dht_mode="client",
        **options,
    )
    try:
        await probe._client.connect(peer_id, [])  # hivemind has no public call for a bare connect
        return True
    except P2PDaemonError:
        return False
    finally:
        await probe.shutdown()


def parse_records(prefix: str, num_blocks: int, raw: dict[str, dict[str, tuple[bytes, float]]]) -> list[ServerInfo]:
    """Turn raw DHT values into records; drop anything malformed, stored under the wrong key or subkey,
    or not signed by the key of the peer it names.

    A peer may have records under several keys (after it moved to another span, the old ones linger
    until they expire): its newest announcement wins, then the latest expiration.
    """
    best: dict[str, tuple[tuple[float, float], ServerInfo]] = {}
    for block in range(num_blocks):
        for subkey, (value, expiration) in raw.get(block_key(prefix, block), {}).items():
            info = signed_record(value)  # None if malformed or forged
            if info is None or info.peer_id != subkey or block not in info.span or info.span.end > num_blocks:
                continue
            if expiration > info.expires_at + EXPIRY_SLACK:  # replayed for longer than signed for
                continue
            rank = (info.announced_at, expiration)
            if info.peer_id not in best or best[info.peer_id][0] < rank:
                best[info.peer_id] = (rank, info)
    return [info for _, info in best.values()]


async def store_records(
    node: DHTNode, keys: list[str], subkey: str, value: bytes, ttl: float, expiration: float | None = None
) -> bool:
    expiration = expiration or get_dht_time() + ttl
    results = await node.store_many(keys, [value] * len(keys), expiration, subkeys=[subkey] * len(keys))
    return all(results.values())


async def get_records(node: DHTNode, keys: list[str]) -> dict[str, dict[str, tuple[bytes, float]]]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    result: dict[str, dict[str, tuple[bytes, float]]] = {}
    for key, entry in found.items():
        if entry is None or not hasattr(entry.value, "items"):
            continue
        result[key] = {
            str(subkey): (item.value, item.expiration_time)
            for subkey, item in entry.value.items()
            if isinstance(item.value, bytes)
        }
    return result
