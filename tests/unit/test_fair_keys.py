"""The API's keys as pure decisions: which requests a shared round steps, and when a key's limits refuse."""

from __future__ import annotations

import json

import pytest

from client.api.errors import APIError
from client.api.keys import APIKey, Limiter, Usage, bearer, fair_pick, level_counts, load_keys

pytestmark = pytest.mark.timeout(30)


def test_a_shared_round_gives_a_single_stream_its_place_every_round():
    counts: dict[str, float] = {}
    flood = [f"f{index}" for index in range(16)]
    stepped = {name: 0 for name in [*flood, "solo"]}
    for _ in range(8):
        waiting = {"flood": sorted(flood, key=stepped.get), "solo": ["solo"]}
        for name in fair_pick(waiting, 4, counts, {}):
            stepped[name] += 1
    assert stepped["solo"] == 8  # every round
    assert sum(stepped[name] for name in flood) == 24 and max(stepped[n] for n in flood) <= 2  # 3 a round, in turn


def test_weights_share_a_round_in_proportion():
    picked = fair_pick({"a": list(range(10)), "b": list(range(10, 20))}, 6, {}, {"a": 2.0, "b": 1.0})
    assert sum(item < 10 for item in picked) == 4 and sum(item >= 10 for item in picked) == 2


def test_a_key_that_comes_back_starts_level():
    assert level_counts({"a": 10.0, "b": 2.0, "gone": 1.0}, {"a", "b", "new"}) == {"a": 8.0, "b": 0.0, "new": 0.0}


def test_tokens_per_minute_tell_how_long_to_wait():
    usage = Usage("k")
    usage.use(30, now=0.0)
    usage.use(30, now=20.0)
    assert usage.retry_after(100, 40, now=30.0) == 0  # 60 + 40 fit
    assert usage.retry_after(100, 50, now=30.0) == pytest.approx(30.0)  # once the first 30 leave the window
    assert usage.retry_after(100, 80, now=30.0) == pytest.approx(50.0)  # once both left
    assert usage.retry_after(100, 150, now=30.0) == 60  # never fits: a whole window
    assert usage.recent_tokens(now=70.0) == 30


def test_limits_refuse_with_429_and_retry_after_and_count_usage():
    clock = [0.0]
    limiter = Limiter({"s": APIKey("s", "n", max_concurrent_requests=1, tokens_per_minute=100)}, lambda: clock[0])
    key = limiter.authenticate("Bearer s")
    limiter.admit(key, 60)
    with pytest.raises(APIError) as busy:
        limiter.admit(key, 10)
    assert (busy.value.status, busy.value.code, busy.value.headers) == (429, "too_many_concurrent_requests",
                                                                         {"Retry-After": "1"})  # fmt: skip
    limiter.release(key)  # the engine does this when the request ends
    clock[0] = 10.0
    with pytest.raises(APIError) as spent:
        limiter.admit(key, 50)
    assert spent.value.code == "tokens_per_minute_exceeded" and spent.value.headers["Retry-After"] == "50"
    assert limiter.report()[0] == {
        "name": "n", "active_requests": 0, "requests": 1, "refused": 2, "prompt_tokens": 60,
        "completion_tokens": 0, "tokens_last_minute": 60,
    }  # fmt: skip


def test_keys_authenticate_by_bearer_header():
    limiter = Limiter({"s": APIKey("s", "n")}, lambda: 0.0)
    assert limiter.authenticate("Bearer s").name == "n" and bearer("bearer  s ") == "s"
    for header in (None, "", "Bearer", "Basic s", "Bearer t"):
        with pytest.raises(APIError) as error:
            limiter.authenticate(header)
        assert error.value.status == 401
    assert Limiter(None, lambda: 0.0).authenticate(None).name == "anonymous"


@pytest.mark.parametrize(
    "entries",
    [
        {"key": "a", "name": "a"},  # not a list
        [{"key": "a"}],  # no name
        [{"key": "a", "name": "a", "colour": "red"}],  # unknown field
        [{"key": "a", "name": "a", "tokens_per_minute": -1}],
        [{"key": "a", "name": "a", "weight": 0}],
        [{"key": "a", "name": "a"}, {"key": "a", "name": "b"}],
    ],
)
def test_a_bad_keys_file_is_refused_with_a_reason(tmp_path, entries):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="--api-keys"):
        load_keys(str(path))


def test_a_keys_file_loads(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"key": "a", "name": "x", "max_prompt_tokens": 9, "admin": True}]))
    assert load_keys(str(path)) == {"a": APIKey("a", "x", max_prompt_tokens=9, admin=True)}
