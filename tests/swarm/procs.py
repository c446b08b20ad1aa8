"""What the processes of a test hold: their sockets (sampled while the test runs) and their memory.

Every node a test starts (``swarm.tools.localswarm``) is a child of the test process, so "every process of
the run" is the test process and all its descendants: bootstrap node, servers, the libp2p daemons
they start, and the client's daemon.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass

import psutil

MIB = 2**20


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants that are alive now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def is_loopback_address(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass(frozen=True, order=True)
class Socket:
    process: str  # process name, e.g. "python" or "p2pd"
    kind: str  # "tcp" or "udp"
    local: str  # "ip:port"
    remote: str  # "ip:port", or "" when not connected

    @property
    def loopback(self) -> bool:
        ips = [self.local.rsplit(":", 1)[0]] + ([self.remote.rsplit(":", 1)[0]] if self.remote else [])
        return all(is_loopback_address(ip) for ip in ips)


class SocketAudit:
    """Samples every internet socket of a process tree every ``period`` seconds until stopped; use as a
    context manager. ``sockets`` is every distinct socket seen, ``outside`` those not on loopback."""

    def __init__(self, root_pid: int | None = None, period: float = 0.05):
        self.root_pid, self.period = root_pid or os.getpid(), period
        self.sockets: set[Socket] = set()
        self.processes: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="socket-audit", daemon=True)

    @property
    def outside(self) -> list[Socket]:
        return sorted(s for s in self.sockets if not s.loopback)

    def sample(self) -> None:
        for process in tree(self.root_pid):
            try:
                name = process.name()
                connections = process.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            self.processes.add((process.pid, name))
            for c in connections:
                kind = "udp" if c.type == 2 else "tcp"  # socket.SOCK_DGRAM == 2
                remote = f"{c.raddr.ip}:{c.raddr.port}" if c.raddr else ""
                self.sockets.add(Socket(name, kind, f"{c.laddr.ip}:{c.laddr.port}", remote))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self) -> SocketAudit:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


@dataclass(frozen=True)
class Memory:
    """Memory of a process tree in bytes: unique (USS), proportional (PSS) and resident (RSS) set sizes;
    ``files_pss`` / ``files_rss``: the part of PSS / RSS in mappings of the files asked about."""

    uss: int = 0
    pss: int = 0
    rss: int = 0
    files_pss: int = 0
    files_rss: int = 0
    processes: tuple[str, ...] = ()  # names of the processes counted

    def __add__(self, other: Memory) -> Memory:
        fields = ("uss", "pss", "rss", "files_pss", "files_rss", "processes")
        return Memory(*(getattr(self, name) + getattr(other, name) for name in fields))

    def __str__(self) -> str:
        return f"PSS {self.pss / MIB:.0f} MiB, USS {self.uss / MIB:.0f} MiB, RSS {self.rss / MIB:.0f} MiB"


def tree_memory(pid: int, files: tuple[str, ...] = ()) -> Memory:
    """Memory held by ``pid`` and its descendants (PSS counts pages shared with others proportionally).

    Pages of ``files`` (e.g. safetensors weights read through mmap) are also counted apart, since other
    processes mapping the same file (another server of the same model) lower their PSS.
    """
    total = Memory()
    for process in tree(pid):
        try:
            info = process.memory_full_info()
            mapped = [m for m in process.memory_maps(grouped=True) if m.path in files] if files else []
            total += Memory(
                info.uss,
                info.pss,
                info.rss,
                sum(m.pss for m in mapped),
                sum(m.rss for m in mapped),
                (process.name(),),
            )
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return total
