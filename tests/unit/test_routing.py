"""Tests for swarm.routing.chains: the pure chain search, checked by hand-made cases and a brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from swarm.errors import MissingBlocksError
from swarm.net.records import ServerInfo, ServerState
from swarm.routing.chains import Hop, coverage, make_chain, uncovered_blocks, usable
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(60)


def srv(
    peer: str,
    start: int,
    end: int,
    throughput: float = 1.0,
    cache: int = 1000,
    state: ServerState = ServerState.ONLINE,
) -> ServerInfo:
    return ServerInfo(peer, state, BlockRange(start, end), throughput=throughput, cache_tokens_left=cache)


def test_one_server_covering_everything_beats_two_halves():
    servers = [srv("a", 0, 2), srv("b", 2, 4), srv("c", 0, 4)]
    assert make_chain(servers, BlockRange(0, 4)) == [Hop("c", BlockRange(0, 4))]


def test_overlapping_spans_hand_over_where_the_previous_hop_ends():
    servers = [srv("a", 0, 3), srv("b", 2, 6)]
    assert make_chain(servers, BlockRange(0, 6)) == [Hop("a", BlockRange(0, 3)), Hop("b", BlockRange(3, 6))]


def test_picks_the_server_that_reaches_farthest():
    servers = [srv("a", 0, 3), srv("b", 1, 5, throughput=100.0), srv("c", 3, 6)]
    assert make_chain(servers, BlockRange(0, 6)) == [Hop("a", BlockRange(0, 3)), Hop("c", BlockRange(3, 6))]


def test_hops_are_truncated_to_the_requested_span():
    servers = [srv("a", 0, 8)]
    assert make_chain(servers, BlockRange(0, 4)) == [Hop("a", BlockRange(0, 4))]
    assert make_chain(servers, BlockRange(2, 5)) == [Hop("a", BlockRange(2, 5))]
    servers = [srv("a", 0, 3), srv("b", 2, 8)]
    assert make_chain(servers, BlockRange(1, 5)) == [Hop("a", BlockRange(1, 3)), Hop("b", BlockRange(3, 5))]


def test_missing_blocks_are_named_exactly():
    servers = [srv("a", 0, 2), srv("b", 4, 5), srv("c", 8, 9)]
    with pytest.raises(MissingBlocksError) as info:
        make_chain(servers, BlockRange(0, 7))
    assert info.value.blocks == [2, 3, 5, 6]
    assert "2:4, 5:7" in str(info.value)


def test_no_servers_at_all_means_every_block_is_missing():
    with pytest.raises(MissingBlocksError) as info:
        make_chain([], BlockRange(3, 6))
    assert info.value.blocks == [3, 4, 5]


def test_ties_go_to_higher_throughput_then_peer_id():
    servers = [srv("a", 0, 4, throughput=5.0), srv("b", 0, 4, throughput=9.0), srv("c", 0, 3, throughput=99.0)]
    assert make_chain(servers, BlockRange(0, 4)) == [Hop("b", BlockRange(0, 4))]
    servers = [srv("a", 0, 4), srv("b", 0, 4)]
    assert make_chain(servers, BlockRange(0, 4)) == [Hop("b", BlockRange(0, 4))]


def test_prefers_servers_with_enough_cache():
    servers = [srv("full", 0, 4, throughput=50.0, cache=10), srv("roomy", 0, 4, throughput=1.0, cache=5000)]
    assert make_chain(servers, BlockRange(0, 4), min_cache_tokens=100) == [Hop("roomy", BlockRange(0, 4))]
    assert make_chain(servers, BlockRange(0, 4), min_cache_tokens=0) == [Hop("full", BlockRange(0, 4))]


def test_a_server_short_of_cache_is_used_where_nothing_else_covers():
    servers = [srv("roomy", 0, 2, cache=5000), srv("full", 2, 4, cache=0)]
    chain = make_chain(servers, BlockRange(0, 4), min_cache_tokens=100)
    assert chain == [Hop("roomy", BlockRange(0, 2)), Hop("full", BlockRange(2, 4))]


def test_usable_drops_offline_joining_and_banned_servers():
    servers = [
        srv("on", 0, 2),
        srv("off", 0, 4, state=ServerState.OFFLINE),
        srv("joining", 0, 4, state=ServerState.JOINING),
        srv("banned", 0, 4),
        srv("tail", 2, 4),
    ]
    assert [s.peer_id for s in usable(servers, banned={"banned"})] == ["on", "tail"]
    chain = make_chain(usable(servers, banned={"banned"}), BlockRange(0, 4))
    assert chain == [Hop("on", BlockRange(0, 2)), Hop("tail", BlockRange(2, 4))]
    with pytest.raises(MissingBlocksError) as info:
        make_chain(usable(servers, banned={"banned", "tail"}), BlockRange(0, 4))
    assert info.value.blocks == [2, 3]


def test_coverage_counts_online_servers_per_block():
    servers = [srv("a", 0, 3), srv("b", 2, 4), srv("c", 0, 4, state=ServerState.OFFLINE)]
    assert coverage(servers, 5) == [1, 1, 2, 1, 0]
    assert uncovered_blocks(servers, BlockRange(0, 5)) == [4]


def _min_hops(servers: list[ServerInfo], span: BlockRange) -> int | None:
    """Brute force: the smallest set of servers whose spans together cover ``span`` (None: impossible)."""
    needed = set(range(span.start, span.end))
    for size in range(1, len(servers) + 1):
        for subset in itertools.combinations(servers, size):
            if needed <= {b for s in subset for b in range(s.span.start, s.span.end)}:
                return size
    return None


def _random_swarm(rng: random.Random) -> tuple[list[ServerInfo], BlockRange, int]:
    """Up to 6 servers over up to 8 blocks; spans short enough that most chains need several hops."""
    num_blocks = rng.randint(1, 8)
    servers = []
    for i in range(rng.randint(0 if rng.random() < 0.05 else 2, 6)):
        start = rng.randrange(num_blocks)
        end = min(num_blocks, start + rng.randint(1, max(1, num_blocks // 2)))
        state = rng.choice([ServerState.ONLINE] * 8 + [ServerState.OFFLINE, ServerState.JOINING])
        servers.append(srv(f"p{i}", start, end, rng.choice([1.0, 2.0, 3.0]), rng.choice([0, 50, 500]), state))
    start = rng.randrange(num_blocks // 3 + 1)
    end = rng.randint(max(start + 1, num_blocks - 2), num_blocks)
    return servers, BlockRange(start, end), rng.choice([0, 0, 100])


def _check_chain(chain: list[Hop], servers: list[ServerInfo], span: BlockRange) -> None:
    by_peer = {s.peer_id: s for s in servers}
    assert chain[0].span.start == span.start and chain[-1].span.end == span.end
    for hop, after in itertools.pairwise(chain):
        assert hop.span.end == after.span.start
    for hop in chain:
        assert hop.span in by_peer[hop.peer_id].span


@pytest.mark.parametrize("seed", range(200))
def test_matches_brute_force_on_random_swarms(seed):
    rng = random.Random(seed)
    servers, span, min_cache = _random_swarm(rng)
    online = usable(servers)
    best = _min_hops(online, span)
    if best is None:
        expected_missing = [b for b in range(span.start, span.end) if not any(b in s.span for s in online)]
        with pytest.raises(MissingBlocksError) as info:
            make_chain(online, span, min_cache_tokens=min_cache)
        assert info.value.blocks == expected_missing
        return
    chain = make_chain(online, span, min_cache_tokens=min_cache)
    _check_chain(chain, online, span)
    if min_cache == 0:
        assert len(chain) == best
    else:
        by_peer = {s.peer_id: s for s in online}
        for hop in chain:  # a server short of cache only where no roomy server covers the hop's first block
            roomy_here = [s for s in online if hop.span.start in s.span and s.cache_tokens_left >= min_cache]
            assert by_peer[hop.peer_id].cache_tokens_left >= min_cache or not roomy_here
