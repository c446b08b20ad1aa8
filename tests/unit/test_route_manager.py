"""RouteManager without a network: bans with exponential backoff, allow/block lists, bounded waiting."""

from __future__ import annotations

import time

import pytest

from client.config import ClientConfig
from client.sequence import RouteManager
from swarm.errors import MissingBlocksError
from swarm.records import ServerInfo, ServerState
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(30)


class FixedSwarm:
    """Stands in for SwarmDHT.fetch_servers: returns a fixed list of records."""

    def __init__(self, servers):
        self.servers = servers

    def fetch_servers(self, prefix, num_blocks):
        return list(self.servers)


def server(peer, start, end, throughput=1.0):
    return ServerInfo(peer, ServerState.ONLINE, BlockRange(start, end), throughput, cache_tokens_left=1000)


def manager(servers, **options):
    return RouteManager(FixedSwarm(servers), "m", 4, ClientConfig(**options))


def test_ban_doubles_with_each_failure_and_is_capped():
    routes = manager([server("a", 0, 4)], ban_base=1.0, ban_max=5.0)
    assert [routes.ban("a") for _ in range(5)] == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0], abs=0.01)


def test_successes_forgive_past_failures_one_at_a_time():
    routes = manager([server("a", 0, 4)], ban_base=1.0, ban_max=100.0, ban_forgive_steps=3)
    for _ in range(3):
        routes.ban("a")  # 3 failures held: the next ban would be 8 s
    for _ in range(3 * 2):
        routes.mark_ok("a")  # two failures forgiven
    assert routes.ban("a") == pytest.approx(2.0, abs=0.01)
    for _ in range(3 * 2):
        routes.mark_ok("a")  # both remaining failures forgiven: a clean slate
    assert routes.ban("a") == pytest.approx(1.0, abs=0.01)


def test_successes_of_servers_never_banned_change_nothing():
    routes = manager([server("a", 0, 4)], ban_base=1.0)
    routes.mark_ok("a")
    assert routes.banned() == set()
    assert routes.ban("a") == pytest.approx(1.0, abs=0.01)


def test_banned_server_is_avoided_until_its_ban_expires():
    routes = manager([server("fast", 0, 4, 10.0), server("slow", 0, 4, 1.0)], ban_base=0.3)
    assert routes.chain()[0].peer_id == "fast"
    routes.ban("fast")
    assert routes.chain()[0].peer_id == "slow"
    deadline = time.monotonic() + 5
    while "fast" in routes.banned():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert routes.chain()[0].peer_id == "fast"


def test_allow_and_block_lists():
    servers = [server("a", 0, 4, 3.0), server("b", 0, 4, 2.0), server("c", 0, 4, 1.0)]
    assert manager(servers, blocked_peers=["a"]).chain()[0].peer_id == "b"
    assert manager(servers, allowed_peers=["c"]).chain()[0].peer_id == "c"


def test_missing_blocks_raise_after_the_bounded_wait():
    routes = manager([server("a", 0, 2)], wait_for_blocks=0.5)
    started = time.monotonic()
    with pytest.raises(MissingBlocksError) as caught:
        routes.chain()
    assert caught.value.blocks == [2, 3]
    assert 0.5 <= time.monotonic() - started < 3


def test_banned_only_server_waits_for_ban_to_expire_within_the_wait():
    routes = manager([server("a", 0, 4)], ban_base=0.5, wait_for_blocks=5)
    routes.ban("a")
    assert routes.chain()[0].peer_id == "a"


class SlowSwarm(FixedSwarm):
    """A DHT whose look-ups take ``delay`` seconds after the first (as when some DHT peers have died)."""

    def __init__(self, servers, delay: float):
        super().__init__(servers)
        self.delay, self.calls = delay, 0

    def fetch_servers(self, prefix, num_blocks):
        self.calls += 1
        if self.calls > 1:
            time.sleep(self.delay)
        return list(self.servers)


def test_a_stale_view_is_used_at_once_while_a_fresh_one_is_fetched():
    dht = SlowSwarm([server("a", 0, 4)], delay=1.0)
    routes = RouteManager(dht, "m", 4, ClientConfig(update_period=0.0))
    assert [s.peer_id for s in routes.servers()] == ["a"]  # the first view is fetched synchronously
    dht.servers = [server("a", 0, 4), server("b", 0, 4)]
    started = time.monotonic()
    assert [hop.peer_id for hop in routes.chain(BlockRange(0, 4))] == ["a"]  # from the stale view, no waiting
    assert routes.pings() == {}  # nothing else waits for the look-up either
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 10
    while {s.peer_id for s in routes.servers()} != {"a", "b"} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {s.peer_id for s in routes.servers()} == {"a", "b"}  # the background look-up landed
