"""The real default model (SmolLM2-135M-Instruct, 30 blocks) served by real processes: the same
tokens as local transformers, from Python and from the CLI, with and without a killed server;
and the same loss, hidden states and gradients (inputs, deep prompts, LoRA) when training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import AutoDistributedModelForCausalLM
from swarm.models.modelpath import resolve_model
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.references import deep_prompt_hooks, lora_hooks

pytestmark = pytest.mark.timeout(400)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def default_swarm():
    folder = resolve_model(None)  # converts the GGUF once per machine, cached afterwards
    tokenizer = AutoTokenizer.from_pretrained(folder)
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    with LocalSwarm(timeout=300) as swarm:
        swarm.start(None, [("0:15", ()), ("12:30", ()), ("15:30", ())])  # overlapping spans, a replica
        model = AutoDistributedModelForCausalLM.from_pretrained(None, initial_peers=swarm.initial_peers)
        try:
            yield swarm, model, local, tokenizer
        finally:
            model.shutdown()


def test_capital_of_france_matches_local(default_swarm):
    _, model, local, tokenizer = default_swarm
    inputs = tokenizer(PROMPT, return_tensors="pt")
    expected = local.generate(**inputs, max_new_tokens=12, do_sample=False)
    actual = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert actual.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(actual[0, inputs["input_ids"].shape[1] :])


def test_client_cli_streams_the_completion(default_swarm):
    swarm, _, local, tokenizer = default_swarm
    inputs = tokenizer(PROMPT, return_tensors="pt")
    expected = local.generate(**inputs, max_new_tokens=8, do_sample=False)
    command = [sys.executable, "-m", "client", "--initial-peers", *swarm.initial_peers, "--max-new-tokens", "8"]
    result = subprocess.run(command + [PROMPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == tokenizer.decode(expected[0], skip_special_tokens=True).strip()


def test_killed_server_does_not_change_the_answer(default_swarm):
    swarm, model, local, tokenizer = default_swarm
    inputs = tokenizer("Here is a short story about a lighthouse keeper:", return_tensors="pt")
    expected = local.generate(**inputs, max_new_tokens=20, do_sample=False)

    class KillSecondHop:
        calls, victim = 0, None

        def put(self, value):
            if self.calls == 6:
                self.victim = swarm.by_peer(session.route[-1].peer_id)
                os.kill(self.victim.proc.pid, signal.SIGKILL)
            self.calls += 1

        def end(self):
            pass

    killer = KillSecondHop()
    with model.inference_session(max_length=64) as session:
        session.open(batch_size=1)
        actual = model.generate(**inputs, max_new_tokens=20, do_sample=False, streamer=killer)
        assert killer.victim.peer_id not in [hop.peer_id for hop in session.route]
    assert actual.tolist() == expected.tolist()


def test_training_through_the_swarm_matches_local(default_swarm):
    """Loss, hidden states and gradients w.r.t. inputs, deep prompts and LoRA weights of the real model."""
    swarm, _, local, tokenizer = default_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        None, initial_peers=swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=2
    )
    try:
        tuning, lora = model.model.prompt_tuning, model.add_lora(rank=4, alpha=8)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in [tuning.deep, *lora.parameters()]:
                param.normal_(0, 0.02, generator=generator)
        texts = ["The lighthouse keeper climbed the stairs", "Paris is the capital of"]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        embeds = local.model.embed_tokens(batch["input_ids"]).detach()
        x_remote, x_local = (embeds.clone().requires_grad_() for _ in range(2))
        out = model(
            inputs_embeds=x_remote, attention_mask=batch["attention_mask"], labels=labels, output_hidden_states=True
        )
        out.loss.backward()

        adapter, params = lora.adapter(model.model.layers.span)
        local_params = [p.detach().clone().requires_grad_() for p in params]
        weights = {key: (local_params[2 * i], local_params[2 * i + 1]) for i, key in enumerate(adapter.weights)}
        prefix, deep = (t.detach().clone().requires_grad_() for t in (tuning.prefix, tuning.deep))
        mask = torch.cat([torch.ones(2, 2, dtype=torch.long), batch["attention_mask"]], dim=1)
        with lora_hooks(local, weights, adapter.scaling), deep_prompt_hooks(local, deep):
            inputs = torch.cat([prefix.expand(2, -1, -1), x_local], dim=1)
            ref = local(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True)
        logits = ref.logits[:, 2:].contiguous()
        ref_loss = local.loss_function(logits=logits, labels=labels, vocab_size=local.config.vocab_size)
        ref_loss.backward()

        torch.testing.assert_close(out.loss, ref_loss, rtol=0, atol=1e-4)
        assert len(out.hidden_states) == 31
        for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
            torch.testing.assert_close(got, want[:, 2:], rtol=1e-4, atol=1e-4)
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_remote.grad, x_local.grad, **close)
        torch.testing.assert_close(tuning.prefix.grad, prefix.grad, **close)
        torch.testing.assert_close(tuning.deep.grad, deep.grad, **close)
        for param, local_param in zip(params, local_params, strict=True):
            torch.testing.assert_close(param.grad, local_param.grad, **close)
    finally:
        model.shutdown()
