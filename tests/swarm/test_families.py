"""Every supported family over real servers: the swarm generates exactly what local transformers generates.

One swarm per tiny model (4 layers) with four servers: A 0:2, B 2:4, C 1:3, D 3:4. Clients choose their
servers with ``allowed_peers``: A, B is a split over 2 servers; A, C, D a split over 3 servers with
overlapping spans (C runs only its block 2). A client free to use all four then loses the last server of
its chain to SIGKILL mid-generation: the others cover its blocks (B, or C and D), the client replays the
session into them, and the tokens do not change. Llama, Mistral and Qwen2 have their own, longer suite
(``test_exactness``, ``test_failover``); ``tests/unit/test_families.py`` runs every tiny model, Falcon's
multi-query variant included, through the server's block stacks in process.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)

FAMILIES = [
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "mixtral",
    "qwen2_moe",
    "bloom",
    "falcon-new",  # new decoder architecture (grouped kv heads, rotary)
    "falcon-alibi",  # original architecture with ALiBi; falcon-mq (multi-query, rotary) runs in process only
]
SPANS = ["0:2", "2:4", "1:3", "3:4"]  # servers A, B, C, D


@pytest.fixture(scope="module", params=FAMILIES)
def family_swarm(request, tiny_models):
    folder = tiny_models[request.param]
    with LocalSwarm() as swarm:
        servers = swarm.start(folder, [(span, ("--dht-prefix", request.param)) for span in SPANS])
        a, b, c, d = (server.peer_id for server in servers)
        local = AutoModelForCausalLM.from_pretrained(folder).eval()
        options = dict(initial_peers=swarm.initial_peers, dht_prefix=request.param)
        models = {
            "two": AutoDistributedModelForCausalLM.from_pretrained(str(folder), allowed_peers=[a, b], **options),
            "three": AutoDistributedModelForCausalLM.from_pretrained(str(folder), allowed_peers=[a, c, d], **options),
            "free": AutoDistributedModelForCausalLM.from_pretrained(str(folder), update_period=0.5, **options),
        }
        try:
            yield swarm, local, models
        finally:
            for model in models.values():
                model.shutdown()


def greedy(model, prompt, **options):
    """14 greedy tokens (no early end of sequence, so a kill at token 5 always happens) and their logits."""
    options = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False, output_logits=True, **options)
    return model.generate(prompt, return_dict_in_generate=True, **options)


def assert_same(actual, expected):
    assert actual.sequences.tolist() == expected.sequences.tolist()
    for got, want in zip(actual.logits, expected.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("split", ["two", "three"])
def test_greedy_tokens_and_logits_match_local(family_swarm, split):
    _, local, models = family_swarm
    model = models[split]
    prompt = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with model.inference_session(max_length=24) as session:
        actual = greedy(model, prompt)
        hops = [(hop.span.start, hop.span.end) for hop in session.route]
        peers = {hop.peer_id for hop in session.route}
    assert hops[0][0] == 0 and hops[-1][1] == 4 and all(x[1] == y[0] for x, y in zip(hops, hops[1:], strict=False))
    assert len(hops) == len(peers) == len(model.client.config.allowed_peers)  # every allowed server, once
    assert_same(actual, greedy(local, prompt))


@pytest.mark.parametrize("split", ["two", "three"])
def test_left_padded_batch_matches_local(family_swarm, split):
    _, local, models = family_swarm
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as transformers pads prompts of different lengths for generation
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert models[split].generate(ids, **options).tolist() == local.generate(ids, **options).tolist()


class KillLastHop:
    """A generate() streamer that SIGKILLs the server of the chain's last hop when token ``at`` arrives."""

    def __init__(self, swarm: LocalSwarm, session, at: int):
        self.swarm, self.session, self.at = swarm, session, at
        self.calls, self.victim = 0, None

    def put(self, value) -> None:
        if self.calls == self.at and self.victim is None:
            self.victim = self.swarm.by_peer(self.session.route[-1].peer_id)
            os.kill(self.victim.proc.pid, signal.SIGKILL)
        self.calls += 1

    def end(self) -> None:
        pass


def test_killed_server_is_replaced_by_replay_without_changing_tokens(family_swarm):
    """Last in the module: it leaves the swarm one server short."""
    swarm, local, models = family_swarm
    prompt = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    model = models["free"]
    with model.inference_session(max_length=24) as session:
        session.open(batch_size=1)
        killer = KillLastHop(swarm, session, at=5)
        actual = greedy(model, prompt, streamer=killer)
        assert killer.victim is not None and killer.victim.proc.wait(timeout=10) == -signal.SIGKILL
        assert killer.victim.peer_id not in [hop.peer_id for hop in session.route]
    assert_same(actual, greedy(local, prompt))
