"""Far servers: a server 500 ms of round trip away (behind the delay proxy of ``benchmarks/netem.py``, and
announcing the proxy's address) is slow, not dead. The client's liveness pings wait in proportion to the
measured round trip, so generation goes through without banning a healthy server, and the tokens are
the local model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.netem import LinkProxy, free_port
from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(240)
ONE_WAY = 0.25  # seconds each way: a round trip well above the 0.3 s a liveness ping got before it was measured


def test_a_server_far_away_is_slow_not_dead(tiny_models):
    folder = tiny_models["llama"]
    port = free_port()
    proxy = LinkProxy(port, ONE_WAY)
    try:
        with LocalSwarm(bootstrap=True) as swarm:
            announce = ("--port", str(port), "--announce-host", "127.0.0.1", "--announce-port", str(proxy.port))
            swarm.start(folder, [("0:6", announce)])
            model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
            ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(5))
            try:
                actual = model.generate(ids, max_new_tokens=4, do_sample=False)
                assert model.client.routes.banned() == set()
            finally:
                model.shutdown()
            assert proxy.bytes > 0  # the client's traffic went through the far link
    finally:
        proxy.close()
    expected = AutoModelForCausalLM.from_pretrained(folder).eval().generate(ids, max_new_tokens=4, do_sample=False)
    assert actual.tolist() == expected.tolist()
