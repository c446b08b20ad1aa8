"""Clean exits: a server, an API or a client process ended by SIGINT, SIGTERM or SIGKILL leaves no process
behind (its libp2p daemon ends with it), and a script that opens and drops several models without
``shutdown()`` exits 0 every time."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from swarm.tools.localswarm import LocalSwarm, ServerProcess, spawn
from tests.api.conftest import make_chat_model
from tests.swarm.procs import tree

pytestmark = pytest.mark.timeout(420)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
GONE_WITHIN = 60.0  # seconds for a process and everything it started to end (graceful exits on a busy machine)
ROOT = Path(__file__).resolve().parents[2]

# a client that generates once, says so, and waits (bounded) to be ended by a signal
CLIENT = """
import signal, sys, time, torch
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may have inherited SIGINT ignored
from client import AutoDistributedModelForCausalLM
model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
print("client ready", flush=True)
time.sleep(120)
"""

# imports the client once, then 20 times (4 at a time): a forked child opens two models one after the other,
# generates with each and drops them (no shutdown()), and exits as a script does; prints each exit status
DROPPER = """
import os, sys, torch
from client import AutoDistributedModelForCausalLM
statuses = []
for _ in range(0, int(sys.argv[1]), 4):
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            folder, peers = sys.argv[2], sys.argv[3:]
            models = [AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=peers) for _ in range(2)]
            [m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False) for m in models]
            sys.exit(0)  # the interpreter ends as a script's does: atexit, then finalization
        pids.append(pid)
    statuses += [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
print("exit codes", statuses)
"""
RUNS = 20


def descendants(process: ServerProcess) -> list[psutil.Process]:
    """The process and all it started, once it started its libp2p daemon."""
    processes = tree(process.proc.pid)
    assert any(p.name() == "p2pd" for p in processes), [p.name() for p in processes]
    return processes


def left_after(processes: list[psutil.Process], deadline: float) -> list[str]:
    """The processes still running at ``deadline`` (zombies count as ended)."""
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return [f"{p.pid} {p.name()}" for p in alive]
        time.sleep(0.1)


def start_client(folder: Path, peers: list[str]) -> ServerProcess:
    client = spawn([sys.executable, "-c", CLIENT, str(folder), *peers])
    client.ready_line = "client ready"
    return client


def test_every_kind_of_process_ends_with_all_it_started_however_it_is_ended(tiny_models, tmp_path):
    folder = make_chat_model(tiny_models["llama"], tmp_path / "chat")  # the API needs a tokenizer
    with LocalSwarm(fork=False) as swarm:  # real interpreters: how they exit is what is tested
        swarm.start(folder, [("0:6", ())])
        victims = {("server", sig): swarm.start(folder, [("0:6", ())])[0] for sig in SIGNALS}
        victims |= {("api", sig): swarm.start_api(folder) for sig in SIGNALS}
        clients = {("client", sig): start_client(folder, swarm.initial_peers) for sig in SIGNALS}
        deadline = time.monotonic() + 240
        for client in clients.values():
            client.wait_ready(deadline)
        victims |= clients
        processes = {key: descendants(process) for key, process in victims.items()}
        for (_, sig), process in victims.items():
            process.signal(sig)
        left = {key: left_after(procs, time.monotonic() + GONE_WITHIN) for key, procs in processes.items()}
        for process in clients.values():
            process.kill_group()
    assert {f"{kind} {sig.name}": names for (kind, sig), names in left.items() if names} == {}


def test_a_script_that_drops_its_models_without_shutdown_exits_cleanly_every_time(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm(fork=False) as swarm:  # real interpreters: how they exit is what is tested
        swarm.start(folder, [("0:6", ())])
        done = subprocess.run(
            [sys.executable, "-c", DROPPER, str(RUNS), str(folder), *swarm.initial_peers],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=360,
        )
    assert f"exit codes {[0] * RUNS}" in done.stdout, done.stdout + done.stderr[-3000:]
