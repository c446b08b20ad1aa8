"""Request validation and translation: an OpenAI request body -> ``CompletionRequest`` (token ids, limits,
sampling settings). Pure given a tokenizer. Every refusal is a 400 ``APIError`` naming the parameter:
what this server does not support is refused loudly, never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from client.api.errors import invalid


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy (argmax); otherwise logits / temperature
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seeds this request's own generator; None = a random seed


@dataclass(frozen=True)
class CompletionRequest:
    chat: bool  # /v1/chat/completions (True) or /v1/completions
    prompt_ids: tuple[int, ...]  # the prompt's token ids (after the chat template)
    max_tokens: int  # most tokens to generate
    sampling: Sampling
    stop: tuple[str, ...] = ()  # generation stops before the first of these strings (not returned)
    stream: bool = False  # server-sent events, one chunk per piece of text
    include_usage: bool = False  # streaming: a last chunk with token counts (stream_options.include_usage)


@dataclass(frozen=True)
class Limits:
    model_ids: tuple[str, ...]  # names a request may give as ``model`` (the first is the one shown)
    vocab_size: int  # token ids a prompt may contain: 0 .. vocab_size - 1
    max_prompt_tokens: int
    max_total_tokens: int  # prompt + completion
    default_max_tokens: int


# Parameters of OpenAI's API that would change the output: accepted only at the value that changes nothing.
NEUTRAL = {
    "n": 1,
    "best_of": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "echo": False,
    "suffix": "",
    "tools": [],
    "functions": [],
    "tool_choice": "none",
    "function_call": "none",
    "response_format": {"type": "text"},
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "user"}
CHAT = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
TEXT = COMMON | {"prompt", "logprobs"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: arrays nested too deep
        raise invalid(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def parse_chat(body: dict[str, Any], tokenizer, limits: Limits) -> CompletionRequest:
    """A /v1/chat/completions body -> request (the prompt is the tokenizer's chat template)."""
    _check_names(body, CHAT, limits)
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise invalid("logprobs are not supported by this server.", "logprobs", "unsupported_parameter")
    messages = _messages(body.get("messages"))
    if not getattr(tokenizer, "chat_template", None):
        raise invalid("This model has no chat template: use /v1/completions.", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        raise invalid(f"The model's chat template refused these messages: {exc}", "messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    max_tokens = _optional_int(body, "max_tokens", 1)
    max_completion = _optional_int(body, "max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid("max_tokens and max_completion_tokens differ; give one.", "max_completion_tokens")
    return _request(True, ids, max_completion or max_tokens, body, limits)


def parse_completion(body: dict[str, Any], tokenizer, limits: Limits) -> CompletionRequest:
    """A /v1/completions body -> request (``prompt``: a string, or token ids; one prompt per request)."""
    _check_names(body, TEXT, limits)
    if body.get("logprobs") is not None:
        raise invalid("logprobs are not supported by this server.", "logprobs", "unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        ids = tokenizer(_unicode(prompt, "prompt"))["input_ids"]
    elif isinstance(prompt, list) and prompt and all(_is_int(token) for token in prompt):
        ids = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise invalid("Only one prompt per request is supported.", "prompt", "unsupported_parameter")
    else:
        raise invalid("prompt must be a string or a list of token ids.", "prompt")
    bad = [token for token in ids if not 0 <= token < limits.vocab_size]
    if bad:
        raise invalid(f"prompt has token ids outside the vocabulary (0..{limits.vocab_size - 1}): {bad[:5]}", "prompt")
    return _request(False, ids, _optional_int(body, "max_tokens", 1), body, limits)


def _check_names(body: dict[str, Any], allowed: set[str], limits: Limits) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("You must provide a model parameter.", "model")
    if model not in limits.model_ids:
        raise invalid(
            f"The model `{model}` does not exist; this server serves `{limits.model_ids[0]}`.",
            "model",
            "model_not_found",
        )
    for name, value in body.items():
        if name in allowed or value is None:
            continue
        if name in NEUTRAL:
            if value != NEUTRAL[name] or isinstance(value, bool) != isinstance(NEUTRAL[name], bool):
                raise invalid(
                    f"{name}={json.dumps(value)} is not supported by this server (only {json.dumps(NEUTRAL[name])}).",
                    name,
                    "unsupported_parameter",
                )
            continue
        raise invalid(f"Unrecognized request argument supplied: {name}", name, "unsupported_parameter")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list.", "messages")
    result = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise invalid(f"{param} must be an object with only role and content.", param)
        if not isinstance(message.get("role"), str) or message["role"] not in ROLES:
            raise invalid(f"{param}.role must be one of {sorted(ROLES)}.", f"{param}.role")
        result.append({"role": ROLES[message["role"]], "content": _content(message.get("content"), param)})
    return result


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return _unicode(content, f"{param}.content")
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        if all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            return _unicode("".join(part["text"] for part in content), f"{param}.content")
        raise invalid(f"{param}.content: only text parts are supported.", f"{param}.content", "unsupported_parameter")
    raise invalid(f"{param}.content must be a string or a list of text parts.", f"{param}.content")


def _request(chat: bool, ids: list[int], max_tokens: int | None, body: dict, limits: Limits) -> CompletionRequest:
    prompt = len(ids)
    if prompt == 0:
        raise invalid("The prompt is empty.", "messages" if chat else "prompt")
    if prompt > limits.max_prompt_tokens:
        raise invalid(
            f"This server's maximum prompt length is {limits.max_prompt_tokens} tokens; your prompt has "
            f"{prompt} tokens.",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_total_tokens - prompt)
    if max_tokens < 1 or prompt + max_tokens > limits.max_total_tokens:
        raise invalid(
            f"This model's maximum context length is {limits.max_total_tokens} tokens. However, you "
            f"requested {prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} for the "
            "completion).",
            "max_tokens",
            "context_length_exceeded",
        )
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    if options and not stream:
        raise invalid("stream_options is only allowed when stream is true.", "stream_options")
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise invalid("stream_options supports only include_usage (a boolean).", "stream_options")
    sampling = Sampling(
        temperature=_number(body, "temperature", 1.0, lambda v: 0 <= v <= 2, "between 0 and 2"),
        top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
        seed=_optional_int(body, "seed", -(2**63)),
    )
    return CompletionRequest(
        chat,
        tuple(ids),
        max_tokens,
        sampling,
        _stops(body.get("stop")),
        stream,
        bool(options.get("include_usage", False)),
    )


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise invalid(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them.", "stop")
    return tuple(stops)


def _unicode(text: str, param: str) -> str:
    """``text`` if it is valid Unicode: JSON's escapes can spell lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} is not valid Unicode (it has a lone surrogate).", param) from None
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise invalid(f"{name} must be a {'boolean' if kind is bool else 'JSON ' + kind.__name__}.", name)
    return value


def _optional_int(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not low <= value < 2**64:
        raise invalid(f"{name} must be an integer of at least {low}.", name)
    return value


def _number(body: dict, name: str, default: float, valid: Callable[[float], bool], rule: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
        raise invalid(f"{name} must be a number {rule}.", name)
    return float(value)
