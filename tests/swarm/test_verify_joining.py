"""Verification when the honest replicas join a session that began on a cheater alone.

One swarm is shared by the module: a single server of a tiny Llama that adds noise to its outputs from
the third token of the answer on (``tests.swarm.cheater``). Each run starts a client, begins a 60-token
greedy generation, and two honest float32 servers of the same blocks join while it runs; they leave
(announcing it) at the end of the run. Ten seeded prompts per setting:

- verify=1: the first steps wait for a verifier instead of going unchecked, so the answer is exactly the
  local model's, every time;
- the default verify: the cheater is flagged within 20 tokens of its first wrong output, and the
  answer is still exactly the local model's (the session goes back to the last verified token).
"""

from __future__ import annotations

import signal
import statistics
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.timeout(600)
PREFIX = "verify-joining"
SPAN = "0:6"
PROMPT = 8  # prompt tokens
TOKENS = 60  # new tokens per answer
CHEAT_START = PROMPT + 2  # the cheater's outputs are wrong from this position on (the answer's third token)
RUNS = 10


@pytest.fixture(scope="module")
def lone_cheater(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("joining") / "tiny-llama", "llama", seed=5, std=0.1)
    with LocalSwarm() as swarm:
        entry = ("tests.swarm.cheater", "noise", "0.05", str(CHEAT_START), "--")
        (cheater,) = swarm.start(folder, [(SPAN, ("--dht-prefix", PREFIX, "--num-threads", "1"))], entry=entry)
        yield swarm, folder, cheater, AutoModelForCausalLM.from_pretrained(folder).eval()


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def join_replicas(swarm: LocalSwarm, folder) -> list:
    return swarm.start(folder, [(SPAN, ("--dht-prefix", PREFIX, "--num-threads", "1"))] * 2)


def leave(swarm: LocalSwarm, servers: list) -> None:
    """The replicas leave gracefully (announcing it), so the next run begins on the cheater alone."""
    for server in servers:
        server.signal(signal.SIGTERM)
    for server in servers:
        try:
            server.wait_exit(30)
        finally:
            swarm.servers.remove(server)
            server.kill_group()


class JoinAfterPrompt(LogitsProcessor):
    """Holds the generation after its first step (the prompt, run on the cheater alone) until the honest
    replicas have joined the swarm."""

    def __init__(self, join):
        self.join, self.joined = join, []

    def __call__(self, input_ids, scores):
        if not self.joined:
            self.joined.extend(self.join())
        return scores


def run(swarm, folder, verify: float, seed: int) -> tuple[torch.Tensor, set[str], list, list]:
    """One answer with replicas joining during the session: (tokens, the flagged servers, the detections,
    the replicas). verify=1 waits for a verifier at the prompt, so the replicas start in the background then;
    otherwise the generation is held after the prompt until they are up."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, dht_prefix=PREFIX, verify=verify
    )
    replicas: list = []
    try:
        kwargs = dict(max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
        with model.inference_session(max_length=PROMPT + TOKENS) as session:
            session.open()
            if verify >= 1:
                joining = threading.Thread(target=lambda: replicas.extend(join_replicas(swarm, folder)))
                joining.start()
                try:
                    tokens = model.generate(prompt(seed), session=session, **kwargs)
                finally:
                    joining.join()
            else:
                hold = JoinAfterPrompt(lambda: join_replicas(swarm, folder))
                try:
                    tokens = model.generate(
                        prompt(seed), session=session, logits_processor=LogitsProcessorList([hold]), **kwargs
                    )
                finally:
                    replicas.extend(hold.joined)
        return tokens, set(model.flagged_servers), model.client.verification.detections, replicas
    finally:
        model.shutdown()


@pytest.mark.parametrize("verify", [1.0, None], ids=["verify-1", "verify-default"])
def test_replicas_joining_mid_session(lone_cheater, verify):
    swarm, folder, cheater, local = lone_cheater
    delays = []
    for seed in range(RUNS):
        ids = prompt(1000 + seed)
        expected = local.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
        tokens, flagged, detections, replicas = run(swarm, folder, 1.0 if verify else 1 / 12, 1000 + seed)
        try:
            assert torch.equal(tokens, expected), f"run {seed}: tokens differ from the local model's"
            assert flagged == {cheater.peer_id}, f"run {seed}: cheater not flagged"
            delays.append(detections[0].position - CHEAT_START)
        finally:
            leave(swarm, replicas)
    print(f"verify={verify}: detection delays {sorted(delays)}, median {statistics.median(delays)}")
    if verify is None:
        assert max(delays) <= 20, delays
