"""The ban policy: exponential bans, failures forgiven by successes and forgotten after a quiet time."""

from __future__ import annotations

import pytest

from client.bans import BanPolicy, after_failure, after_success

pytestmark = pytest.mark.timeout(10)

POLICY = BanPolicy(base=5.0, cap=300.0, forgive_steps=4, forget_after=600.0)


def fail(record, now, times=1):
    """``times`` failures, each once the ban before it is over (a failure during a ban counts once)."""
    for _ in range(times):
        now = max(now, record.until) if record is not None else now
        record = after_failure(record, now, POLICY)
    return record


def succeed(record, now, times):
    for _ in range(times):
        record = after_success(record, now, POLICY)
    return record


def test_each_failure_held_doubles_the_ban_up_to_the_cap():
    bans = []
    record, now = None, 100.0
    for _ in range(8):
        record = after_failure(record, now, POLICY)
        bans.append(record.until - now)
        now = record.until
    assert bans == [5, 10, 20, 40, 80, 160, 300, 300]
    assert record.failures == 8 and record.last_failure == now - 300


def test_failures_during_a_running_ban_count_once():
    """Calls that were in flight when a server failed fail too: that is one bad moment, not many."""
    first = after_failure(None, 100.0, POLICY)
    again = after_failure(first, 103.0, POLICY)
    assert again == first  # no longer, no more failures held
    assert after_failure(again, first.until, POLICY).failures == 2  # a failure after the ban counts


def test_a_server_that_failed_once_is_forgiven_after_enough_successes():
    record = succeed(fail(None, 0.0), 10.0, POLICY.forgive_steps - 1)
    assert record is not None and record.successes == POLICY.forgive_steps - 1
    assert succeed(record, 10.0, 1) is None  # a clean slate: its next failure is a first failure again
    assert after_failure(None, 20.0, POLICY).until == 25.0


def test_successes_forgive_one_failure_per_forgive_steps():
    record = fail(None, 0.0, times=3)  # at 0, 5 and 15 s: banned until 35 s
    record = succeed(record, 40.0, POLICY.forgive_steps)
    assert record.failures == 2 and record.successes == 0
    assert after_failure(record, 41.0, POLICY).until == 41.0 + 20.0  # 2 held -> 5 x 2^2


def test_a_failure_resets_the_count_of_successes():
    record = succeed(fail(None, 0.0, times=2), 16.0, POLICY.forgive_steps - 1)  # banned until 15 s
    record = succeed(fail(record, 17.0), 18.0, POLICY.forgive_steps - 1)
    assert record.failures == 3  # the successes before the new failure did not count towards forgiveness


def test_failures_are_forgotten_after_a_quiet_period():
    record = fail(None, 0.0, times=5)
    quiet = record.last_failure + POLICY.forget_after
    assert after_success(record, quiet + 1.0, POLICY) is None
    assert after_failure(record, quiet + 1.0, POLICY).until == quiet + 1.0 + 5.0
    assert after_failure(record, quiet - 1.0, POLICY).failures == 6  # not quiet long enough
