"""Harder failures: the only server of a span dies (and comes back, or not), sessions expire on an
idle server, and servers are killed and restarted at random while generations run."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.errors import MissingBlocksError
from swarm.net.rpc import call_info
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)


def prompt(seed: int, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


class OnToken:
    """generate() streamer calling ``action(token_index)`` for each generated token (0 = prompt)."""

    def __init__(self, action):
        self.action, self.calls = action, 0

    def put(self, value) -> None:
        self.action(self.calls)
        self.calls += 1

    def end(self) -> None:
        pass


@pytest.fixture
def two_servers(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        swarm.start(folder, [("0:3", ()), ("3:6", ())])
        yield swarm, folder, AutoModelForCausalLM.from_pretrained(folder).eval()


def test_only_server_of_a_span_dies_and_a_new_one_starts(two_servers):
    swarm, folder, local = two_servers
    model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
    victim = swarm.live("3:6")[0]
    restarter = threading.Thread(target=swarm.replace, args=(victim,))

    def kill_and_restart(token: int) -> None:
        if token == 3:
            os.kill(victim.proc.pid, signal.SIGKILL)
            restarter.start()  # the newcomer needs a few seconds to load and announce

    ids = prompt(1)
    try:
        actual = model.generate(ids, max_new_tokens=12, do_sample=False, streamer=OnToken(kill_and_restart))
    finally:
        model.shutdown()
        restarter.join(timeout=120)
    assert actual.tolist() == local.generate(ids, max_new_tokens=12, do_sample=False).tolist()
    assert len(swarm.live("3:6")) == 1 and swarm.live("3:6")[0] is not victim


def test_only_server_of_a_span_dies_for_good(two_servers):
    swarm, folder, _ = two_servers
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, wait_for_blocks=3.0
    )
    victim = swarm.live("3:6")[0]
    killed_at = []

    def kill(token: int) -> None:
        if token == 2:
            os.kill(victim.proc.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

    try:
        with pytest.raises(MissingBlocksError) as caught:
            model.generate(prompt(2), max_new_tokens=12, do_sample=False, streamer=OnToken(kill))
    finally:
        model.shutdown()
    assert caught.value.blocks == [3, 4, 5]
    assert "3:6" in str(caught.value)
    assert time.monotonic() - killed_at[0] < 20  # bounded: wait_for_blocks plus detection


def test_session_expired_on_idle_server_resumes_transparently(tiny_models):
    folder = tiny_models["qwen2"]
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    with LocalSwarm() as swarm:
        idle = ("--session-idle-timeout", "1", "--cache-tokens", "4096")
        swarm.start(folder, [("0:4", idle), ("4:6", idle)])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        turn1, turn2 = prompt(3, 6), prompt(4, 5)
        try:
            with model.inference_session(max_length=64) as session:
                reply1 = model.generate(turn1, max_new_tokens=6, do_sample=False)
                peers = [hop.peer_id for hop in session.route]
                deadline = time.monotonic() + 30
                while any(  # both servers must have closed the session and freed its cache
                    model.client.loop.run(call_info(model.client.p2p, peer, timeout=5)).cache_tokens_left < 4096
                    for peer in peers
                ):
                    assert time.monotonic() < deadline, "idle sessions were never closed"
                    time.sleep(0.2)
                reply2 = model.generate(torch.cat([reply1, turn2], dim=1), max_new_tokens=6, do_sample=False)
                assert [hop.peer_id for hop in session.route] == peers  # resumed on the same servers
        finally:
            model.shutdown()
    expected1 = local.generate(turn1, max_new_tokens=6, do_sample=False)
    expected2 = local.generate(torch.cat([expected1, turn2], dim=1), max_new_tokens=6, do_sample=False)
    assert reply1.tolist() == expected1.tolist()
    assert reply2.tolist() == expected2.tolist()


def test_frozen_server_is_detected_by_the_adaptive_timeout(tiny_models):
    """A server that stops answering (SIGSTOP, not dead: its connections stay open) is found out by a
    liveness ping once a step is late, not after a long timeout, and the tokens do not change."""
    folder = tiny_models["llama"]
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    with LocalSwarm() as swarm:
        swarm.start(folder, [("0:6", ()), ("0:6", ())])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        frozen = []

        def freeze(session, token):
            if token == 6:
                frozen.append((swarm.by_peer(session.route[0].peer_id), time.monotonic()))
                os.kill(frozen[0][0].proc.pid, signal.SIGSTOP)

        ids = prompt(7)
        try:
            with model.inference_session(max_length=32) as session:
                streamer = OnToken(lambda token: freeze(session, token))
                actual = model.generate(ids, max_new_tokens=12, do_sample=False, streamer=streamer)
                assert session.route[0].peer_id != frozen[0][0].peer_id
            finished = time.monotonic()
        finally:
            model.shutdown()
            if frozen:
                os.kill(frozen[0][0].proc.pid, signal.SIGCONT)
    assert actual.tolist() == local.generate(ids, max_new_tokens=12, do_sample=False).tolist()
    assert finished - frozen[0][1] < 10  # a late step's ping (0.3 s) plus the replay, far below the 10 s base


@pytest.mark.timeout(420)
def test_chaos_random_kills_and_restarts(tiny_models):
    """Seeded chaos: servers in use are SIGKILLed at random tokens and restarted in the background;
    every span keeps a live server or gets one back. Every generation finishes and is token-exact."""
    folder = tiny_models["mistral"]
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    rng = random.Random(1234)
    spans = ["0:2", "2:4", "4:6"]
    restarts: list[threading.Thread] = []
    kills = []
    with LocalSwarm() as swarm:
        swarm.start(folder, [(span, ()) for span in spans for _ in range(2)])
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(folder), initial_peers=swarm.initial_peers, update_period=0.5
        )

        def maybe_kill(session, token: int) -> None:
            if len(kills) >= 6 or rng.random() > 0.15 or not session.route:
                return
            hop = rng.choice(session.route)
            victim = swarm.by_peer(hop.peer_id)
            if len(swarm.live(victim.blocks)) < 2:
                return  # keep at least one live server per span
            os.kill(victim.proc.pid, signal.SIGKILL)
            kills.append((token, victim.blocks))
            thread = threading.Thread(target=swarm.replace, args=(victim,))
            thread.start()
            restarts.append(thread)

        try:
            for round_index in range(6):
                ids = prompt(100 + round_index, 8)
                expected = local.generate(ids, max_new_tokens=16, do_sample=False)
                with model.inference_session(max_length=32) as session:
                    streamer = OnToken(lambda token, s=session: maybe_kill(s, token))
                    actual = model.generate(ids, max_new_tokens=16, do_sample=False, streamer=streamer)
                assert actual.tolist() == expected.tolist(), f"round {round_index} after kills {kills}"
        finally:
            model.shutdown()
            for thread in restarts:
                thread.join(timeout=120)
    assert len(kills) >= 3, f"the chaos test killed too little to prove anything: {kills}"
