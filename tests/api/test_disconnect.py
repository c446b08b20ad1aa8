"""A client that goes away mid-stream frees its session on every server; missing blocks give a 503.

Servers here are slow on purpose (``--test-step-delay``) and have a KV budget for one request at a time,
so a stream is still generating when its client leaves, and a leaked session would block the next one.
"""

from __future__ import annotations

import signal
import time

import openai
import pytest

from client import AutoDistributedModelForCausalLM
from swarm.net.rpc import call_info
from swarm.tools.localswarm import LocalSwarm

from .conftest import openai_client

pytestmark = pytest.mark.timeout(300)

BUDGET = 160  # KV tokens per server: one request of prompt + max_tokens = 120, never two
STEP_DELAY = 0.1  # seconds per step and server: 100 tokens take 20 s, so a stream is cut long before its end
MAX_TOKENS = 100


@pytest.fixture(scope="module")
def slow_swarm(chat_model):
    extra = ("--cache-tokens", str(BUDGET), "--test-step-delay", str(STEP_DELAY))
    with LocalSwarm() as swarm:
        swarm.start(chat_model, [("0:3", extra), ("3:6", extra)])
        api = swarm.start_api(chat_model, "--wait-for-blocks", "1")
        client = openai_client(api.url)
        observer = AutoDistributedModelForCausalLM.from_pretrained(str(chat_model), initial_peers=swarm.initial_peers)
        try:
            yield swarm, client, observer
        finally:
            client.close()
            observer.shutdown()


def free_cache(observer, swarm) -> list[int]:
    """Each server's free KV budget, asked from the server itself (not its DHT record, refreshed slowly)."""
    client = observer.client
    return [
        observer.client.loop.run(call_info(client.p2p, server.peer_id, 10.0)).cache_tokens_left
        for server in swarm.live()
    ]


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)  # polling interval, bounded by the deadline
    return condition()


def stream(client: openai.OpenAI, question: str):
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )


def test_a_client_leaving_mid_stream_frees_its_session_on_every_server(slow_swarm):
    swarm, client, observer = slow_swarm
    assert free_cache(observer, swarm) == [BUDGET, BUDGET]
    chunks = stream(client, "Talk for a long time.")
    received = [next(chunks) for _ in range(3)]  # the role, then two pieces of text
    assert all(chunk.choices[0].finish_reason is None for chunk in received)
    held = free_cache(observer, swarm)
    assert all(free < BUDGET for free in held), held  # the session holds its cache on both servers
    cut = time.monotonic()
    chunks.close()  # the HTTP connection goes away mid-stream

    assert wait_for(lambda: free_cache(observer, swarm) == [BUDGET, BUDGET], timeout=15), free_cache(observer, swarm)
    assert time.monotonic() - cut < MAX_TOKENS * STEP_DELAY  # freed long before the stream would have ended

    again = stream(client, "And now?")  # needs the whole budget again: it opens at once
    assert next(again).choices[0].delta.role == "assistant"
    assert next(again).choices[0].delta.content
    again.close()
    assert wait_for(lambda: free_cache(observer, swarm) == [BUDGET, BUDGET], timeout=15)


def test_missing_blocks_give_a_503_naming_them(slow_swarm):
    swarm, client, _ = slow_swarm
    last = swarm.live("3:6")[0]
    last.signal(signal.SIGTERM)  # it announces itself offline and leaves
    last.wait_exit(timeout=30)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert raised.value.status_code == 503
    error = raised.value.body
    assert error["code"] == "missing_blocks" and "3:6" in error["message"]
