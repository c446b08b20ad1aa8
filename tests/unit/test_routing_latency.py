"""Tests for the latency-aware routes of swarm.routing.chains: fastest_chain (against a brute force over every
chain, with a cost model rewritten here), chain_latency, and spread_forward's load proportions."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections import Counter

import pytest

from swarm.errors import MissingBlocksError
from swarm.net.records import ServerInfo, ServerState
from swarm.routing.chains import Hop, chain_latency, fastest_chain, make_chain, spread_forward
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(60)


def srv(peer, start, end, throughput=1.0, cache=1000, next_pings=None, forward=0.0) -> ServerInfo:
    return ServerInfo(
        peer,
        ServerState.ONLINE,
        BlockRange(start, end),
        throughput=throughput,
        cache_tokens_left=cache,
        forward_throughput=forward,
        next_pings=dict(next_pings or {}),
    )


def reference_cost(chain, servers, pings, push, default=0.05, min_cache=0, penalty=1.0) -> float:
    """The cost model of fastest_chain's docstring, written out hop by hop (valid pings only)."""
    info = {s.peer_id: s for s in servers}

    def client_rtt(peer):
        return pings[peer] if peer in pings else default

    cost = 0.0
    for k, hop in enumerate(chain):
        server = info[hop.peer_id]
        speed = server.throughput if server.throughput > 0 else 1.0
        cost += (hop.span.end - hop.span.start) / speed
        if server.cache_tokens_left < min_cache:
            cost += penalty
        if not push:
            cost += client_rtt(hop.peer_id)
        elif k == 0:
            cost += client_rtt(hop.peer_id) / 2
        else:
            before = info[chain[k - 1].peer_id]
            rtt = before.next_pings[hop.peer_id] if hop.peer_id in before.next_pings else client_rtt(hop.peer_id)
            cost += rtt / 2
    if push:
        cost += client_rtt(chain[-1].peer_id) / 2
    return cost


def all_chains(servers, span):
    """Every chain: each hop is any server covering the current block, ending anywhere it can reach."""
    if span.start == span.end:
        yield []
        return
    for server in servers:
        if span.start in server.span:
            for end in range(span.start + 1, min(server.span.end, span.end) + 1):
                head = Hop(server.peer_id, BlockRange(span.start, end))
                if end == span.end:
                    yield [head]
                else:
                    for rest in all_chains(servers, BlockRange(end, span.end)):
                        yield [head, *rest]


def check_valid(chain, servers, span):
    spans = {}
    for s in servers:
        spans.setdefault(s.peer_id, []).append(s.span)
    assert chain and chain[0].span.start == span.start and chain[-1].span.end == span.end
    for hop, after in itertools.pairwise(chain):
        assert hop.span.end == after.span.start
    for hop in chain:
        assert any(hop.span in s for s in spans[hop.peer_id])


def random_chain(servers, span, rng):
    chain, position = [], span.start
    while position < span.end:
        server = rng.choice([s for s in servers if position in s.span])
        end = rng.randint(position + 1, min(server.span.end, span.end))
        chain.append(Hop(server.peer_id, BlockRange(position, end)))
        position = end
    return chain


def random_small_swarm(rng):
    num_blocks = rng.randint(1, 7)
    peers = [f"p{i}" for i in range(rng.randint(1, 6))]
    servers = []
    for peer in peers:
        start = rng.randrange(num_blocks)
        end = min(num_blocks, start + rng.randint(1, num_blocks // 2 + 1))
        measured = {p: rng.choice([0.0, 0.01, 0.1, 0.4]) for p in peers if p != peer and rng.random() < 0.5}
        throughput = rng.choice([0.0, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0])
        servers.append(srv(peer, start, end, throughput, rng.choice([0, 50, 500]), measured))
    pings = {p: rng.choice([0.0, 0.02, 0.1, 0.3]) for p in peers if rng.random() < 0.7}
    start = rng.randrange(num_blocks) if rng.random() < 0.3 else 0
    return servers, BlockRange(start, rng.randint(start + 1, num_blocks) if start else num_blocks), pings


@pytest.mark.parametrize("push", [False, True])
@pytest.mark.parametrize("seed", range(250))
def test_fastest_chain_matches_brute_force(seed, push):
    rng = random.Random(seed)
    servers, span, pings = random_small_swarm(rng)
    options = dict(default=rng.choice([0.05, 0.2]), min_cache=rng.choice([0, 100]), penalty=rng.choice([0.0, 0.3]))
    kwargs = dict(
        default_rtt=options["default"],
        min_cache_tokens=options["min_cache"],
        cache_penalty=options["penalty"],
        push=push,
    )
    if any(not any(b in s.span for s in servers) for b in range(span.start, span.end)):
        with pytest.raises(MissingBlocksError):
            fastest_chain(servers, span, pings, **kwargs)
        return
    chain = fastest_chain(servers, span, pings, **kwargs)
    check_valid(chain, servers, span)
    best = min(reference_cost(c, servers, pings, push, **options) for c in all_chains(servers, span))
    assert reference_cost(chain, servers, pings, push, **options) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert chain_latency(chain, servers, pings, **kwargs) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert fastest_chain(list(reversed(servers)), span, pings, **kwargs) == chain  # input order is irrelevant


def shortest_by_hops(servers, span, pings, push, default=0.05):
    """A second reference for swarms too big to enumerate: every hop (p, q, server) is an edge between
    states (p, previous server); a plain dynamic program over p, with no pruning and no shortcuts."""
    info = {s.peer_id: s for s in servers}

    def rtt(peer):
        return pings.get(peer, default)

    def hop_cost(previous, peer, blocks):
        network = rtt(peer) if not push else rtt(peer) / 2 if previous is None else None
        if network is None:
            network = info[previous].next_pings.get(peer, rtt(peer)) / 2
        return network + blocks / (info[peer].throughput if info[peer].throughput > 0 else 1.0)

    states = {(span.start, None): 0.0}
    for p in range(span.start, span.end):
        for (position, previous), cost in list(states.items()):
            if position != p:
                continue
            for s in servers:
                for q in range(p + 1, min(s.span.end, span.end) + 1) if p in s.span else ():
                    total = cost + hop_cost(previous, s.peer_id, q - p)
                    if total < states.get((q, s.peer_id), math.inf):
                        states[(q, s.peer_id)] = total
    ends = [(cost + (rtt(peer) / 2 if push else 0.0)) for (q, peer), cost in states.items() if q == span.end]
    return min(ends)


@pytest.mark.parametrize("push", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_fastest_chain_matches_a_plain_dynamic_program_on_bigger_swarms(seed, push):
    rng = random.Random(seed)
    servers, pings = lognormal_swarm(rng, 60, 12)
    if seed % 2:  # dense measurements: most pairs of servers have measured each other
        servers = [
            dataclasses.replace(s, next_pings={o.peer_id: rng.uniform(0, 0.1) for o in servers if rng.random() < 0.8})
            for s in servers
        ]
    span = BlockRange(0, 12)
    chain = fastest_chain(servers, span, pings, push=push)
    check_valid(chain, servers, span)
    expected = shortest_by_hops(servers, span, pings, push)
    assert reference_cost(chain, servers, pings, push) == pytest.approx(expected, rel=1e-9)


def test_push_switches_inside_an_overlap_when_pings_break_the_triangle_inequality():
    # A -> C is slow, A -> B -> C is fast; B is slow to compute, so the best chain spends exactly one block
    # on B, right after A's last block. The switch to C at 7 is no span boundary (0, 4, 6, 10).
    servers = [
        srv("A", 0, 6, 1000.0, next_pings={"B": 0.0, "C": 10.0}),
        srv("B", 0, 10, 1.0, next_pings={"C": 0.0}),
        srv("C", 4, 10, 100.0),
    ]
    pings = {"A": 0.01, "B": 0.01, "C": 0.01}
    chain = fastest_chain(servers, BlockRange(0, 10), pings, push=True)
    assert chain == [Hop("A", BlockRange(0, 6)), Hop("B", BlockRange(6, 7)), Hop("C", BlockRange(7, 10))]
    # relaying through the client, A -> C costs only C's round trip
    relay = fastest_chain(servers, BlockRange(0, 10), pings, push=False)
    assert relay == [Hop("A", BlockRange(0, 6)), Hop("C", BlockRange(6, 10))]


def test_push_a_bad_measured_link_from_the_best_predecessor_sends_the_route_through_another():
    # A reaches block 2 first, but it measured a slow link to C; B, a bit slower, has no measurement of C
    # and so costs C's default one-way time: the route must enter C from B, not from A.
    servers = [srv("A", 0, 2, 100.0, next_pings={"C": 10.0}), srv("B", 0, 2, 90.0), srv("C", 2, 4, 10.0)]
    pings = {"A": 0.01, "B": 0.01, "C": 0.01}
    chain = fastest_chain(servers, BlockRange(0, 4), pings, push=True)
    assert chain == [Hop("B", BlockRange(0, 2)), Hop("C", BlockRange(2, 4))]


def test_one_fast_server_beats_several_hops_and_a_slow_full_span():
    servers = [srv("slow", 0, 4, 1.0), srv("a", 0, 2, 100.0), srv("b", 2, 4, 100.0), srv("fast", 0, 4, 50.0)]
    assert fastest_chain(servers, BlockRange(0, 4), {}) == [Hop("fast", BlockRange(0, 4))]


def test_far_servers_are_avoided_when_near_ones_are_fast_enough():
    servers = [srv("far", 0, 4, 100.0), srv("near", 0, 4, 40.0)]
    pings = {"far": 0.5, "near": 0.01}
    assert fastest_chain(servers, BlockRange(0, 4), pings) == [Hop("near", BlockRange(0, 4))]
    assert fastest_chain(servers, BlockRange(0, 4), {"far": 0.01, "near": 0.01})[0].peer_id == "far"


def test_cache_penalty_steers_away_unless_there_is_no_other_way():
    servers = [srv("full", 0, 4, 100.0, cache=0), srv("roomy", 0, 4, 10.0, cache=500)]
    assert fastest_chain(servers, BlockRange(0, 4), {}, min_cache_tokens=100)[0].peer_id == "roomy"
    assert fastest_chain(servers, BlockRange(0, 4), {}, min_cache_tokens=0)[0].peer_id == "full"
    alone = [srv("full", 0, 4, 100.0, cache=0)]
    assert fastest_chain(alone, BlockRange(0, 4), {}, min_cache_tokens=100) == [Hop("full", BlockRange(0, 4))]


def test_unknown_throughput_is_usable_but_last_resort():
    servers = [srv("unknown", 0, 3, 0.0), srv("a", 0, 2, 10.0), srv("b", 2, 3, 10.0)]
    assert [h.peer_id for h in fastest_chain(servers, BlockRange(0, 3), {})] == ["a", "b"]
    only = [srv("unknown", 0, 3, float("nan"))]
    assert fastest_chain(only, BlockRange(0, 3), {}) == [Hop("unknown", BlockRange(0, 3))]


def test_invalid_pings_count_as_missing_and_do_not_break_the_search():
    servers = [srv("a", 0, 2, 10.0, next_pings={"b": float("nan"), "c": -1.0}), srv("b", 2, 4, 10.0)]
    pings = {"a": float("nan"), "b": -3.0}
    for push, network in ((False, 2 * 0.05), (True, 3 * 0.05 / 2)):  # every ping falls back to default_rtt
        chain = fastest_chain(servers, BlockRange(0, 4), pings, push=push)
        assert chain == [Hop("a", BlockRange(0, 2)), Hop("b", BlockRange(2, 4))]
        assert chain_latency(chain, servers, pings, push=push) == pytest.approx(0.4 + network)


def test_unreachable_servers_are_used_only_when_needed():
    servers = [srv("a", 0, 4, 10.0), srv("b", 0, 4, 100.0)]
    assert fastest_chain(servers, BlockRange(0, 4), {"b": math.inf}, push=True)[0].peer_id == "a"
    assert fastest_chain(servers[1:], BlockRange(0, 4), {"b": math.inf}, push=True)[0].peer_id == "b"


def test_sub_span_and_missing_blocks():
    servers = [srv("a", 0, 6), srv("b", 8, 9)]
    assert fastest_chain(servers, BlockRange(2, 5), {}) == [Hop("a", BlockRange(2, 5))]
    with pytest.raises(MissingBlocksError) as info:
        fastest_chain(servers, BlockRange(0, 10), {}, push=True)
    assert info.value.blocks == [6, 7, 9]
    with pytest.raises(ValueError):
        fastest_chain(servers, BlockRange(0, 2), {}, cache_penalty=-1.0)


def lognormal_swarm(rng, count, num_blocks):
    servers, pings = [], {}
    for i in range(count):
        length = rng.randint(1, num_blocks // 2)
        start = rng.randrange(num_blocks - length + 1)
        peer = f"s{i:04d}"
        pings[peer] = rng.lognormvariate(math.log(0.03), 0.8)
        servers.append(srv(peer, start, start + length, rng.lognormvariate(math.log(20), 1.0), rng.choice([0, 10**4])))
    for i, server in enumerate(servers):  # measured pings to a few servers starting where it ends
        after = [s.peer_id for s in servers if s.span.start == server.span.end]
        measured = {p: rng.lognormvariate(math.log(0.02), 0.8) for p in rng.sample(after, min(20, len(after)))}
        servers[i] = dataclasses.replace(server, next_pings=measured)
    return servers, pings


@pytest.mark.parametrize("push", [False, True])
def test_simulated_swarm_fastest_beats_greedy_and_random_chains(push):
    rng = random.Random(7)
    servers, pings = lognormal_swarm(rng, 300, 24)
    span = BlockRange(0, 24)
    chain = fastest_chain(servers, span, pings, push=push)
    check_valid(chain, servers, span)
    cost = reference_cost(chain, servers, pings, push)
    assert cost <= reference_cost(make_chain(servers, span), servers, pings, push) + 1e-12
    for _ in range(200):
        assert cost <= reference_cost(random_chain(servers, span, rng), servers, pings, push) + 1e-12


@pytest.mark.parametrize("push", [False, True])
def test_a_thousand_servers_route_without_blowing_up(push):
    rng = random.Random(11)
    servers, pings = lognormal_swarm(rng, 1000, 30)
    started = time.perf_counter()
    chain = fastest_chain(servers, BlockRange(0, 30), pings, push=push)
    elapsed = time.perf_counter() - started
    print(f"fastest_chain, 1000 servers, 30 blocks, push={push}: {elapsed * 1000:.1f} ms")
    check_valid(chain, servers, BlockRange(0, 30))
    assert elapsed < 5.0  # catches blowups only; benchmarks measure speed


def test_spread_forward_follows_forward_throughput():
    servers = [srv("big", 0, 4, forward=300.0), srv("small", 0, 4, forward=100.0)]
    rng = random.Random(3)
    counts = Counter(spread_forward(servers, BlockRange(0, 4), rng)[0].peer_id for _ in range(4000))
    assert counts["big"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_spread_forward_falls_back_to_inference_throughput_then_one():
    servers = [srv("a", 0, 2, throughput=1.0), srv("b", 0, 2, throughput=3.0), srv("c", 0, 2, throughput=0.0)]
    rng = random.Random(5)
    counts = Counter(spread_forward(servers, BlockRange(0, 2), rng)[0].peer_id for _ in range(5000))
    assert counts["a"] / 5000 == pytest.approx(0.2, abs=0.03)
    assert counts["b"] / 5000 == pytest.approx(0.6, abs=0.03)
    assert counts["c"] / 5000 == pytest.approx(0.2, abs=0.03)


def test_spread_forward_prefers_near_servers_when_pings_are_known():
    servers = [srv("near", 0, 2, forward=100.0), srv("far", 0, 2, forward=100.0)]
    rng = random.Random(9)
    pings = {"near": 0.0, "far": 0.05}  # weights 100 / 1 and 100 / 2
    counts = Counter(spread_forward(servers, BlockRange(0, 2), rng, client_pings=pings)[0].peer_id for _ in range(3000))
    assert counts["near"] / 3000 == pytest.approx(2 / 3, abs=0.03)


def test_spread_forward_chains_are_valid_and_seeded():
    rng = random.Random(1)
    servers, _ = lognormal_swarm(rng, 60, 12)
    span = BlockRange(1, 12)
    chains = [spread_forward(servers, span, random.Random(seed)) for seed in range(50)]
    for chain in chains:
        check_valid(chain, servers, span)
    assert chains == [spread_forward(servers, span, random.Random(seed)) for seed in range(50)]
    assert len({tuple(c) for c in chains}) > 10
    with pytest.raises(MissingBlocksError) as info:
        spread_forward([srv("a", 0, 2)], BlockRange(0, 3), rng)
    assert info.value.blocks == [2]
