"""A swarm told to stay on loopback stays there: no socket of any process of a full run (bootstrap node,
two servers, a client generating, and the libp2p daemons of all of them) touches another address."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.procs import SocketAudit

pytestmark = pytest.mark.timeout(300)


def test_every_socket_of_a_loopback_swarm_run_stays_on_loopback(tiny_models):
    folder = tiny_models["llama"]
    prompt = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    expected = AutoModelForCausalLM.from_pretrained(folder).eval().generate(prompt, max_new_tokens=8, do_sample=False)

    with SocketAudit() as audit:
        with LocalSwarm(bootstrap=True) as swarm:
            swarm.start(folder, [("0:3", ()), ("3:6", ())])
            for push in (False, True):
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    str(folder), initial_peers=swarm.bootstrap.maddrs, push=push
                )
                try:
                    assert model.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
                finally:
                    model.shutdown()

    daemons = [pid for pid, name in audit.processes if name == "p2pd"]
    assert len(daemons) >= 5, f"expected the daemons of the bootstrap, 2 servers and the clients: {audit.processes}"
    assert any(s.process == "p2pd" and s.remote for s in audit.sockets), "the audit saw no connection at all"
    assert not audit.outside, "sockets off loopback:\n" + "\n".join(map(str, audit.outside))
