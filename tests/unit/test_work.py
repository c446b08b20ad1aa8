"""The pure choice of the next slice of work (urgency order, decode batching, bounded slices), how long a
decode batch waits (declared rounds, active sessions), and the work kinds' hooks."""

from __future__ import annotations

import pytest
import torch

from swarm.core.batching import ActiveSessions, hold_seconds, next_batch
from swarm.core.work import ForwardPass, InferenceStep, Kind, Round, Work, step_kind
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(30)


def work(
    kind: Kind, rows: int = 1, tokens: int = 1, blocks=(0, 6), seq: int = 0, points: float = 0.0, round=None
) -> Work:
    cls = InferenceStep if kind <= Kind.PREFILL else ForwardPass
    hidden, positions = torch.zeros(rows, tokens, 4), torch.zeros(rows, tokens)
    item = cls(BlockRange(*blocks), hidden, positions, points=points, kind=kind, round=round)
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


WAIT = dict(max_batch_tokens=64, batch_wait=0.1, decode_seconds=0.01)


def test_a_declared_round_runs_as_soon_as_all_its_steps_are_in():
    declared = Round("client", 7, 3)
    steps = [work(Kind.DECODE, seq=i, round=declared) for i in range(3)]
    assert hold_seconds(steps[:2], steps[:2], expected=0, **WAIT) == 0.1  # one missing: wait for it (bounded)
    assert hold_seconds(steps, steps, expected=5, **WAIT) == 0.0  # all in: no timer, whoever else stepped lately


def test_rounds_of_different_clients_or_blocks_do_not_mix():
    mine = [work(Kind.DECODE, seq=i, round=Round("a", 1, 2)) for i in range(2)]
    theirs = work(Kind.DECODE, seq=2, round=Round("b", 1, 2))
    elsewhere = work(Kind.DECODE, blocks=(2, 6), seq=3, round=Round("b", 1, 2))
    ready = [*mine, theirs, elsewhere]
    batch, _ = next_batch(ready, 64, 100)
    assert batch == [*mine, theirs]
    assert hold_seconds(batch, ready, expected=0, **WAIT) == 0.1  # b's second step is on other blocks
    assert hold_seconds(mine, mine, expected=0, **WAIT) == 0.0


def test_undeclared_steps_keep_the_timer_and_a_full_batch_never_waits():
    lone = [work(Kind.DECODE)]
    assert hold_seconds(lone, lone, expected=1, **WAIT) == 0.0  # a lone session never waits
    assert hold_seconds(lone, lone, expected=3, **WAIT) == 0.005  # half a decode slice for sessions due any moment
    full = [work(Kind.DECODE, rows=64, round=Round("a", 1, 2))]
    assert hold_seconds(full, full, expected=3, **WAIT) == 0.0


def test_declared_steps_are_not_counted_as_active_sessions():
    active = ActiveSessions(window=0.5)
    declared = work(Kind.DECODE, round=Round("a", 1, 1))
    declared.cache = object()
    active.saw(declared, now=1.0)
    assert active.expected(BlockRange(0, 6), now=1.1) == 0


class FakeStack:
    """Adds 1 per block and records what ran together."""

    def __init__(self):
        self.calls = []

    def run(self, items, num_blocks):
        self.calls.append((len(items), num_blocks))
        return [item.hidden + num_blocks for item in items]


class FakeCache:
    def __init__(self):
        self.length, self.reordered = 0, []

    def reorder(self, rows):
        self.reordered.append(rows.tolist())

    def advance(self, tokens):
        self.length += tokens


def test_an_inference_step_reorders_once_and_advances_its_cache_once_done():
    from swarm.core.work import run_slice, run_to_end

    cache, stack = FakeCache(), FakeStack()
    step = InferenceStep(BlockRange(0, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3), cache, reorder=torch.tensor([1, 0]))
    assert run_slice(stack, [step], 1) == [None] and cache.length == 0  # more blocks to run: nothing held yet
    output = run_to_end(stack, step)
    assert torch.equal(output, torch.full((2, 3, 4), 4.0)) and cache.reordered == [[1, 0]] and cache.length == 3
    forward = ForwardPass(BlockRange(0, 2), torch.zeros(1, 1, 4), torch.zeros(1, 1))
    assert torch.equal(run_to_end(stack, forward), torch.full((1, 1, 4), 2.0))
