"""API keys, their limits and usage, and a fair share of each round between keys (pure decisions).

``--api-keys FILE`` is a JSON list of keys::

    [{"key": "sk-alice-...", "name": "alice", "max_concurrent_requests": 4, "tokens_per_minute": 20000,
      "max_prompt_tokens": 1024, "weight": 1, "admin": false}, ...]

Only ``key`` and ``name`` are required; a limit left out (or 0) is no limit beyond the API's own. With keys,
a request without a valid ``Authorization: Bearer KEY`` gets 401; without keys, every request is served
as one anonymous key. ``Limiter.admit`` answers 429 with Retry-After when a key has its concurrent
requests generating, would pass its tokens per minute (prompt and completion tokens of the last 60 s,
counted as they are used), or sends a prompt above its limit.

``fair_pick`` chooses the requests a round steps when several keys have requests in it: each time the
next request of the key with the fewest steps (over its weight), and within a key the one that waited
longest, up to the round's room; so one key's 16 streams share a round with another key's single stream
instead of crowding it. Concurrency: used on the client's event loop only.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from client.api.errors import APIError

WINDOW = 60.0  # seconds of the tokens-per-minute window
ANONYMOUS = ""  # the key of every request when the API has no keys
T = TypeVar("T")


@dataclass(frozen=True)
class APIKey:
    key: str  # the secret a client sends as ``Authorization: Bearer KEY``
    name: str  # shown in usage (the secret never is)
    max_concurrent_requests: int = 0  # requests of this key generating at once (0: only the API's limit)
    tokens_per_minute: int = 0  # prompt + completion tokens of this key within any 60 s (0: no limit)
    max_prompt_tokens: int = 0  # longest prompt of this key, in tokens (0: only the API's limit)
    weight: float = 1.0  # its share of a round shared with other keys
    admin: bool = False  # may read every key's usage (GET /api/v1/usage)


def load_keys(path: str) -> dict[str, APIKey]:
    """The keys in ``path`` (see the module docstring), by secret; ValueError names what is wrong."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--api-keys {path}: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--api-keys {path}: expected a non-empty JSON list of keys")
    keys: dict[str, APIKey] = {}
    for index, entry in enumerate(entries):
        try:
            api_key = APIKey(**entry)
        except TypeError as exc:
            raise ValueError(f"--api-keys {path}: entry {index}: {exc}") from None
        limits = (api_key.max_concurrent_requests, api_key.tokens_per_minute, api_key.max_prompt_tokens)
        if not (isinstance(api_key.key, str) and api_key.key and isinstance(api_key.name, str) and api_key.name):
            raise ValueError(f"--api-keys {path}: entry {index}: key and name must be non-empty strings")
        if not all(isinstance(limit, int) and limit >= 0 for limit in limits) or not api_key.weight > 0:
            raise ValueError(f"--api-keys {path}: entry {index}: limits must be integers >= 0 and weight above 0")
        if api_key.key in keys or api_key.name in {k.name for k in keys.values()}:
            raise ValueError(f"--api-keys {path}: entry {index}: duplicate key or name")
        keys[api_key.key] = api_key
    return keys


def bearer(header: str | None) -> str | None:
    """The key in an ``Authorization: Bearer KEY`` header, or None."""
    scheme, _, token = (header or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def rate_limited(message: str, retry_after: float, code: str) -> APIError:
    error = APIError(429, message, "rate_limit_error", None, code)
    error.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return error


class Usage:
    """One key's usage: requests generating now, tokens within the window, and totals."""

    def __init__(self, name: str):
        self.name = name
        self.active = 0  # requests generating now
        self.requests = 0  # requests admitted so far
        self.refused = 0  # requests answered 429
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.recent: deque[tuple[float, int]] = deque()  # (when, tokens) within the window

    def recent_tokens(self, now: float) -> int:
        while self.recent and now - self.recent[0][0] >= WINDOW:
            self.recent.popleft()
        return sum(tokens for _, tokens in self.recent)

    def use(self, tokens: int, now: float, prompt: bool = False) -> None:
        if prompt:
            self.prompt_tokens += tokens
        else:
            self.completion_tokens += tokens
        if self.recent and self.recent[-1][0] == now:
            self.recent[-1] = (now, self.recent[-1][1] + tokens)
        else:
            self.recent.append((now, tokens))

    def retry_after(self, limit: int, wanted: int, now: float) -> float:
        """Seconds until ``wanted`` more tokens fit under ``limit`` in the window (0: they fit now)."""
        used = self.recent_tokens(now)
        for when, tokens in self.recent:
            if used + wanted <= limit:
                break
            used -= tokens
            if used + wanted <= limit:
                return when + WINDOW - now
        return 0.0 if used + wanted <= limit else WINDOW

    def report(self, now: float) -> dict:
        return {
            "name": self.name,
            "active_requests": self.active,
            "requests": self.requests,
            "refused": self.refused,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_last_minute": self.recent_tokens(now),
        }


class Limiter:
    """Authentication and per-key limits; ``usage`` is kept per key name."""

    def __init__(self, keys: dict[str, APIKey] | None, clock: Callable[[], float]):
        self.keys, self.clock = keys, clock
        self.usage: dict[str, Usage] = {}

    def authenticate(self, header: str | None) -> APIKey:
        """The caller's key (the anonymous one without keys); 401 when keys are set and this is none of them."""
        if self.keys is None:
            return APIKey(ANONYMOUS, "anonymous")
        found = self.keys.get(bearer(header) or "")
        if found is None:
            raise APIError(
                401, "Incorrect or missing API key: send Authorization: Bearer KEY.", "invalid_request_error", None,
                "invalid_api_key",
            )  # fmt: skip
        return found

    def of(self, api_key: APIKey) -> Usage:
        return self.usage.setdefault(api_key.name, Usage(api_key.name))

    def admit(self, api_key: APIKey, prompt_tokens: int) -> None:
        """Count a new request of ``api_key`` as generating, or answer 429 with Retry-After."""
        usage, now = self.of(api_key), self.clock()
        refusal = None
        if api_key.max_prompt_tokens and prompt_tokens > api_key.max_prompt_tokens:
            refusal = rate_limited(
                f"This key's prompts are limited to {api_key.max_prompt_tokens} tokens; this one has "
                f"{prompt_tokens}. A shorter prompt is needed; waiting will not help.",
                WINDOW,
                "prompt_too_large",
            )
        elif api_key.max_concurrent_requests and usage.active >= api_key.max_concurrent_requests:
            refusal = rate_limited(
                f"This key already has {usage.active} requests generating (its limit); try again when one ends.",
                1.0,
                "too_many_concurrent_requests",
            )
        elif api_key.tokens_per_minute:
            wait = usage.retry_after(api_key.tokens_per_minute, prompt_tokens, now)
            if wait > 0:
                refusal = rate_limited(
                    f"This key used its {api_key.tokens_per_minute} tokens per minute; try again in {wait:.0f} s.",
                    wait,
                    "tokens_per_minute_exceeded",
                )
        if refusal is not None:
            usage.refused += 1
            raise refusal
        usage.active += 1
        usage.requests += 1
        usage.use(prompt_tokens, now, prompt=True)

    def release(self, api_key: APIKey) -> None:
        """A request admitted by ``admit`` ended (or never started)."""
        self.of(api_key).active -= 1

    def report(self) -> list[dict]:
        now = self.clock()
        return [usage.report(now) for usage in sorted(self.usage.values(), key=lambda u: u.name)]


def fair_pick(waiting: dict[str, list[T]], room: int, counts: dict[str, float], weights: dict[str, float]) -> list[T]:
    """Up to ``room`` items of ``waiting`` (key -> its items, the longest waiting first): each time the next
    item of the key whose count (``counts``: its steps so far over its weight, plus those taken here) is
    lowest. ``counts`` is updated with what was taken."""
    queues = {key: list(items) for key, items in waiting.items() if items}
    taken: list[T] = []
    while queues and len(taken) < room:
        key = min(queues, key=lambda k: (counts.get(k, 0.0), k))
        taken.append(queues[key].pop(0))
        counts[key] = counts.get(key, 0.0) + 1 / weights.get(key, 1.0)
        if not queues[key]:
            del queues[key]
    return taken


def level_counts(counts: dict[str, float], present: set[str]) -> dict[str, float]:
    """The counts of the keys ``present`` in a round, relative to the least of them (a key that comes
    back starts level with the others, not ahead by the rounds it missed); others are forgotten."""
    known = [counts[key] for key in present if key in counts]
    low = min(known, default=0.0)
    return {key: max(counts.get(key, low), low) - low for key in present}
