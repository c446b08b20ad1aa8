"""Points for volunteers, end to end: a client's receipts show up as its server's points in the swarm's
records, and a busy server serves a client vouched for by a server with points before others."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from swarm.net.receipts import POINTS_PER_UNIT
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(240)
DEADLINE = 60.0


def wait_for(condition, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()) is not None and value is not False:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_receipts_become_points_that_order_a_busy_servers_queue(tiny_models, tmp_path):
    folder = str(tiny_models["llama"])
    key = tmp_path / "volunteer.key"
    with LocalSwarm() as swarm:
        fast = ("--announce-period", "0.5", "--log-level", "DEBUG")
        (busy,) = swarm.start(folder, [("0:6", (*fast, "--test-step-delay", "0.25", "--chunk-token-blocks", "64"))])
        (volunteer,) = swarm.start(folder, [("0:6", (*fast, "--identity", str(key)))])
        common = dict(initial_peers=swarm.initial_peers, receipt_period=0.2)
        user = AutoDistributedModelForCausalLM.from_pretrained(folder, allowed_peers=[volunteer.peer_id], **common)
        vouched = AutoDistributedModelForCausalLM.from_pretrained(
            folder, allowed_peers=[busy.peer_id], points_key=str(key), **common
        )
        plain = AutoDistributedModelForCausalLM.from_pretrained(folder, allowed_peers=[busy.peer_id], **common)
        try:
            # 1. the volunteer serves a user; the user's receipts become the volunteer's announced points
            user.generate(torch.randint(3, 256, (1, 6)), max_new_tokens=5, do_sample=False)
            work = user.client.receipts.work[volunteer.peer_id]
            assert work == (6 + 4) * 6  # tokens x blocks: the prompt and four fed-back tokens, six blocks

            def announced() -> bool:  # receipts go out every 0.2 s, so an early one may cover part of the work
                servers = {s.peer_id: s for s in user.client.loop.run(user.client.routes.servers(refresh=True))}
                return servers[volunteer.peer_id].points == pytest.approx(work * POINTS_PER_UNIT)

            wait_for(announced, "the volunteer's points for all its work")
            wait_for(lambda: any(volunteer.peer_id in line for line in busy.output if "Standings" in line),
                     "the busy server to learn the volunteer's points")  # fmt: skip

            # 2. the busy server runs a long prompt in slices; two forward passes queue behind it
            finished: list[str] = []  # the server's own log says in which order it ran them

            def run(name, action):
                action()
                finished.append(name)

            marker = len(busy.output)
            hog = threading.Thread(target=run, args=("hog", lambda: plain.generate(
                torch.randint(3, 256, (1, 64)), max_new_tokens=1, do_sample=False)))  # fmt: skip
            hog.start()
            wait_for(lambda: any("Opened session" in line for line in busy.output[marker:]), "the long prompt")
            ids = torch.randint(3, 256, (1, 4))
            first = threading.Thread(target=run, args=("plain", lambda: plain(ids)))
            first.start()
            plain_id = plain.client.dht.peer_id
            wait_for(lambda: any(f"forward 0:6 from {plain_id}" in line for line in busy.output[marker:]),
                     "the plain forward pass to queue")  # fmt: skip
            second = threading.Thread(target=run, args=("vouched", lambda: vouched(ids)))
            second.start()
            for thread in (hog, first, second):
                thread.join(timeout=120)
            assert sorted(finished) == ["hog", "plain", "vouched"]
            forwards = [line for line in busy.output[marker:] if "slice: 1 x FORWARD" in line]
            standings = [float(line.split("standing ")[1].split(",")[0]) for line in forwards]
            seen = [line for line in busy.output if "Standings" in line or "slice: 1 x FORWARD" in line]
            assert len(standings) == 2 and standings[0] > 0 and standings[1] == 0, (  # the vouched one went first
                f"issuer {vouched.client.vouchers.issuer.peer_id if vouched.client.vouchers.issuer else None}, "
                f"holder {vouched.client.dht.peer_id}; the busy server's log:\n" + "".join(seen[-12:])
            )
        finally:
            for model in (user, vouched, plain):
                model.shutdown()
