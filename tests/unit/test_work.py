"""The pure choice of the next slice of work: urgency order, decode batching, bounded slices."""

from __future__ import annotations

import pytest
import torch

from server.work import ActiveSessions, Kind, Work, next_batch, step_kind
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(30)


def work(kind: Kind, rows: int = 1, tokens: int = 1, blocks=(0, 6), seq: int = 0, points: float = 0.0) -> Work:
    item = Work(kind, BlockRange(*blocks), torch.zeros(rows, tokens, 4), torch.zeros(rows, tokens), points=points)
    item.seq = seq
    return item


def test_decode_steps_at_the_same_blocks_run_together_and_whole():
    a, b, c = work(Kind.DECODE, seq=0), work(Kind.DECODE, rows=3, seq=1), work(Kind.DECODE, seq=2)
    batch, blocks = next_batch([c, b, a], max_batch_tokens=64, chunk_token_blocks=16)
    assert batch == [a, b, c] and blocks == 6


def test_decode_batch_respects_its_token_budget_and_block_range():
    items = [work(Kind.DECODE, rows=4, seq=i) for i in range(5)]
    other_span = work(Kind.DECODE, blocks=(2, 6), seq=9)
    batch, _ = next_batch([*items, other_span], max_batch_tokens=10, chunk_token_blocks=16)
    assert batch == items[:2]


def test_decode_goes_before_older_prefill_and_forward():
    forward, prefill, decode = work(Kind.FORWARD, seq=0), work(Kind.PREFILL, 1, 40, seq=1), work(Kind.DECODE, seq=2)
    batch, _ = next_batch([forward, prefill, decode], max_batch_tokens=32, chunk_token_blocks=1000)
    assert batch[0] is decode


def test_small_prefill_rides_with_decode_batch_but_large_one_does_not():
    decode, small, large = work(Kind.DECODE, seq=0), work(Kind.PREFILL, 1, 20, seq=1), work(Kind.PREFILL, 1, 300, seq=2)
    batch, _ = next_batch([decode, small, large], max_batch_tokens=64, chunk_token_blocks=1000)
    assert batch == [decode, small]


def test_long_work_runs_in_bounded_slices():
    forward = work(Kind.FORWARD, rows=8, tokens=100, blocks=(0, 30))
    batch, blocks = next_batch([forward], max_batch_tokens=64, chunk_token_blocks=4000)
    assert batch == [forward] and blocks == 5  # 800 tokens x 5 blocks = 4000
    huge = work(Kind.FORWARD, rows=64, tokens=512, blocks=(0, 30))
    assert next_batch([huge], 64, 4000)[1] == 1  # at least one block per slice
    forward.cursor = 28
    assert next_batch([forward], 64, 4000)[1] == 2  # never past the last block


def test_more_points_go_first_within_a_kind_then_arrival():
    early, rich = work(Kind.FORWARD, seq=0), work(Kind.FORWARD, seq=1, points=50.0)
    assert next_batch([early, rich], 64, 100)[0] == [rich]
    assert next_batch([early, work(Kind.FORWARD, seq=1)], 64, 100)[0] == [early]


def test_solo_items_run_alone():
    a, b = work(Kind.DECODE, seq=0), work(Kind.DECODE, seq=1)
    a.solo = True
    assert next_batch([a, b], 64, 100)[0] == [a]


def test_step_kind():
    assert step_kind(1, 16) == Kind.DECODE and step_kind(16, 16) == Kind.DECODE and step_kind(17, 16) == Kind.PREFILL


def test_active_sessions_are_those_that_stepped_lately_on_the_same_blocks():
    active = ActiveSessions(window=0.5)
    first, second = work(Kind.DECODE), work(Kind.DECODE)
    first.cache, second.cache = object(), object()
    other = work(Kind.DECODE, blocks=(2, 6))
    other.cache = object()
    for item in (first, second, other):
        active.saw(item, now=10.0)
    active.saw(work(Kind.FORWARD), now=10.0)  # stateless work is not a session
    assert active.expected(BlockRange(0, 6), now=10.2) == 2
    active.saw(first, now=10.4)
    assert active.expected(BlockRange(0, 6), now=10.8) == 1  # the second one went quiet
