"""The OpenAI-compatible API, driven by the official ``openai`` client, over real server processes.

At temperature 0 every text equals local greedy decoding of the same token ids with transformers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.api.conftest import openai_client

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-chat"


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def assert_route(stamen: dict, api) -> None:
    route = [(hop["peer_id"], hop["public_name"], hop["blocks"]) for hop in stamen["route"]]
    assert route == api.route


def test_models_lists_the_served_model(api):
    assert [model.id for model in api.client.models.list()] == [MODEL]


def test_chat_completion_equals_local_greedy(api, reference):
    messages = chat("What is a swarm?")
    expected, tokens = reference.greedy(reference.chat_ids(messages), 20)
    response = api.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)

    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == ("stop" if len(tokens) < 20 else "length")
    prompt = len(reference.chat_ids(messages))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt, len(tokens))
    assert response.usage.total_tokens == prompt + len(tokens)
    assert response.id.startswith("chatcmpl-") and response.model == MODEL
    assert_route(response.model_extra["stamen"], api)


def test_streamed_chat_equals_local_greedy(api, reference):
    messages = chat("Tell me about volunteers.")
    expected, tokens = reference.greedy(reference.chat_ids(messages), 16)
    chunks = list(
        api.client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected
    *_, last, usage = chunks
    assert last.choices[0].finish_reason == ("stop" if len(tokens) < 16 else "length")
    assert_route(last.model_extra["stamen"], api)
    assert usage.choices == [] and usage.usage.completion_tokens == len(tokens)
    assert len({chunk.id for chunk in chunks}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_completion_of_text_and_of_token_ids(api, reference, stream):
    ids = reference.tokenizer("The swarm says")["input_ids"]
    expected, _ = reference.greedy(ids, 12)
    for prompt in ("The swarm says", ids):
        response = api.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=stream
        )
        if stream:
            chunks = list(response)
            assert "".join(chunk.choices[0].text for chunk in chunks) == expected
            assert chunks[-1].choices[0].finish_reason is not None
        else:
            assert response.choices[0].text == expected
            assert response.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(api, reference, stream):
    messages = chat("Where do stop strings go?")
    full, _ = reference.greedy(reference.chat_ids(messages), 24)
    stop = full[6:8]  # its first occurrence may be earlier: the text ends right before that one
    expected = full[: full.index(stop)]
    response = api.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stop=["\u2603 never", stop], stream=stream
    )
    if stream:
        chunks = list(response)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        assert response.choices[0].message.content == expected
        assert response.choices[0].finish_reason == "stop"


def test_sampling_is_reproducible_with_a_seed(api, reference):
    messages = chat("Pick a random word.")

    def sample(seed: int, top_p: float = 1.0) -> str:
        response = api.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=1.0, top_p=top_p, seed=seed
        )
        return response.choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy, _ = reference.greedy(reference.chat_ids(messages), 16)
    assert sample(7, top_p=1e-6) == greedy  # a nucleus of one token: the most likely one


def test_concurrent_requests_are_each_exact(api, reference):
    questions = [f"Question number {index}: {'why ' * index}?" for index in range(8)]

    def ask(index: int) -> str:
        stream = index % 2 == 1
        response = api.client.chat.completions.create(
            model=MODEL, messages=chat(questions[index]), max_tokens=10 + index, temperature=0, stream=stream
        )
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)
        return response.choices[0].message.content

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, range(len(questions))))
    for index, answer in enumerate(answers):
        expected, _ = reference.greedy(reference.chat_ids(chat(questions[index])), 10 + index)
        assert answer == expected, f"request {index}"


BAD_REQUESTS = {
    "unknown model": ({"model": "gpt-4o"}, "model", "model_not_found"),
    "n > 1": ({"n": 2}, "n", "unsupported_parameter"),
    "penalties": ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    "logprobs": ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    "unknown parameter": ({"extra_body": {"mirostat": 2}}, "mirostat", "unsupported_parameter"),
    "prompt too long": ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages", "context_length_exceeded"),
    "context too long": ({"max_tokens": 600}, "max_tokens", "context_length_exceeded"),
    "temperature out of range": ({"temperature": 3}, "temperature", None),
    "image content": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
        "unsupported_parameter",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_unsupported_or_invalid_requests_get_a_400_in_openai_format(api, case):
    changes, param, code = BAD_REQUESTS[case]
    request = {"model": MODEL, "messages": chat("Hello"), "max_tokens": 4, **changes}
    with pytest.raises(openai.BadRequestError) as raised:
        api.client.chat.completions.create(**request)
    error = raised.value.body
    assert raised.value.status_code == 400
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


def test_malformed_json_gets_a_400_in_openai_format(api):
    request = urllib.request.Request(
        f"{api.url}/v1/chat/completions", data=b'{"model": "tiny-chat", "messages": [', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400
    error = json.loads(raised.value.read())["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_chat_page_is_served(api):
    with urllib.request.urlopen(f"{api.url}/", timeout=30) as response:
        page = response.read().decode()
    assert response.headers["Content-Type"].startswith("text/html") and 'id="prompt"' in page


def test_private_mode_api_keeps_the_first_and_last_blocks_and_answers_like_local(api, reference, chat_model):
    """``--local-blocks 1 --local-last-blocks 1``: the API's process runs blocks 0 and 5 itself; the route it
    reports holds only the servers' blocks 1..4, and the answer is still local greedy decoding's."""
    process = api.swarm.start_api(chat_model, "--local-blocks", "1", "--local-last-blocks", "1")
    client = openai_client(process.url)
    try:
        messages = chat("Who sees my prompt?")
        expected, _ = reference.greedy(reference.chat_ids(messages), 16)
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
        assert response.choices[0].message.content == expected
        blocks = [hop["blocks"] for hop in response.model_extra["stamen"]["route"]]
        assert blocks[0].startswith("1:") and blocks[-1].endswith(":5"), blocks
    finally:
        client.close()
        process.kill_group()
