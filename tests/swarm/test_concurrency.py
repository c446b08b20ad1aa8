"""Many users at once: threads sharing one model object each get exactly the local model's tokens."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)
THREADS = 8


@pytest.fixture(scope="module")
def shared_model(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        swarm.start(folder, [("0:3", ()), ("3:6", ())])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        try:
            yield model, AutoModelForCausalLM.from_pretrained(folder).eval()
        finally:
            model.shutdown()


def run_threads(target, count: int) -> list:
    results, errors = [None] * count, []

    def run(index: int) -> None:
        try:
            results[index] = target(index)
        except Exception as exc:  # reported below, with the thread it happened in
            errors.append((index, exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads), "a generation did not finish"
    assert not errors, errors
    return results


def prompt(index: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, 4 + index), generator=torch.Generator().manual_seed(100 + index))


def test_threads_generating_on_one_model_each_get_the_local_tokens(shared_model):
    model, local = shared_model
    got = run_threads(lambda i: model.generate(prompt(i), max_new_tokens=12 + i % 3, do_sample=False), THREADS)
    for index, tokens in enumerate(got):
        expected = local.generate(prompt(index), max_new_tokens=12 + index % 3, do_sample=False)
        assert tokens.tolist() == expected.tolist(), f"thread {index}"


def test_threads_in_their_own_inference_sessions_never_see_each_other(shared_model):
    model, local = shared_model

    def chat(index: int):
        follow_up = torch.randint(3, 256, (1, 3), generator=torch.Generator().manual_seed(200 + index))
        with model.inference_session(max_length=64) as session:
            first = model.generate(prompt(index), max_new_tokens=6, do_sample=False)
            history = torch.cat([first, follow_up], dim=1)  # a mask, or a generated pad token would count as padding
            second = model.generate(history, attention_mask=torch.ones_like(history), max_new_tokens=6, do_sample=False)
            return first, second, session.position, follow_up

    for index, (first, second, position, follow_up) in enumerate(run_threads(chat, THREADS)):
        expected_first = local.generate(prompt(index), max_new_tokens=6, do_sample=False)
        history = torch.cat([expected_first, follow_up], dim=1)
        assert first.tolist() == expected_first.tolist(), f"thread {index}"
        mask = torch.ones_like(history)
        assert (
            second.tolist() == local.generate(history, attention_mask=mask, max_new_tokens=6, do_sample=False).tolist()
        )
        assert position == history.shape[1] + 5  # this thread's session held only this thread's tokens
