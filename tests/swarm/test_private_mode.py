"""Private mode (``ClientConfig.local_blocks``, ``local_last_blocks``): the client runs the model's first and
last blocks itself, servers only the blocks between, and every result stays the local model's.

Real server processes serve blocks 1:5 of a tiny random 6-block Llama (two chains: 1:3 + 3:5, and 1:5); no
server holds block 0 or block 5. Checked against local transformers: greedy, beam and padded-batch
generation, a rewound session, what the first server receives (the output of block 0, not the
embeddings), training (loss, hidden states, input and LoRA gradients, also of the local blocks), and a
server killed during generation.
"""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.references import copies, lora_hooks
from tests.swarm.test_failover import KillAtToken

pytestmark = pytest.mark.timeout(300)
CLOSE = dict(rtol=0, atol=1e-4)
GRADS = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def swarm_of_private(tiny_models):
    with LocalSwarm() as swarm:
        swarm.start(tiny_models["llama"], [("1:3", ()), ("3:5", ()), ("1:5", ())])
        yield swarm


@pytest.fixture(scope="module")
def private(tiny_models, swarm_of_private):
    folder = tiny_models["llama"]
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm_of_private.initial_peers, local_blocks=1, local_last_blocks=1
    )
    try:
        yield local, model
    finally:
        model.shutdown()


def test_generation_matches_local_with_no_server_for_the_first_and_last_blocks(private):
    local, model = private
    prompt = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    expected = local.generate(prompt, max_new_tokens=12, do_sample=False)
    assert model.generate(prompt, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()

    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert model.generate(prompt, **beams).tolist() == local.generate(prompt, **beams).tolist()

    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generate expects
    ids = ids.masked_fill(mask == 0, 0)
    padded = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **padded).tolist() == local.generate(ids, **padded).tolist()


def test_the_first_server_receives_the_output_of_the_local_blocks_not_the_embeddings(private):
    local, model = private
    prompt = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        states = local(prompt, output_hidden_states=True).hidden_states
    with model.inference_session(max_length=16) as session:
        model.generate(prompt, max_new_tokens=1, do_sample=False, session=session)
        assert [hop.span.start for hop in session.route][0] == 1 and session.route[-1].span.end == 5
        sent = session.hops[0].history[0].hidden  # what the first server got for the prompt
    torch.testing.assert_close(sent, states[1], **CLOSE)  # depth 1: the output of block 0
    assert not torch.allclose(sent, states[0], atol=1e-2)


def test_a_rewound_session_goes_on_like_local(private):
    local, model = private
    prompt = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    expected = local.generate(prompt, max_new_tokens=10, do_sample=False)
    with model.inference_session(max_length=32) as session:
        first = model.generate(prompt, max_new_tokens=10, do_sample=False, session=session)
        assert first.tolist() == expected.tolist()
        session.rewind(11)  # back to the prompt and 3 generated tokens: the client's own caches too
        again = model.generate(first[:, :12], max_new_tokens=6, do_sample=False, session=session)  # token 11 is new
    assert again.tolist() == expected.tolist()


def test_training_through_local_and_remote_blocks_matches_local(private):
    local, model = private
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    embeds = local.model.embed_tokens(ids).detach()
    x_remote, x_local = copies([embeds, embeds])
    out = model(inputs_embeds=x_remote, attention_mask=mask, labels=labels, output_hidden_states=True)
    ref = local(inputs_embeds=x_local, attention_mask=mask, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.loss, ref.loss, **CLOSE)
    assert len(out.hidden_states) == len(ref.hidden_states) == 7
    for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(got, want, **CLOSE)
    (out.loss + out.hidden_states[1].square().mean()).backward()  # through block 0, run by the client
    (ref.loss + ref.hidden_states[1].square().mean()).backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, **GRADS)


def test_lora_gradients_of_local_and_remote_blocks_match_local(tiny_models, private, swarm_of_private):
    local, _ = private
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_models["llama"]), initial_peers=swarm_of_private.initial_peers, local_blocks=1, local_last_blocks=1
    )
    try:
        lora = model.add_lora(rank=4, alpha=8, target_modules=("q_proj", "down_proj"))
        generator = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for param in lora.parameters():
                param.normal_(0, 0.2, generator=generator)
        adapter, params = lora.adapter(model.model.layers.span)
        local_params = copies(params)
        weights = {key: (local_params[2 * i], local_params[2 * i + 1]) for i, key in enumerate(adapter.weights)}
        ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(7))
        out = model(ids, labels=ids)
        out.loss.backward()
        with lora_hooks(local, weights, adapter.scaling):
            ref = local(ids, labels=ids)
            ref.loss.backward()
            expected = local.generate(ids[:1, :5], max_new_tokens=8, do_sample=False)
        torch.testing.assert_close(out.loss, ref.loss, **CLOSE)
        for param, local_param in zip(params, local_params, strict=True):
            torch.testing.assert_close(param.grad, local_param.grad, **GRADS)
        assert all(param.grad.abs().sum() > 0 for param in params)  # blocks 0 and 5 (the client's) included
        assert model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
    finally:
        model.shutdown()


def test_local_blocks_must_leave_servers_some_blocks(tiny_models):
    with pytest.raises(ValueError, match="at least one"):
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_models["llama"]), local_blocks=4, local_last_blocks=2)


def test_a_killed_server_does_not_change_the_tokens(private, swarm_of_private):
    """Last in this file: it kills one of the swarm's servers."""
    local, model = private
    prompt = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(8))
    expected = local.generate(prompt, max_new_tokens=12, do_sample=False)
    with model.inference_session(max_length=32) as session:
        session.open(batch_size=1)
        killer = KillAtToken(swarm_of_private, session, 0, 4)
        actual = model.generate(prompt, max_new_tokens=12, do_sample=False, streamer=killer)
        assert killer.victim is not None and killer.victim.proc.wait(timeout=10) == -signal.SIGKILL
        assert killer.victim.peer_id not in [hop.peer_id for hop in session.route]
    assert actual.tolist() == expected.tolist()
