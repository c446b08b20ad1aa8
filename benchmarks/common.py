"""Helpers shared by the benchmarks: block splits and process probes (local swarms come from
``swarm.tools.localswarm``, the one launcher of local servers).

``tree_memory(pid)`` and ``tree_cpu_seconds(pids)`` read a process and its descendants with psutil;
``load_average()`` and ``start_time_limit(seconds)`` are what every benchmark prints and obeys.
``structure_sizes(server)`` and ``idle_sizes(servers)`` read the sizes of a server's long-lived structures,
which it logs when sent SIGUSR1 (``server.Server.sizes``): zero sessions and queued work once it is idle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time

import psutil

MIB = float(1 << 20)
# structure sizes that are zero once a server is idle (no session open, nothing queued)
BUSY_KEYS = ("store_sessions", "registry_sessions", "mailboxes", "queued_work", "early_pushes")
SIZES_LINE = "Structure sizes: "


class BenchmarkTimeout(TimeoutError):
    """The whole run took longer than --time-limit."""


def start_time_limit(seconds: int) -> None:
    """Raise BenchmarkTimeout in the main thread after ``seconds`` (its handlers clean the swarm up)."""

    def on_alarm(signum, frame):
        raise BenchmarkTimeout("time limit reached; stopping (servers are cleaned up)")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in psutil.getloadavg())


def even_spans(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous spans that split ``num_blocks`` blocks as evenly as possible."""
    bounds = [round(index * num_blocks / parts) for index in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def format_span(span: tuple[int, int]) -> str:
    return f"{span[0]}:{span[1]}"


@dataclasses.dataclass(frozen=True)
class TreeMemory:
    main_rss: float  # bytes: resident set of the process itself
    total_rss: float  # bytes: summed over the process and all its descendants (shared pages counted twice)
    total_pss: float | None  # bytes: proportional set size summed over the tree (shared pages split), if readable
    processes: int  # the process plus its descendants

    def as_mib(self) -> dict[str, float | int | None]:
        pss = None if self.total_pss is None else round(self.total_pss / MIB, 1)
        return {
            "main_rss_mib": round(self.main_rss / MIB, 1),
            "total_rss_mib": round(self.total_rss / MIB, 1),
            "total_pss_mib": pss,
            "processes": self.processes,
        }


def tree_memory(pid: int) -> TreeMemory:
    """Memory of process ``pid`` and its descendants (e.g. a server, its DHT child and its p2pd)."""
    main = psutil.Process(pid)
    tree = [main, *main.children(recursive=True)]
    rss, pss = 0.0, 0.0
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss += proc.memory_info().rss
            if pss is not None:
                try:
                    pss += proc.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    pss = None
    return TreeMemory(float(main.memory_info().rss), rss, pss, len(tree))


def tree_cpu_seconds(pids: list[int], exclude: list[int] = ()) -> float:
    """User + system CPU seconds used so far by processes ``pids`` and their living descendants.

    Processes in ``exclude`` and their descendants are left out (e.g. the servers, which are children of
    the benchmark process, when measuring the client's own CPU).
    """
    skipped = set()
    for pid in exclude:
        with contextlib.suppress(psutil.NoSuchProcess):
            main = psutil.Process(pid)
            skipped |= {pid, *(child.pid for child in main.children(recursive=True))}
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            main = psutil.Process(pid)
            for proc in [main, *main.children(recursive=True)]:
                if proc.pid in skipped:
                    continue
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    total += times.user + times.system
    return total


def structure_sizes(server, timeout: float = 30.0) -> dict[str, int]:
    """The sizes ``server`` (a ``swarm.tools.localswarm.ServerProcess``) logs on SIGUSR1 (``server.Server.sizes``)."""
    mark = len(server.output)
    server.signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.output[mark:]:
            if SIZES_LINE in line:
                return json.loads(line.split(SIZES_LINE, 1)[1])
        time.sleep(0.05)
    raise TimeoutError(f"server {server.peer_id} logged no structure sizes within {timeout:.0f} s")


def idle_sizes(servers: list, timeout: float = 60.0) -> list[dict[str, int]]:
    """Every server's structure sizes once none holds a session or queued work (closing is asynchronous); the
    last sizes read if that does not happen within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        sizes = [structure_sizes(server) for server in servers]
        if all(not size.get(key) for size in sizes for key in BUSY_KEYS) or time.monotonic() > deadline:
            return sizes
        time.sleep(0.2)
