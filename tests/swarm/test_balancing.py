"""Servers pick their own blocks (--num-blocks), move to cover holes, and clients route to fast servers."""

from __future__ import annotations

import signal
import time

import pytest

from client import AutoDistributedModelForCausalLM
from swarm.net.dht import DHTConfig, SwarmDHT
from swarm.routing.chains import coverage
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(400)
MODEL_BLOCKS = 30  # the default model


def wait_for_full_coverage(swarm_view: SwarmDHT, deadline: float) -> list[int]:
    while True:
        counts = coverage(swarm_view.fetch_servers("SmolLM2-135M-Instruct", MODEL_BLOCKS), MODEL_BLOCKS)
        if min(counts) > 0:
            return counts
        assert time.monotonic() < deadline, f"blocks left uncovered: {counts}"
        time.sleep(0.5)


def covered(spans: list[str]) -> set[int]:
    blocks = set()
    for span in spans:
        start, end = map(int, span.split(":"))
        blocks.update(range(start, end))
    return blocks


def test_servers_choose_spans_and_move_to_cover_a_hole():
    options = ("--num-blocks", "10", "--rebalance-period", "2", "--num-threads", "1")
    with LocalSwarm(timeout=300) as swarm:
        for _ in range(4):  # one after another, so each sees what the others announced
            swarm.start(None, [(None, options)])
        spans = [server.span for server in swarm.servers]
        assert covered(spans) == set(range(MODEL_BLOCKS)), spans
        view = SwarmDHT(DHTConfig(initial_peers=swarm.initial_peers, client_mode=True))
        try:
            wait_for_full_coverage(view, time.monotonic() + 60)
            # stop a server that nobody else backs up: its blocks become a hole
            alone = next(
                s
                for s in swarm.servers
                if not covered([s.span]) & covered([o.span for o in swarm.servers if o is not s])
            )
            alone.signal(signal.SIGTERM)
            assert alone.wait_exit(timeout=60) == 0
            counts = wait_for_full_coverage(view, time.monotonic() + 120)  # someone moved into the hole
        finally:
            view.shutdown()
        survivors = [s.span for s in swarm.live()]
        assert covered(survivors) == set(range(MODEL_BLOCKS)), (survivors, counts)
        assert any(line.startswith("Moving") or "Moving from" in line for s in swarm.live() for line in s.output) or (
            sum(1 for s in swarm.live() for line in s.output if line.startswith("Serving blocks")) > len(survivors)
        )


def test_inference_routes_avoid_a_slow_replica(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        fast, slow = swarm.start(folder, [("0:6", ()), ("0:6", ("--test-step-delay", "0.25"))])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        try:
            for _ in range(3):
                with model.inference_session(max_length=16) as session:
                    session.open(batch_size=1)
                    assert [hop.peer_id for hop in session.route] == [fast.peer_id]
            info = {s.peer_id: s for s in model.client.loop.run(model.client.routes.servers(refresh=True))}
            assert info[slow.peer_id].throughput < info[fast.peer_id].throughput
        finally:
            model.shutdown()
