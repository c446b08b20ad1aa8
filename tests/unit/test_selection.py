"""Tests for swarm.routing.selection: choose_span against a direct evaluation of every window, swarms filling up
one server at a time, and should_move's decisions (move into holes, stay put when balanced)."""

from __future__ import annotations

import random

import pytest

from swarm.net.records import ServerInfo, ServerState
from swarm.routing.selection import block_throughputs, choose_span, should_move, swarm_throughput
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(60)


def srv(peer, start, end, throughput=1.0, state=ServerState.ONLINE) -> ServerInfo:
    return ServerInfo(peer, state, BlockRange(start, end), throughput=throughput)


def reference_choose(servers, num_blocks, n, own):
    """The documented rule, evaluated window by window from the records themselves."""
    if n >= num_blocks:
        return BlockRange(0, num_blocks)
    online = [s for s in servers if s.state in (ServerState.ONLINE, ServerState.JOINING)]

    def total(block):
        return sum(s.throughput for s in online if s.span.start <= block < s.span.end)

    ranked = []
    for start in range(num_blocks - n + 1):
        window = range(start, start + n)
        inside = [total(b) for b in window]
        after = [total(b) + own if b in window else total(b) for b in range(num_blocks)]
        gaps = sum(1 for t in inside if t == 0)
        ranked.append(((-gaps, -min(after), min(inside), sum(inside), start), start))
    start = min(ranked)[1]
    return BlockRange(start, start + n)


def random_swarm(rng):
    num_blocks = rng.randint(1, 12)
    servers = []
    position = 0 if rng.random() < 0.6 else num_blocks
    while position < num_blocks:  # often a base layer tiling the model: no gaps, throughput matters
        end = rng.randint(position + 1, min(num_blocks, position + 4))
        servers.append(srv(f"base{position}", position, end, rng.choice([0.5, 1.0, 2.0, 3.0])))
        position = end
    for i in range(rng.randint(0, 7)):
        start = rng.randrange(num_blocks)
        end = rng.randint(start + 1, min(num_blocks, start + rng.randint(1, 6)))
        state = rng.choice([ServerState.ONLINE] * 6 + [ServerState.OFFLINE, ServerState.JOINING])
        throughput = rng.choice([0.5, 1.0, 1.5, 2.0, 4.0]) if rng.random() < 0.7 else rng.uniform(0.1, 10.0)
        servers.append(srv(f"p{i}", start, end, throughput, state))
    return servers, num_blocks


def tiled_swarm(rng):
    """One server per block, few distinct throughputs: many tied weakest blocks, where rule 2 decides."""
    num_blocks = rng.randint(3, 12)
    return [srv(f"b{b}", b, b + 1, rng.choice([1.0, 1.5, 2.0, 9.0])) for b in range(num_blocks)], num_blocks


@pytest.mark.parametrize("make", [random_swarm, tiled_swarm])
@pytest.mark.parametrize("seed", range(300))
def test_choose_span_matches_a_direct_evaluation_of_every_window(seed, make):
    rng = random.Random(seed)
    servers, num_blocks = make(rng)
    n = rng.randint(1, num_blocks + 1)
    own = rng.choice([0.0, 0.5, 1.0, 3.0, rng.uniform(0.1, 10.0)])
    chosen = choose_span(servers, num_blocks, n, own)
    assert chosen == reference_choose(servers, num_blocks, n, own)
    # no window gives the swarm more throughput than the chosen one
    best = max(
        swarm_throughput([*servers, srv("new", s, s + len(chosen), own)], num_blocks)
        for s in range(num_blocks - len(chosen) + 1)
    )
    assert swarm_throughput([*servers, srv("new", chosen.start, chosen.end, own)], num_blocks) == best


def test_the_window_lifting_every_weakest_block_beats_the_one_with_the_lowest_sum():
    servers = [srv(f"b{b}", b, b + 1, t) for b, t in enumerate([1.0, 9.0, 1.0, 1.5, 1.5])]
    assert choose_span(servers, 5, 3, 10.0) == BlockRange(0, 3)  # swarm: 1.5, where 2:5 would leave 1.0


def test_block_throughputs_count_online_and_joining_servers_and_clip_to_the_model():
    servers = [
        srv("a", 0, 3, 2.0),
        srv("b", 2, 6, 1.5),
        srv("off", 0, 4, 9.0, ServerState.OFFLINE),
        srv("joining", 0, 4, 9.0, ServerState.JOINING),
        srv("broken", 0, 4, float("nan")),
    ]
    assert block_throughputs(servers, 5) == [11.0, 11.0, 12.5, 10.5, 1.5]  # joining counts, offline not
    assert swarm_throughput(servers, 5) == 1.5
    assert swarm_throughput(servers, 7) == 0.0
    assert swarm_throughput([], 3) == 0.0
    with pytest.raises(ValueError):
        block_throughputs(servers, 0)


def test_four_servers_join_an_empty_swarm_one_by_one():
    servers: list[ServerInfo] = []
    for peer, throughput in (("a", 3.0), ("b", 2.0), ("c", 1.0), ("d", 1.0)):
        span = choose_span(servers, 30, 10, throughput)
        servers.append(srv(peer, span.start, span.end, throughput))
    assert [s.span for s in servers] == [BlockRange(0, 10), BlockRange(10, 20), BlockRange(20, 30), BlockRange(20, 30)]


def test_gaps_come_first_even_when_a_weak_block_is_elsewhere():
    servers = [srv("weak", 0, 2, 0.1), srv("strong", 2, 4, 100.0)]
    assert choose_span(servers, 6, 2, 5.0) == BlockRange(4, 6)
    assert choose_span(servers, 6, 3, 5.0) == BlockRange(3, 6)  # the window covering both gaps


def test_a_span_longer_than_the_model_is_the_whole_model():
    assert choose_span([], 4, 9, 1.0) == BlockRange(0, 4)
    with pytest.raises(ValueError):
        choose_span([], 4, 0, 1.0)


def test_a_redundant_server_moves_into_the_hole_left_by_a_departure():
    servers = [srv("a", 0, 10), srv("b", 10, 20), srv("c", 20, 30), srv("d", 0, 10)]
    assert should_move(servers, "d", 30) is None
    gone = [s for s in servers if s.peer_id != "b"]
    assert should_move(gone, "d", 30) == BlockRange(10, 20)
    assert should_move(gone, "a", 30) == BlockRange(10, 20)  # a and d are interchangeable here


def test_no_flapping_in_a_balanced_swarm():
    servers = [srv("a", 0, 10), srv("b", 10, 20), srv("c", 20, 30), srv("d", 10, 20), srv("e", 20, 30)]
    servers.append(srv("f", 0, 10))
    for server in servers:
        assert should_move(servers, server.peer_id, 30) is None


def test_moves_only_for_a_clear_gain():
    base = [srv("a", 0, 10, 10.0), srv("b", 10, 20, 10.0)]
    weak = [*base, srv("c", 20, 30, 7.0), srv("d", 0, 10, 4.0)]
    assert should_move(weak, "d", 30) == BlockRange(20, 30)  # 7 -> 10: more than 1.33x
    mild = [*base, srv("c", 20, 30, 9.0), srv("d", 0, 10, 4.0)]
    assert should_move(mild, "d", 30) is None  # 9 -> 10: not worth the reload
    assert should_move(mild, "d", 30, balance_quality=1.0) == BlockRange(20, 30)


def test_the_suggestion_is_stable_once_taken():
    servers = [srv("a", 0, 10, 10.0), srv("b", 10, 20, 10.0), srv("c", 20, 30, 2.0), srv("d", 0, 10, 6.0)]
    target = should_move(servers, "d", 30)
    assert target == BlockRange(20, 30)
    moved = [*servers[:3], srv("d", target.start, target.end, 6.0)]
    assert should_move(moved, "d", 30) is None


def test_closes_one_of_several_gaps_without_opening_another():
    servers = [srv("a", 0, 4), srv("b", 0, 4), srv("c", 6, 8)]  # gaps: 4, 5, 8, 9
    assert swarm_throughput(servers, 10) == 0.0
    assert should_move(servers, "b", 10) is not None
    moved = should_move(servers, "b", 10)
    assert set(range(moved.start, moved.end)) & {4, 5, 8, 9}
    assert should_move(servers, "c", 10) is None  # c's blocks would become a gap


def test_should_move_without_its_own_record_or_with_a_bad_quality():
    servers = [srv("a", 0, 4)]
    assert should_move(servers, "missing", 4) is None
    with pytest.raises(ValueError):
        should_move(servers, "a", 4, balance_quality=1.5)
