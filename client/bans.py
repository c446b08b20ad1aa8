"""Ban policy (pure): how long to avoid a server after a failure, and how its failures are forgiven.

A failure bans a server for ``base * 2**failures`` seconds (capped), ``failures`` counting its past
failures still held against it. Failures while its ban runs are the same bad moment seen by calls that
were already in flight (8 sessions on one busy server fail together): they neither lengthen the ban
nor count again. They decay in two ways, so one bad moment is not held forever:
every ``forgive_steps`` successful calls since its last failure forgive one failure, and all of them
are forgotten once ``forget_after`` seconds pass without a new one. Times are monotonic seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class BanPolicy:
    base: float  # seconds of the first ban
    cap: float  # longest ban
    forgive_steps: int  # successful calls that forgive one past failure
    forget_after: float  # seconds without a failure after which all failures are forgotten


@dataclass(frozen=True)
class BanRecord:
    until: float  # the ban ends at this time (it may be over while failures are still remembered)
    failures: int  # failures held against the server, >= 1
    last_failure: float  # time of the latest failure
    successes: int = 0  # successful calls since the latest failure or forgiveness


def after_failure(record: BanRecord | None, now: float, policy: BanPolicy) -> BanRecord:
    """The record after a new failure at ``now``: banned for base x 2^(failures held), up to the cap;
    unchanged while an earlier ban still runs (that failure is already counted)."""
    if record is not None and now < record.until:
        return record
    held = 0 if record is None or now - record.last_failure > policy.forget_after else record.failures
    duration = min(policy.base * 2**held, policy.cap)
    return BanRecord(until=now + duration, failures=held + 1, last_failure=now)


def after_success(record: BanRecord | None, now: float, policy: BanPolicy) -> BanRecord | None:
    """The record after a successful call at ``now``; None once every failure is forgiven or forgotten."""
    if record is None or now - record.last_failure > policy.forget_after:
        return None
    successes = record.successes + 1
    if successes < policy.forgive_steps:
        return dataclasses.replace(record, successes=successes)
    if record.failures <= 1:
        return None
    return dataclasses.replace(record, failures=record.failures - 1, successes=0)
