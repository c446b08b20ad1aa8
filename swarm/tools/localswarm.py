"""A local swarm of real processes on 127.0.0.1 (tests, demo, benchmarks): ``python -m server`` nodes,
optionally a ``python -m swarm bootstrap`` node they all join through, API processes
(``python -m client.api``) and monitors (``python -m swarm monitor``).

Starts each as a subprocess in its own process group, learns addresses from what it prints, waits for
readiness with a deadline, and kills whole process groups on exit (each node and the libp2p daemon it
started). This is the one launcher of local swarms. With ``fork`` (default: ``STAMEN_FORK_SERVERS=1``, which
the tests set) servers are forked from a process that imported the server's code once (``swarm.tools.zygote``)
instead of started as new interpreters.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from swarm.models.families import FAMILIES
from swarm.net.lifetime import end_with_parent
from swarm.tools.zygote import ForkedProcess, Zygote

# what a forked server would otherwise import itself: the server, and the families' transformers modeling code
ZYGOTE_PRELOAD = ("server.__main__", *(f"transformers.models.{t}.modeling_{t}" for t in FAMILIES if t != "llama"))
URL_LINES = ("Serving the API on ", "Serving the monitor on ")  # HTTP processes print their address so


@dataclass
class ServerProcess:
    args: list[str]
    proc: subprocess.Popen | ForkedProcess
    model: str | None = None
    blocks: str = ""
    extra: tuple[str, ...] = ()
    lines: queue.Queue = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)
    maddrs: list[str] = field(default_factory=list)
    peer_id: str = ""
    ready_line: str = "Serving blocks"  # what the process prints once it is up

    def wait_ready(self, deadline: float) -> None:
        """Read stdout until the ready line (or fail with the process's output at ``deadline``)."""
        line = self.wait_line(self.ready_line, deadline)
        if " as " in line:
            self.peer_id = line.split(" as ")[1].split()[0]

    def wait_line(self, prefix: str, deadline: float) -> str:
        """Read stdout until a line starting with ``prefix`` and return it (fail with the output at ``deadline``)."""
        while True:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError(f"process {self.args} not ready in time; output:\n" + "".join(self.output))
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"process {self.args} exited early; output:\n" + "".join(self.output))
            if line.startswith("Listening on "):
                self.maddrs.append(line.split()[-1])
            if line.startswith(prefix):
                return line

    @property
    def url(self) -> str | None:
        """An API's or a monitor's address, from its 'Serving the ... on URL' line."""
        lines = [line for line in list(self.output) if line.startswith(URL_LINES)]
        return lines[-1].split()[-1] if lines else None

    @property
    def span(self) -> str | None:
        """The blocks it serves now, from its latest 'Serving blocks START:END ...' line."""
        serving = [line for line in list(self.output) if line.startswith("Serving blocks")]
        return serving[-1].split()[2] if serving else None

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        """Kill the process and its children (its p2p daemon)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _pump(proc: subprocess.Popen | ForkedProcess, lines: queue.Queue, output: list[str]) -> None:
    for line in proc.stdout:
        output.append(line)
        lines.put(line)
    lines.put(None)


def spawn_server(
    model: str | None,
    blocks: str | None,
    initial_peers: list[str] = (),
    *extra: str,
    env: dict | None = None,
    entry: tuple[str, ...] = ("server",),
    fork: bool = False,
) -> ServerProcess:
    """Start ``python -m server``; ``blocks`` None means the extra arguments choose (e.g. --num-blocks).
    ``entry``: the module (and its own arguments) run instead, which must take the server's arguments.
    ``fork``: fork it from this process's zygote (``swarm.tools.zygote``) instead of starting an interpreter
    (not with ``env``: the zygote's libraries read theirs when it started)."""
    args = [sys.executable, "-m", *entry, "--host", "127.0.0.1"] + (["--blocks", blocks] if blocks else [])
    args += (["--model", str(model)] if model else []) + list(extra)
    if initial_peers:
        args += ["--initial-peers", *initial_peers]
    if fork and env is None:
        proc = Zygote.shared(ZYGOTE_PRELOAD).fork(args, dict(os.environ))
        server = ServerProcess(args, proc)
        threading.Thread(target=_pump, args=(proc, server.lines, server.output), daemon=True).start()
    else:
        server = spawn(args, env)
    server.model, server.blocks, server.extra = model, blocks, tuple(extra)
    return server


def spawn_bootstrap(*extra: str, env: dict | None = None) -> ServerProcess:
    """Start ``python -m swarm bootstrap`` on 127.0.0.1; ``wait_ready`` then gives its addresses."""
    bootstrap = spawn([sys.executable, "-m", "swarm", "bootstrap", "--host", "127.0.0.1", *extra], env)
    bootstrap.ready_line = "Bootstrap node ready"
    return bootstrap


def spawn_monitor(initial_peers: list[str], *extra: str, env: dict | None = None) -> ServerProcess:
    """Start ``python -m swarm monitor`` on 127.0.0.1; after ``wait_ready``, ``url`` is the page's address."""
    args = [sys.executable, "-m", "swarm", "monitor", "--host", "127.0.0.1", "--initial-peers", *initial_peers]
    monitor = spawn(args + list(extra), env)
    monitor.ready_line = "Serving the monitor on "
    return monitor


def spawn(args: list[str], env: dict | None = None) -> ServerProcess:
    """Start a process in its own process group, its output collected line by line. Started from the
    main thread, it ends when this process does, however this one ends (``swarm.net.lifetime``)."""
    main = threading.current_thread() is threading.main_thread()
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env=env,
        preexec_fn=end_with_parent() if main else None,
    )
    process = ServerProcess(args, proc)
    threading.Thread(target=_pump, args=(proc, process.lines, process.output), daemon=True).start()
    return process


class LocalSwarm:
    """The first server starts the swarm and the rest join it, or with ``bootstrap=True`` every server
    joins through a ``python -m swarm bootstrap`` node started first. Always use as a context manager."""

    def __init__(
        self, timeout: float = 120.0, env: dict | None = None, bootstrap: bool = False, fork: bool | None = None
    ):
        self.servers: list[ServerProcess] = []
        self.apis: list[ServerProcess] = []
        self.timeout, self.env = timeout, env
        # servers forked from a zygote (swarm.tools.zygote), not with env; default: STAMEN_FORK_SERVERS=1
        self.fork = os.environ.get("STAMEN_FORK_SERVERS") == "1" if fork is None else fork
        self.bootstrap: ServerProcess | None = None
        if bootstrap:
            self.bootstrap = spawn_bootstrap(env=env)
            try:
                self.bootstrap.wait_ready(time.monotonic() + timeout)
            except BaseException:
                self.bootstrap.kill_group()
                raise

    @property
    def initial_peers(self) -> list[str]:
        """Addresses of the bootstrap node and servers still running (any of them lets a newcomer join)."""
        nodes = ([self.bootstrap] if self.bootstrap else []) + self.servers
        return [addr for node in nodes if node.proc.poll() is None for addr in node.maddrs]

    def live(self, blocks: str | None = None) -> list[ServerProcess]:
        return [s for s in self.servers if s.proc.poll() is None and (blocks is None or s.blocks == blocks)]

    def by_peer(self, peer_id: str) -> ServerProcess:
        return next(s for s in self.servers if s.peer_id == peer_id)

    def replace(self, server: ServerProcess) -> ServerProcess:
        """Start a new server with the same arguments as ``server`` (which may be dead)."""
        (new,) = self.start(server.model, [(server.blocks, server.extra)])
        return new

    def start(
        self, model, specs: list[tuple[str, tuple[str, ...]]], entry: tuple[str, ...] = ("server",)
    ) -> list[ServerProcess]:
        """Start servers for (blocks, extra args) specs. In a new swarm the first one starts first and the
        others join through it once its DHT node listens (once it serves, if it chooses its own blocks).
        ``entry``: see ``spawn_server``."""
        deadline = time.monotonic() + self.timeout
        started, loading = [], []
        if not self.servers and self.bootstrap is None:
            first = spawn_server(model, specs[0][0], [], *specs[0][1], env=self.env, entry=entry, fork=self.fork)
            self.servers.append(first)
            started.append(first)
            if specs[0][0]:  # the others join through its DHT node while it loads its blocks
                first.wait_line("Joining as ", deadline)
                loading.append(first)
            else:  # it chooses its blocks: the others choose after it has announced them
                first.wait_ready(deadline)
            specs = specs[1:]
        peers = self.initial_peers
        batch = [
            spawn_server(model, blocks, peers, *extra, env=self.env, entry=entry, fork=self.fork)
            for blocks, extra in specs
        ]
        self.servers.extend(batch)
        for server in loading + batch:
            server.wait_ready(deadline)
        return started + batch

    def start_api(self, model, *extra: str) -> ServerProcess:
        """Start ``python -m client.api`` on a free port of 127.0.0.1, joined to this swarm; its ``url`` is
        known once it serves. It stops with the swarm."""
        args = [sys.executable, "-m", "client.api", "--host", "127.0.0.1", "--port", "0"]
        args += (["--model", str(model)] if model else []) + list(extra) + ["--initial-peers", *self.initial_peers]
        api = spawn(args, self.env)
        self.apis.append(api)
        api.ready_line = "Serving the API on "
        api.wait_ready(time.monotonic() + self.timeout)
        return api

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        for process in self.apis + self.servers + ([self.bootstrap] if self.bootstrap else []):
            process.kill_group()
