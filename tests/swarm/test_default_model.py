"""The real default model (SmolLM2-135M-Instruct, 30 blocks) served by 2 processes answers like local."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import AutoDistributedModelForCausalLM
from swarm.localswarm import LocalSwarm
from swarm.modelpath import resolve_model

pytestmark = pytest.mark.timeout(400)


def test_capital_of_france_matches_local():
    folder = resolve_model(None)  # converts the GGUF once per machine, cached afterwards
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = local.generate(**inputs, max_new_tokens=12, do_sample=False)

    with LocalSwarm(timeout=300) as swarm:
        swarm.start("SmolLM2-135M-Instruct", [("0:15", ()), ("12:30", ())])  # overlapping spans
        model = AutoDistributedModelForCausalLM.from_pretrained(None, initial_peers=swarm.initial_peers)
        try:
            actual = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        finally:
            model.shutdown()

    assert actual.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(actual[0, inputs["input_ids"].shape[1] :])
