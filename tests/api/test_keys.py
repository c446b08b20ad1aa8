"""API keys, their limits and a fair share of rounds between keys, driven by the official ``openai`` client
against the API started with ``--api-keys`` over the tests' swarm of two real servers."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.api.conftest import openai_client

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-chat"
KEYS = [
    {"key": "sk-alice", "name": "alice", "max_concurrent_requests": 1, "max_prompt_tokens": 60},
    {"key": "sk-carol", "name": "carol", "tokens_per_minute": 50},
    {"key": "sk-flood", "name": "flood"},
    {"key": "sk-solo", "name": "solo"},
    {"key": "sk-admin", "name": "admin", "admin": True},
]


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def keyed(api, chat_model, tmp_path_factory):
    """The URL of an API with keys (one lane, rounds of at most 2 requests while keys share them)."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(KEYS))
    extra = ("--api-keys", str(path), "--wait-for-blocks", "1", "--lanes", "1", "--shared-round-requests", "2")
    process = api.swarm.start_api(chat_model, *extra)
    return process.url


def client(url: str, key: str) -> openai.OpenAI:
    made = openai_client(url)
    return made.with_options(api_key=key)


def test_requests_without_a_valid_key_get_401(keyed):
    for key in ("not-a-key", ""):
        with pytest.raises(openai.AuthenticationError) as error:
            client(keyed, key).chat.completions.create(model=MODEL, messages=messages("hi"), max_tokens=4)
        assert error.value.status_code == 401 and error.value.code == "invalid_api_key"


def test_a_valid_key_gets_exact_tokens(keyed, reference):
    question = messages("What is a key?")
    expected, _ = reference.greedy(reference.chat_ids(question), 12)
    reply = client(keyed, "sk-solo").chat.completions.create(
        model=MODEL, messages=question, max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content == expected


def test_a_prompt_above_the_keys_limit_gets_429_with_retry_after(keyed):
    with pytest.raises(openai.RateLimitError) as error:
        client(keyed, "sk-alice").chat.completions.create(model=MODEL, messages=messages("x" * 80), max_tokens=4)
    assert error.value.code == "prompt_too_large" and int(error.value.response.headers["Retry-After"]) >= 1


def test_a_key_at_its_concurrent_limit_gets_429_until_its_request_ends(keyed):
    alice = client(keyed, "sk-alice")
    stream = alice.chat.completions.create(
        model=MODEL, messages=messages("Count."), max_tokens=40, temperature=0, stream=True
    )
    next(iter(stream))  # the first request is generating
    with pytest.raises(openai.RateLimitError) as error:
        alice.chat.completions.create(model=MODEL, messages=messages("And me?"), max_tokens=4)
    assert error.value.code == "too_many_concurrent_requests" and error.value.response.headers["Retry-After"] == "1"
    client(keyed, "sk-solo").chat.completions.create(model=MODEL, messages=messages("Other key."), max_tokens=4)
    for _ in stream:  # let it finish
        pass
    deadline = time.monotonic() + 30
    while True:  # its slot is given back once its stream ended
        try:
            alice.chat.completions.create(model=MODEL, messages=messages("Now?"), max_tokens=4)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the key's slot was never given back"


def test_a_key_over_its_tokens_per_minute_gets_429_with_the_wait(keyed):
    carol = client(keyed, "sk-carol")
    carol.chat.completions.create(model=MODEL, messages=messages("A question"), max_tokens=40, temperature=0)
    with pytest.raises(openai.RateLimitError) as error:
        carol.chat.completions.create(model=MODEL, messages=messages("Another"), max_tokens=4)
    assert error.value.code == "tokens_per_minute_exceeded"
    assert 1 <= int(error.value.response.headers["Retry-After"]) <= 60


def usage(url: str, key: str) -> dict:
    request = urllib.request.Request(f"{url}/api/v1/usage", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_usage_is_shown_per_key_by_name(keyed):
    client(keyed, "sk-solo").completions.create(model=MODEL, prompt="usage", max_tokens=5, temperature=0)
    everyone = usage(keyed, "sk-admin")
    rows = {row["name"]: row for row in everyone["keys"]}
    assert rows["solo"]["requests"] >= 1 and rows["solo"]["completion_tokens"] >= 5
    assert rows["solo"]["active_requests"] == 0 and "sk-solo" not in json.dumps(everyone)
    assert [row["name"] for row in usage(keyed, "sk-solo")["keys"]] == ["solo"]  # a key sees only its own


def test_one_keys_many_streams_do_not_crowd_another_keys_single_stream(keyed, reference):
    """Rounds of at most 2 requests while keys share them: the single stream is in every round, each of
    the 6 flooding streams in one of 6, so the single stream ends first; every text stays exact."""
    question = "Tell me a long story about a swarm of bees."
    expected, _ = reference.greedy(reference.chat_ids(messages(question)), 30)
    flood, solo = client(keyed, "sk-flood"), client(keyed, "sk-solo")
    finished: dict[str, float] = {}
    started = threading.Barrier(7)

    def ask(name: str, who: openai.OpenAI) -> str:
        stream = who.chat.completions.create(
            model=MODEL, messages=messages(question), max_tokens=30, temperature=0, stream=True
        )
        parts = []
        for index, chunk in enumerate(stream):
            if index == 1:
                started.wait(timeout=60)  # the solo stream begins when all flooding ones generate
            parts.extend(choice.delta.content or "" for choice in chunk.choices)
        finished[name] = time.monotonic()
        return "".join(parts)

    with ThreadPoolExecutor(7) as pool:
        floods = [pool.submit(ask, f"flood{index}", flood) for index in range(6)]
        single = pool.submit(ask, "solo", solo)
        texts = [future.result() for future in [*floods, single]]
    assert texts == [expected] * 7
    assert finished["solo"] < min(finished[f"flood{index}"] for index in range(6))
