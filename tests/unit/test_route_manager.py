"""RouteManager without a network: bans with exponential backoff, allow/block lists, bounded waiting, a stale
view refreshed in the background while look-ups go on."""

from __future__ import annotations

import asyncio
import time

import pytest

from client.config import ClientConfig
from client.sequence import RouteManager
from swarm.errors import MissingBlocksError
from swarm.net.records import ServerInfo, ServerState
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(30)


class FixedSwarm:
    """Stands in for SwarmDHT.fetch_servers_async: returns a fixed list of records."""

    def __init__(self, servers):
        self.servers = servers

    async def fetch_servers_async(self, prefix, num_blocks):
        return list(self.servers)


def server(peer, start, end, throughput=1.0):
    return ServerInfo(peer, ServerState.ONLINE, BlockRange(start, end), throughput, cache_tokens_left=1000)


def manager(servers, **options):
    return RouteManager(FixedSwarm(servers), "m", 4, ClientConfig(**options))


def first(routes: RouteManager) -> str:
    """The first server of a chain over the whole model (the look-up runs on an event loop of its own)."""
    return asyncio.run(routes.chain())[0].peer_id


def wait_unbanned(routes: RouteManager, peer: str) -> None:
    deadline = time.monotonic() + 5
    while peer in routes.banned():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def ban_after_ban(routes: RouteManager, peer: str) -> float:
    """A new failure once the running ban is over (failures during a ban count once)."""
    wait_unbanned(routes, peer)
    return routes.ban(peer)


def test_ban_doubles_with_each_failure_and_is_capped():
    routes = manager([server("a", 0, 4)], ban_base=0.02, ban_max=0.1)
    assert [ban_after_ban(routes, "a") for _ in range(5)] == pytest.approx([0.02, 0.04, 0.08, 0.1, 0.1], abs=0.005)


def test_failures_during_a_running_ban_count_once():
    """8 sessions that were all using a busy server fail together: one ban, not 2^8 times longer."""
    routes = manager([server("a", 0, 4)], ban_base=1.0, ban_max=300.0)
    bans = [routes.ban("a") for _ in range(8)]
    assert bans == pytest.approx([1.0] * 8, abs=0.05)


def test_successes_forgive_past_failures_one_at_a_time():
    routes = manager([server("a", 0, 4)], ban_base=0.01, ban_max=100.0, ban_forgive_steps=3)
    for _ in range(3):
        ban_after_ban(routes, "a")  # 3 failures held: the next ban would be 0.08 s
    for _ in range(3 * 2):
        routes.mark_ok("a")  # two failures forgiven
    assert ban_after_ban(routes, "a") == pytest.approx(0.02, abs=0.005)
    for _ in range(3 * 2):
        routes.mark_ok("a")  # both remaining failures forgiven: a clean slate
    assert ban_after_ban(routes, "a") == pytest.approx(0.01, abs=0.005)


def test_successes_of_servers_never_banned_change_nothing():
    routes = manager([server("a", 0, 4)], ban_base=1.0)
    routes.mark_ok("a")
    assert routes.banned() == set()
    assert routes.ban("a") == pytest.approx(1.0, abs=0.01)


def test_banned_server_is_avoided_until_its_ban_expires():
    routes = manager([server("fast", 0, 4, 10.0), server("slow", 0, 4, 1.0)], ban_base=0.3)
    assert first(routes) == "fast"
    routes.ban("fast")
    assert first(routes) == "slow"
    deadline = time.monotonic() + 5
    while "fast" in routes.banned():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert first(routes) == "fast"


def test_allow_and_block_lists():
    servers = [server("a", 0, 4, 3.0), server("b", 0, 4, 2.0), server("c", 0, 4, 1.0)]
    assert first(manager(servers, blocked_peers=["a"])) == "b"
    assert first(manager(servers, allowed_peers=["c"])) == "c"


def test_missing_blocks_raise_after_the_bounded_wait():
    routes = manager([server("a", 0, 2)], wait_for_blocks=0.5)
    started = time.monotonic()
    with pytest.raises(MissingBlocksError) as caught:
        first(routes)
    assert caught.value.blocks == [2, 3]
    assert 0.5 <= time.monotonic() - started < 3


def test_banned_only_server_waits_for_ban_to_expire_within_the_wait():
    routes = manager([server("a", 0, 4)], ban_base=0.5, wait_for_blocks=5)
    routes.ban("a")
    assert first(routes) == "a"


class SlowSwarm(FixedSwarm):
    """A DHT whose look-ups take ``delay`` seconds after the first (as when some DHT peers have died)."""

    def __init__(self, servers, delay: float):
        super().__init__(servers)
        self.delay, self.calls = delay, 0

    async def fetch_servers_async(self, prefix, num_blocks):
        self.calls += 1
        servers = list(self.servers)
        if self.calls > 1:
            await asyncio.sleep(self.delay)  # the slow DHT (the event loop stays free meanwhile)
        return servers


def test_a_stale_view_is_used_at_once_while_a_fresh_one_is_fetched():
    async def scenario() -> None:
        dht = SlowSwarm([server("a", 0, 4)], delay=1.0)
        routes = RouteManager(dht, "m", 4, ClientConfig(update_period=0.0))
        assert [s.peer_id for s in await routes.servers()] == ["a"]  # the first view is awaited
        dht.servers = [server("a", 0, 4), server("b", 0, 4)]
        started = time.monotonic()
        assert [hop.peer_id for hop in await routes.chain(BlockRange(0, 4))] == ["a"]  # the stale view, at once
        assert time.monotonic() - started < 0.5
        deadline = time.monotonic() + 10
        while {s.peer_id for s in routes.view()} != {"a", "b"} and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert {s.peer_id for s in routes.view()} == {"a", "b"}  # the background look-up landed
        assert dht.calls == 2  # one background look-up at a time, however often the stale view was read

    asyncio.run(scenario())


def test_waiting_for_missing_blocks_leaves_the_event_loop_free():
    async def scenario() -> float:
        dht = FixedSwarm([server("a", 0, 2)])
        routes = RouteManager(dht, "m", 4, ClientConfig(wait_for_blocks=10))
        waiting = asyncio.ensure_future(routes.chain())
        ticks = 0
        deadline = time.monotonic() + 5
        while ticks < 5 and time.monotonic() < deadline:  # the loop runs other work while the chain waits
            await asyncio.sleep(0.05)
            ticks += 1
        assert ticks == 5 and not waiting.done()
        dht.servers = [server("a", 0, 2), server("b", 2, 4)]  # the missing blocks get a server
        started = time.monotonic()
        assert [hop.peer_id for hop in await waiting] == ["a", "b"]
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 2  # found by the next look-ups, long before wait_for_blocks


def test_many_sessions_looking_for_a_missing_span_share_look_ups():
    """16 shadows asking at once for a fresh view cost at most two look-ups (the one in flight when they
    asked cannot count: it began before them), and a view younger than ``max_age`` costs none."""

    async def scenario() -> None:
        dht = SlowSwarm([server("a", 0, 4)], delay=0.2)
        routes = RouteManager(dht, "m", 4, ClientConfig())
        await routes.servers()
        assert dht.calls == 1
        await asyncio.gather(*(routes.servers(refresh=True) for _ in range(16)))
        assert 2 <= dht.calls <= 3
        calls = dht.calls
        dht.servers = [server("a", 0, 4), server("b", 0, 4)]
        fresh = await routes.servers(refresh=True)  # asked after the last look-up ended: a new one
        assert dht.calls == calls + 1 and {s.peer_id for s in fresh} == {"a", "b"}
        await asyncio.gather(*(routes.candidates(max_age=5.0) for _ in range(16)))
        assert dht.calls == calls + 1  # the view is younger than 5 s
        await asyncio.sleep(0.3)
        await asyncio.gather(*(routes.candidates(max_age=0.1) for _ in range(16)))
        assert dht.calls == calls + 2  # older than 0.1 s: one look-up for all of them

    asyncio.run(scenario())
