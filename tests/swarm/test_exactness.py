"""The core promise: the swarm computes exactly what the local transformers model computes.

Real server processes on 127.0.0.1 serve tiny random Llama, Mistral and Qwen2 models, split over 2
servers and over 3 servers with overlapping spans (each split under its own DHT prefix in one swarm).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)

SPLITS = {
    "two": ["0:3", "3:6"],
    "three-overlapping": ["0:3", "2:5", "4:6"],  # the client runs 0:3, 3:5, 5:6
}


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def family_swarm(request, tiny_models):
    family = request.param
    folder = tiny_models[family]
    specs = [(blocks, ("--dht-prefix", f"{family}-{split}")) for split, spans in SPLITS.items() for blocks in spans]
    with LocalSwarm() as swarm:
        swarm.start(folder, specs)
        local = AutoModelForCausalLM.from_pretrained(folder).eval()
        models = {
            split: AutoDistributedModelForCausalLM.from_pretrained(
                str(folder), initial_peers=swarm.initial_peers, dht_prefix=f"{family}-{split}"
            )
            for split in SPLITS
        }
        models["push"] = AutoDistributedModelForCausalLM.from_pretrained(  # servers push to the next server
            str(folder), initial_peers=swarm.initial_peers, dht_prefix=f"{family}-three-overlapping", push=True
        )
        try:
            yield family, local, models
        finally:
            for model in models.values():
                model.shutdown()


@pytest.mark.parametrize("split", [*SPLITS, "push"])
def test_greedy_tokens_and_logits_match_local(family_swarm, split):
    family, local, models = family_swarm
    model = models[split]
    prompt = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))

    expected = local.generate(
        prompt, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    actual = model.generate(
        prompt, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True
    )

    assert actual.sequences.tolist() == expected.sequences.tolist()
    for got, want in zip(actual.logits, expected.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("split", list(SPLITS))
def test_stateless_forward_logits_match_local(family_swarm, split):
    _, local, models = family_swarm
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(models[split](ids).logits, local(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("split", ["three-overlapping", "push"])
def test_padded_batch_matches_local(family_swarm, split):
    _, local, models = family_swarm
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as transformers pads prompts of different lengths for generation
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)

    expected = local.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    actual = models[split].generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert actual.tolist() == expected.tolist()


def test_sampling_with_seed_matches_local(family_swarm):
    _, local, models = family_swarm
    prompt = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(123)
    expected = local.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(123)
    actual = models["two"].generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8)
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("split", ["three-overlapping", "push"])
def test_chat_session_across_generate_calls(family_swarm, split):
    """One server-side session across several generate calls gives what local generation gives."""
    _, local, models = family_swarm
    model = models[split]
    turn1 = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    turn2 = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(6))

    with model.inference_session(max_length=64) as session:
        reply1 = model.generate(turn1, max_new_tokens=8, do_sample=False)
        history = torch.cat([reply1, turn2], dim=1)
        reply2 = model.generate(history, max_new_tokens=8, do_sample=False)
        assert session.position == history.shape[1] + 7  # the last generated token is not fed yet
        # spans 0:3, 2:5 and 4:6 overlap: three hops, each a part of its server's span, covering 0:6 once
        hops = [(hop.span.start, hop.span.end) for hop in session.route]
        assert len(hops) == 3 and hops[0][0] == 0 and hops[-1][1] == 6
        assert all(a[1] == b[0] for a, b in zip(hops, hops[1:], strict=False))
        assert all(any(s <= start and end <= e for s, e in [(0, 3), (2, 5), (4, 6)]) for start, end in hops)
        assert session.relayed == 0  # with push on, every server handed its output to the next one

    expected1 = local.generate(turn1, max_new_tokens=8, do_sample=False)
    expected2 = local.generate(torch.cat([expected1, turn2], dim=1), max_new_tokens=8, do_sample=False)
    assert reply1.tolist() == expected1.tolist()
    assert reply2.tolist() == expected2.tolist()


def test_generation_stops_at_eos_like_local(family_swarm):
    _, local, models = family_swarm
    prompt = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(7))
    free_run = local.generate(prompt, max_new_tokens=12, do_sample=False)
    eos = int(free_run[0, 8 + 4])  # make the 5th generated token the end of sequence
    expected = local.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    actual = models["two"].generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert actual.tolist() == expected.tolist()
    assert actual.shape[1] <= 8 + 5
