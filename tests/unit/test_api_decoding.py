"""The API's pure parts: request validation and translation, sampling, streamed text and stop strings."""

from __future__ import annotations

import pytest
import torch

from client.api.decoding import TextTracker, held_back, new_generator, sample, stop_at
from client.api.errors import APIError
from client.api.protocol import Limits, Sampling, parse_body, parse_chat, parse_completion

pytestmark = pytest.mark.timeout(60)

LIMITS = Limits(("m", "org/m"), vocab_size=100, max_prompt_tokens=14, max_total_tokens=16, default_max_tokens=4)


class Characters:
    """A tokenizer stand-in: one token per character (its code point), a chat template of role: content."""

    chat_template = "yes"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"{m['role'][0]}:{m['content']};" for m in messages) + ("a:" if add_generation_prompt else "")

    def decode(self, tokens, skip_special_tokens=True) -> str:
        return "".join(chr(t) for t in tokens)


def refused(parse, body: dict) -> APIError:
    with pytest.raises(APIError) as raised:
        parse(body, Characters(), LIMITS)
    assert raised.value.status == 400
    return raised.value


def test_chat_body_becomes_the_templated_prompt_with_its_settings():
    body = {
        "model": "org/m",
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "x"}]}],
        "temperature": 0,
        "top_p": 0.5,
        "seed": 3,
        "stop": "z",
        "max_completion_tokens": 5,
        "n": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "me",
    }
    request = parse_chat(body, Characters(), LIMITS)
    assert request.prompt_ids == tuple(ord(c) for c in "s:x;a:")  # developer is the system role
    assert (request.max_tokens, request.stop, request.stream, request.include_usage) == (5, ("z",), True, True)
    assert request.sampling == Sampling(temperature=0.0, top_p=0.5, seed=3)


def test_completion_takes_text_or_token_ids_and_a_default_max_tokens():
    assert parse_completion({"model": "m", "prompt": "ab"}, Characters(), LIMITS).prompt_ids == (97, 98)
    request = parse_completion({"model": "m", "prompt": [[5, 6, 7]]}, Characters(), LIMITS)
    assert (request.prompt_ids, request.max_tokens, request.sampling.temperature) == ((5, 6, 7), 4, 1.0)
    assert parse_completion({"model": "m", "prompt": list(range(14))}, Characters(), LIMITS).max_tokens == 2


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": "other", "prompt": "a"}, "model", "model_not_found"),
        ({"prompt": "a"}, "model", None),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
        ({"model": "m", "prompt": [100]}, "prompt", None),
        ({"model": "m", "prompt": ""}, "prompt", None),
        ({"model": "m", "prompt": "a" * 15}, "prompt", "context_length_exceeded"),
        ({"model": "m", "prompt": "abc", "max_tokens": 14}, "max_tokens", "context_length_exceeded"),
        ({"model": "m", "prompt": "a", "max_tokens": 0}, "max_tokens", None),
        ({"model": "m", "prompt": "a", "n": 2}, "n", "unsupported_parameter"),
        ({"model": "m", "prompt": "a", "echo": True}, "echo", "unsupported_parameter"),
        ({"model": "m", "prompt": "a", "best_of": True}, "best_of", "unsupported_parameter"),
        ({"model": "m", "prompt": "a", "logprobs": 0}, "logprobs", "unsupported_parameter"),
        ({"model": "m", "prompt": "a", "top_k": 5}, "top_k", "unsupported_parameter"),
        ({"model": "m", "prompt": "a", "top_p": 0}, "top_p", None),
        ({"model": "m", "prompt": "a", "temperature": "hot"}, "temperature", None),
        ({"model": "m", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"model": "m", "prompt": "a", "stop": [""]}, "stop", None),
        ({"model": "m", "prompt": "a", "seed": 1.5}, "seed", None),
        ({"model": "m", "prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", None),
    ],
)
def test_completion_requests_we_do_not_serve_are_refused_naming_the_parameter(body, param, code):
    error = refused(parse_completion, body)
    assert (error.param, error.code) == (param, code)
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": "x", "name": "n"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        [{"role": "user"}],
    ],
)
def test_chat_messages_we_cannot_template_are_refused(messages):
    assert refused(parse_chat, {"model": "m", "messages": messages}).param.startswith("messages")


def test_malformed_bodies_are_refused():
    for raw in (b"{", b"[1]", b"\xff"):
        with pytest.raises(APIError):
            parse_body(raw)


def test_greedy_top_p_and_seeded_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(logits, Sampling(temperature=0), new_generator(None)) == 1
    assert sample(logits, Sampling(temperature=1, top_p=1e-6), new_generator(None)) == 1
    nucleus = {sample(logits, Sampling(temperature=1, top_p=0.6), new_generator(seed)) for seed in range(50)}
    assert nucleus == {1, 3}  # the two most likely tokens hold over 60% together
    draws = [[sample(logits, Sampling(1.0), generator) for _ in range(20)] for generator in map(new_generator, [4, 4])]
    assert draws[0] == draws[1]


def test_stop_strings_and_held_back_text():
    assert stop_at("hello world", ("wor", "lo")) == 3
    assert stop_at("hello", ("x",)) is None
    assert held_back("say sto", ("stop",)) == 3
    assert held_back("say st\ufffd", ("stop",)) == 1
    assert held_back("abc", ("x", "cd")) == 1


def test_text_tracker_streams_pieces_that_add_up_to_the_text_cut_at_the_stop_string():
    tracker = TextTracker(Characters().decode, ("END",), frozenset([0]), max_tokens=50)
    pieces = [tracker.add(ord(c)) for c in "ab EN"]
    assert "".join(pieces) == "ab " and tracker.finish_reason is None  # "EN" may start the stop string
    pieces.append(tracker.add(ord("D")))
    assert "".join(pieces) == tracker.text == "ab " and tracker.finish_reason == "stop"


def test_text_tracker_finishes_at_eos_or_max_tokens():
    eos = TextTracker(Characters().decode, (), frozenset([0]), max_tokens=5)
    assert [eos.add(t) for t in (104, 105, 0)] == ["h", "i", ""] and (eos.text, eos.finish_reason) == ("hi", "stop")
    length = TextTracker(Characters().decode, ("x",), frozenset([0]), max_tokens=2)
    assert length.add(104) == "h" and length.add(105) == "i" and length.finish_reason == "length"
