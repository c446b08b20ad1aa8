"""Twenty server processes and a bootstrap node on one machine: a client still generates exactly what
the local model does, and the twenty servers (with their libp2p daemons) fit in 8 GiB."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.procs import Memory, tree_memory

pytestmark = pytest.mark.timeout(900)

SERVERS = 20
MEMORY_LIMIT = 8 * 2**30  # bytes of PSS for all the servers' processes together


def spans(count: int, num_blocks: int = 6) -> list[str]:
    """Overlapping spans of 2 or 3 blocks that cover the model many times over."""
    result = []
    for i in range(count):
        length = 3 if i % 4 == 3 else 2
        start = (2 * i) % num_blocks if length == 2 else (i // 4) % (num_blocks - 2)
        result.append(f"{start}:{min(num_blocks, start + length)}")
    return result


def test_twenty_servers_serve_exact_tokens_and_fit_in_8_gib(tiny_models):
    folder = tiny_models["llama"]
    prompt = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(20))
    expected = AutoModelForCausalLM.from_pretrained(folder).eval().generate(prompt, max_new_tokens=10, do_sample=False)

    with LocalSwarm(timeout=600, bootstrap=True, fork=False) as swarm:  # memory of real interpreters
        servers = swarm.start(folder, [(blocks, ("--num-threads", "1")) for blocks in spans(SERVERS)])
        assert len({server.peer_id for server in servers}) == SERVERS
        for push in (False, True):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                str(folder), initial_peers=swarm.bootstrap.maddrs, push=push
            )
            try:
                assert model.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == expected.tolist()
                if not push:  # after serving: the servers' memory with their sessions' caches
                    memory = sum((tree_memory(server.proc.pid) for server in servers), Memory())
            finally:
                model.shutdown()

    assert memory.processes.count("p2pd") == SERVERS  # no helper processes beside server and daemon
    assert len(memory.processes) == 2 * SERVERS
    print(f"{SERVERS} servers hold {memory}")
    assert memory.pss < MEMORY_LIMIT, f"{SERVERS} servers hold {memory}"
