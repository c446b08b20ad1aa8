"""Verification when the honest replicas join a session that began on a cheater alone.

One swarm is shared by the module: a single server of a tiny Llama that adds noise to its outputs from
the third token of the answer on (``tests.swarm.cheater``). Each run starts a client, begins a 60-token
greedy generation, and two honest float32 servers of the same blocks join while it runs. Ten seeded
prompts per setting; in the first run of a setting the replicas are started then (real processes joining
the swarm, found by the client's look-ups); starting servers takes long on a busy machine, so in the
other nine the same replicas, still running, are hidden from the new client (its blocked peers) until
they join. They leave (announcing it) after the setting's runs.

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
JOIN_WAIT = (
    120.0  # wait_for_blocks: how long verify=1 waits for a verifier (starting servers is slow on a busy machine)
)


@pytest.fixture(scope="module")
def lone_cheater(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("joining") / "tiny-llama", "llama", seed=5, std=0.1)
    with LocalSwarm() as swarm:
        entry = ("tests.swarm.cheater", "noise", "0.05", str(CHEAT_START), "--")
        (cheater,) = swarm.start(folder, [(SPAN, ("--dht-prefix", PREFIX, "--num-threads", "1"))], entry=entry)
        yield swarm, folder, cheater, AutoModelForCausalLM.from_pretrained(folder).eval()


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


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
    replicas have joined."""

    def __init__(self, join):
        self.join, self.joined = join, False

    def __call__(self, input_ids, scores):
        if not self.joined:
            self.join()
            self.joined = True
        return scores


def run(swarm, folder, verify: float, seed: int, replicas: list) -> tuple[torch.Tensor, set[str], list]:
    """One answer with the replicas joining during the session: (tokens, the flagged servers, the detections).
    With no ``replicas`` yet, they are started (and added to ``replicas``); otherwise the client does not
    see the running ones until they "join" (its blocked peers until then). verify=1 waits for a verifier
    at the prompt, so they join in the background then; otherwise the generation is held after the prompt
    until they have joined."""
    hidden = [server.peer_id for server in replicas]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder),
        initial_peers=swarm.initial_peers,
        dht_prefix=PREFIX,
        verify=verify,
        wait_for_blocks=JOIN_WAIT,
        blocked_peers=hidden,
    )

    def join() -> None:
        if hidden:
            model.client.config.blocked_peers.clear()
        else:
            replicas.extend(swarm.start(folder, [(SPAN, ("--dht-prefix", PREFIX, "--num-threads", "1"))] * 2))

    try:
        kwargs = dict(max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
        with model.inference_session(max_length=PROMPT + TOKENS) as session:
            session.open()
            if verify >= 1:
                joining = threading.Thread(target=join)
                joining.start()
                try:
                    tokens = model.generate(prompt(seed), session=session, **kwargs)
                finally:
                    joining.join()
            else:
                processors = LogitsProcessorList([JoinAfterPrompt(join)])
                tokens = model.generate(prompt(seed), session=session, logits_processor=processors, **kwargs)
        return tokens, set(model.flagged_servers), model.client.verification.detections
    finally:
        model.shutdown()


@pytest.mark.parametrize("verify", [1.0, None], ids=["verify-1", "verify-default"])
def test_replicas_joining_mid_session(lone_cheater, verify):
    swarm, folder, cheater, local = lone_cheater
    delays, replicas = [], []
    try:
        for seed in range(1000, 1000 + RUNS):
            ids = prompt(seed)
            expected = local.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
            tokens, flagged, detections = run(swarm, folder, 1.0 if verify else 1 / 12, seed, replicas)
            assert torch.equal(tokens, expected), f"seed {seed}: tokens differ from the local model's"
            assert flagged == {cheater.peer_id}, f"seed {seed}: cheater not flagged"
            delays.append(detections[0].position - CHEAT_START)
    finally:
        leave(swarm, replicas)
    print(f"verify={verify}: detection delays {sorted(delays)}, median {statistics.median(delays)}")
    if verify is None:
        assert max(delays) <= 20, delays
