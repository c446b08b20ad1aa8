"""The real default model (SmolLM2-135M-Instruct, 30 blocks) served by real processes: the same
tokens as local transformers, from Python and from the CLI, with and without a killed server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import AutoDistributedModelForCausalLM
from swarm.localswarm import LocalSwarm
from swarm.models.modelpath import resolve_model

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
