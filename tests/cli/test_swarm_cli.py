"""``python -m swarm bootstrap | status`` as real processes on 127.0.0.1 (port 0)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.net.dht import DHTConfig, SwarmDHT
from swarm.net.records import ServerInfo, ServerState
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(180)

REPO_ROOT = Path(__file__).resolve().parents[2]
MADDR = re.compile(r"^Listening on (/ip4/[\d.]+/tcp/\d+/p2p/(\w+))$")
START_TIMEOUT = 60.0  # seconds for a bootstrap node to print "Bootstrap node ready"
STOP_TIMEOUT = 30.0  # seconds for it to exit after SIGTERM


class Bootstrap:
    """A ``python -m swarm bootstrap`` subprocess in its own process group, its stdout read by a thread."""

    def __init__(self, log: Path, *extra: str):
        self.log = log
        self._stderr = open(log, "w")  # closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarm", "bootstrap", "--host", "127.0.0.1", "--port", "0", *extra],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.addrs = self._read_until_ready()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # end of output

    def next_line(self, deadline: float) -> str | None:
        try:
            return self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no output before the deadline; stderr:\n{self.log.read_text()}") from None

    def _read_until_ready(self) -> list[tuple[str, str]]:
        deadline, seen = time.monotonic() + START_TIMEOUT, []
        while (line := self.next_line(deadline)) != "Bootstrap node ready":
            assert line is not None, f"exited early ({seen}); stderr:\n{self.log.read_text()}"
            seen.append(line)
        addrs = [match.groups() for match in map(MADDR.match, seen) if match]
        assert addrs and len(addrs) == len(seen), f"unexpected output {seen}"
        local = [(addr, peer) for addr, peer in addrs if addr.startswith("/ip4/127.0.0.1/tcp/")]
        assert local and len({peer for _, peer in addrs}) == 1, f"unexpected addresses {seen}"
        return local

    @property
    def addr(self) -> str:
        return self.addrs[0][0]

    @property
    def peer_id(self) -> str:
        return self.addrs[0][1]

    def stop(self) -> list[str]:
        """SIGTERM; expect exit code 0 within STOP_TIMEOUT; return the lines printed after 'ready'."""
        self.proc.send_signal(signal.SIGTERM)
        deadline, rest = time.monotonic() + STOP_TIMEOUT, []
        while (line := self.next_line(deadline)) is not None:
            rest.append(line)
        assert self.proc.wait(timeout=max(0.1, deadline - time.monotonic())) == 0, self.log.read_text()
        return rest

    def kill(self) -> None:
        """Kill the whole process group (the node, its DHT process, the p2p daemon); safe to call twice."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._stderr.close()


@pytest.fixture
def start_bootstrap(tmp_path) -> Iterator:
    started: list[Bootstrap] = []

    def start(*extra: str) -> Bootstrap:
        node = Bootstrap(tmp_path / f"bootstrap-{len(started)}.log", *extra)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.kill()


def run_cli(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarm", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def test_bootstrap_and_status_of_an_empty_swarm(start_bootstrap):
    node = start_bootstrap()
    status = run_cli(
        "status", "--initial-peers", node.addr, "--dht-prefix", "nothing-here", "--num-blocks", "4", "--json"
    )
    assert status.returncode == 1, status.stderr
    report = json.loads(status.stdout)
    assert report == {
        "servers": [],
        "coverage": [0, 0, 0, 0],
        "gaps": [0, 1, 2, 3],
        "route": None,
        "route_ms": None,
        "push_route": None,
        "push_route_ms": None,
    }
    assert node.stop() == ["Bootstrap node stopped"]


def test_status_shows_announced_servers_and_their_route(start_bootstrap):
    node = start_bootstrap()
    peers = {}  # records are signed by their own peer, so each fake server is a real DHT node
    try:
        for name, start, end in [("peer-a", 0, 2), ("peer-b", 1, 4), ("peer-c", 0, 4)]:
            peers[name] = SwarmDHT(DHTConfig(initial_peers=[node.addr], client_mode=True))
            state = ServerState.OFFLINE if name == "peer-c" else ServerState.ONLINE
            speed = 10.0 if name == "peer-a" else 5.0  # the faster peer-a should run as many blocks as it can
            info = ServerInfo(peers[name].peer_id, state, BlockRange(start, end), speed, public_name=name.upper())
            assert peers[name].announce("cli-test", info, ttl=120).result(timeout=30)
    finally:
        for dht in peers.values():
            dht.shutdown()
    a, b, c = (peers[name].peer_id for name in ("peer-a", "peer-b", "peer-c"))
    args = ("status", "--initial-peers", node.addr, "--dht-prefix", "cli-test", "--num-blocks", "4")
    deadline = time.monotonic() + 60  # the records were stored; poll in case a DHT request times out under load
    while (status := run_cli(*args, "--json")).returncode != 0 and time.monotonic() < deadline:
        pass
    assert status.returncode == 0, (status.stdout, status.stderr)
    report = json.loads(status.stdout)
    assert [row["peer_id"] for row in report["servers"]] == [a, c, b]
    assert report["coverage"] == [1, 2, 1, 1] and report["gaps"] == []
    assert report["route"] == [{"peer_id": a, "start": 0, "end": 2}, {"peer_id": b, "start": 2, "end": 4}]

    text = run_cli(*args)
    assert text.returncode == 0, text.stderr
    assert "PEER-A" in text.stdout and "OFFLINE" in text.stdout
    assert f"Route: {a} [0:2] -> {b} [2:4]" in text.stdout


def test_identity_file_keeps_the_peer_id(start_bootstrap, tmp_path):
    identity = tmp_path / "keys" / "bootstrap.key"  # its folder does not exist yet
    first = start_bootstrap("--identity", str(identity))
    assert identity.is_file()
    assert first.stop() == ["Bootstrap node stopped"]
    second = start_bootstrap("--identity", str(identity))
    assert second.peer_id == first.peer_id
    assert second.stop() == ["Bootstrap node stopped"]
    third = start_bootstrap()
    assert third.peer_id != first.peer_id


def test_no_command_prints_help():
    result = run_cli()
    assert result.returncode == 0
    assert "bootstrap" in result.stdout and "status" in result.stdout


def test_status_of_unreachable_peers_fails_cleanly():
    unreachable = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRruqgAmynRrETtghFP3dbsxyBVYuMFxcGPtfnH46mCTQ"
    result = run_cli("status", "--initial-peers", unreachable, "--num-blocks", "2", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Cannot start a DHT node" in result.stderr
