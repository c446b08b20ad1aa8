"""A small typed wrapper over hivemind's DHT: start/join a swarm, announce and fetch server records.

hivemind runs the DHT node in a child process; calls here block the caller until that process
answers, so async code must run them in an executor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from functools import partial

import hivemind
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from swarm.errors import StamenError
from swarm.identity import Identity
from swarm.membership import SwarmKeyAuthorizer
from swarm.records import ServerInfo
from swarm.spans import block_key

logger = logging.getLogger(__name__)


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
        info = ServerInfo.from_bytes(value)
        return (
            info is not None
            and info.peer_id == subkey
            and info.verified()
            and record.expiration_time <= info.expires_at + EXPIRY_SLACK
        )


class SwarmJoinError(StamenError):
    """No initial peer let this node in: unreachable, or a private swarm we are not a member of."""


class SwarmDHT:
    """Handle to a running hivemind DHT node."""

    def __init__(self, config: DHTConfig):
        self.identity = Identity.load_or_create(config.identity_path)  # signs this node's announcements
        # a fresh throwaway identity cannot be in use elsewhere: skip hivemind's probe for that (~0.5 s)
        kwargs = {
            "identity_path": str(self.identity.path),
            "check_if_identity_free": config.identity_path is not None,
            "record_validators": [SignedRecordValidator()],
        }
        if config.swarm_key is not None:
            kwargs["authorizer"] = SwarmKeyAuthorizer(config.swarm_key)
        if config.announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{config.announce_host}/tcp/{config.port}"]
        self.config = config
        try:
            self.dht = hivemind.DHT(
                start=True,
                initial_peers=list(config.initial_peers),
                host_maddrs=[f"/ip4/{config.host}/tcp/{config.port}"],
                client_mode=config.client_mode,
                **kwargs,
            )
        except RuntimeError as exc:
            if not config.initial_peers:
                raise
            hint = (
                "this swarm may be private and your swarm key wrong"
                if config.swarm_key
                else "if the swarm is private, pass its --swarm-key"
            )
            raise SwarmJoinError(
                f"could not join the swarm: none of the initial peers answered as a member ({hint}); "
                f"peers tried: {', '.join(config.initial_peers)}"
            ) from exc
        if config.identity_path is None:  # a throwaway identity: the daemon has read it
            self.identity.path.unlink(missing_ok=True)
        # hivemind's DHT process outlives a SIGKILLed parent; make it follow its parent out
        self.dht.run_coroutine(partial(_exit_with_parent, parent_pid=os.getpid()), return_future=True)

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    @property
    def maddrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<peer id>) that others can use as initial peers."""
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    def announce(self, prefix: str, info: ServerInfo, ttl: float):
        """Store ``info`` under the key of every block it hosts, expiring after ``ttl`` seconds.

        Returns a future (``.result()`` to block, ``await`` in async code) that says if the DHT took it.
        """
        keys = [block_key(prefix, block) for block in range(info.span.start, info.span.end)]
        now = get_dht_time()
        info = dataclasses.replace(info, announced_at=now, expires_at=now + ttl).signed(self.identity)
        coroutine = partial(
            _store_records, keys=keys, subkey=info.peer_id, value=info.to_bytes(), ttl=ttl, expiration=info.expires_at
        )
        return self.dht.run_coroutine(coroutine, return_future=True)

    def fetch_servers(self, prefix: str, num_blocks: int) -> list[ServerInfo]:
        """Every well-formed record announced for blocks 0..num_blocks-1, one per peer (freshest kept)."""
        keys = [block_key(prefix, block) for block in range(num_blocks)]
        raw = self.dht.run_coroutine(partial(_get_records, keys=keys))
        return parse_records(prefix, num_blocks, raw)

    async def fetch_servers_async(self, prefix: str, num_blocks: int) -> list[ServerInfo]:
        """``fetch_servers`` for async code: waits without blocking the event loop."""
        keys = [block_key(prefix, block) for block in range(num_blocks)]
        raw = await self.dht.run_coroutine(partial(_get_records, keys=keys), return_future=True)
        return parse_records(prefix, num_blocks, raw)

    def shutdown(self) -> None:
        """Stop the DHT process, by force if it does not stop by itself (it ignores SIGTERM)."""
        if self.dht.is_alive():
            self.dht.shutdown()
        if self.dht.is_alive():
            self.dht.kill()
            self.dht.join(timeout=5)


def parse_records(prefix: str, num_blocks: int, raw: dict[str, dict[str, tuple[bytes, float]]]) -> list[ServerInfo]:
    """Turn raw DHT values into records; drop anything malformed, stored under the wrong key or subkey,
    or not signed by the key of the peer it names.

    A peer may have records under several keys (after it moved to another span, the old ones linger
    until they expire): its newest announcement wins, then the latest expiration.
    """
    best: dict[str, tuple[tuple[float, float], ServerInfo]] = {}
    for block in range(num_blocks):
        for subkey, (value, expiration) in raw.get(block_key(prefix, block), {}).items():
            info = ServerInfo.from_bytes(value)
            if info is None or info.peer_id != subkey or block not in info.span or info.span.end > num_blocks:
                continue
            if not info.verified() or expiration > info.expires_at + EXPIRY_SLACK:  # forged, or replayed for longer
                continue
            rank = (info.announced_at, expiration)
            if info.peer_id not in best or best[info.peer_id][0] < rank:
                best[info.peer_id] = (rank, info)
    return [info for _, info in best.values()]


PARENT_POLL_SECONDS = 0.05  # how soon the DHT process notices that its parent died


async def _exit_with_parent(dht, node, parent_pid: int) -> None:
    """Runs inside the DHT process: when the parent process is gone, kill the p2p daemon at once (its
    open connections then close, so peers see the streams of a dead server break instead of waiting
    for a timeout), then exit."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_SECONDS)
    daemon = getattr(node.p2p, "_child", None)  # hivemind keeps the p2pd process here
    try:
        if daemon is not None and daemon.returncode is None:
            daemon.kill()
    finally:
        os._exit(0)


async def _store_records(
    dht, node, keys: list[str], subkey: str, value: bytes, ttl: float, expiration: float | None = None
) -> bool:
    expiration = expiration or get_dht_time() + ttl
    results = await node.store_many(keys, [value] * len(keys), expiration, subkeys=[subkey] * len(keys))
    return all(results.values())


async def _get_records(dht, node, keys: list[str]) -> dict[str, dict[str, tuple[bytes, float]]]:
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
