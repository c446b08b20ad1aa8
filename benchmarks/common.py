"""Helpers shared by the benchmarks: a local swarm of ``python -m server`` subprocesses, and process probes.

``LocalSwarm(spans, ...)`` starts one server per span on 127.0.0.1 (port 0): the first one starts a new
swarm, the others join it through the first one's multiaddr. It waits for every server's ``Serving``
line with a deadline and stops everything it started in ``stop()`` (idempotent; also the context
manager's exit). Each server runs in its own session (process group), so its hivemind DHT child and its
p2pd daemon can be killed with it. Server output goes to files in a temporary folder, shown on failure.

``tree_memory(pid)`` and ``tree_cpu_seconds(pids)`` read a process and its descendants with psutil.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]
MIB = float(1 << 20)
POLL_INTERVAL = 0.1  # seconds between looks at a starting server's output
_LISTEN = re.compile(r"^Listening on (\S+)")


def even_spans(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous spans that split ``num_blocks`` blocks as evenly as possible."""
    bounds = [round(index * num_blocks / parts) for index in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def format_span(span: tuple[int, int]) -> str:
    return f"{span[0]}:{span[1]}"


@dataclasses.dataclass
class ServerProcess:
    """One ``python -m server`` subprocess and what it has printed so far."""

    span: tuple[int, int]
    proc: subprocess.Popen
    stdout_path: pathlib.Path
    stderr_path: pathlib.Path
    maddrs: list[str] = dataclasses.field(default_factory=list)
    ready: bool = False

    @property
    def name(self) -> str:
        return format_span(self.span)

    def poll_ready(self) -> bool:
        """True once the server printed its ``Serving`` line; raises if it exited before that."""
        lines = self.stdout_path.read_text(errors="replace").splitlines()
        self.maddrs = [match.group(1) for line in lines if (match := _LISTEN.match(line))]
        self.ready = any(line.startswith("Serving") for line in lines)
        if not self.ready and self.proc.poll() is not None:
            raise RuntimeError(
                f"server {self.name} exited with code {self.proc.returncode} before serving:\n{self.stderr_tail()}"
            )
        return self.ready

    def stderr_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def local_maddr(self) -> str:
        loopback = [addr for addr in self.maddrs if "/127.0.0.1/" in addr]
        if not (loopback or self.maddrs):
            raise RuntimeError(f"server {self.name} printed no 'Listening on' address")
        return (loopback or self.maddrs)[0]

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []


class LocalSwarm:
    """Servers for ``spans`` of one model on 127.0.0.1; ``start()`` waits until all of them serve."""

    def __init__(
        self,
        spans: list[tuple[int, int]],
        model: str | None = None,
        num_threads: int | None = None,
        extra_env: dict[str, str] | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 15.0,
    ):
        self.spans, self.model, self.num_threads = spans, model, num_threads
        self.extra_env = dict(extra_env or {})
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.servers: list[ServerProcess] = []
        self._log_dir = pathlib.Path(tempfile.mkdtemp(prefix="stamen-bench-"))
        self._stopped = False

    def __enter__(self) -> LocalSwarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def initial_peer(self) -> str:
        return self.servers[0].local_maddr()

    def start(self) -> None:
        """Start the first server, wait for it, then start the rest together and wait for them."""
        deadline = time.monotonic() + self.start_timeout
        first = self._launch(self.spans[0], [])
        self._wait([first], deadline)
        rest = [self._launch(span, [first.local_maddr()]) for span in self.spans[1:]]
        self._wait(rest, deadline)

    def _launch(self, span: tuple[int, int], initial_peers: list[str]) -> ServerProcess:
        command = [sys.executable, "-m", "server", "--blocks", format_span(span), "--host", "127.0.0.1"]
        if self.model:
            command += ["--model", self.model]
        if self.num_threads:
            command += ["--num-threads", str(self.num_threads)]
        if initial_peers:
            command += ["--initial-peers", *initial_peers]
        index = len(self.servers)
        stdout_path = self._log_dir / f"server{index}.out"
        stderr_path = self._log_dir / f"server{index}.err"
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                start_new_session=True,
            )  # fmt: skip
        server = ServerProcess(span, proc, stdout_path, stderr_path)
        self.servers.append(server)
        return server

    def _wait(self, servers: list[ServerProcess], deadline: float) -> None:
        waiting = list(servers)
        while waiting:
            waiting = [server for server in waiting if not server.poll_ready()]
            if waiting and time.monotonic() > deadline:
                tails = "\n".join(f"--- server {s.name} stderr:\n{s.stderr_tail()}" for s in waiting)
                raise TimeoutError(f"servers {[s.name for s in waiting]} not serving within the deadline\n{tails}")
            if waiting:
                time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """SIGTERM every server, wait a bounded time, then SIGKILL its process group and leftovers."""
        if self._stopped:
            return
        self._stopped = True
        trees = {server.proc.pid: server.descendants() for server in self.servers}
        for server in self.servers:
            if server.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for server in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for server in self.servers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server.proc.pid, signal.SIGKILL)  # the group we created: pgid == pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(timeout=5)
            for child in trees[server.proc.pid]:  # descendants that left the group, if any
                with contextlib.suppress(psutil.Error):
                    child.kill()
        shutil.rmtree(self._log_dir, ignore_errors=True)


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
