"""Pure routing: from the swarm's state to a chain of servers that covers a block range.

No I/O here. Inputs are ``ServerInfo`` records gathered from the DHT; the output is a list of
``Hop`` objects, each naming a server and the sub-span of blocks it should run.

- ``make_chain``: fewest hops (greedy farthest reach), cache-aware
- ``fastest_chain``: lowest expected latency per token (inference), exact shortest path
- ``chain_latency``: the same latency model evaluated on any chain (logging, benchmarks, tests)
- ``spread_forward``: random chains weighted by forward throughput, for batched forward/backward
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from swarm.errors import MissingBlocksError
from swarm.records import ServerInfo, ServerState
from swarm.spans import BlockRange


@dataclass(frozen=True)
class Hop:
    """Run blocks ``span`` on server ``peer_id``."""

    peer_id: str
    span: BlockRange


def usable(servers: Iterable[ServerInfo], banned: frozenset[str] | set[str] = frozenset()) -> list[ServerInfo]:
    """Servers that are online and not banned by the caller."""
    return [s for s in servers if s.state == ServerState.ONLINE and s.peer_id not in banned]


def uncovered_blocks(servers: Iterable[ServerInfo], span: BlockRange) -> list[int]:
    """Blocks of ``span`` that no server in ``servers`` hosts."""
    covered: set[int] = set()
    for server in servers:
        covered.update(range(max(server.span.start, span.start), min(server.span.end, span.end)))
    return [b for b in range(span.start, span.end) if b not in covered]


def make_chain(servers: Iterable[ServerInfo], span: BlockRange, min_cache_tokens: int = 0) -> list[Hop]:
    """A chain that covers ``span``: at each position, the server reaching farthest (ties: higher
    throughput, then peer id), which gives the fewest hops when cache does not matter.

    Servers with less free cache than ``min_cache_tokens`` are used only where no server with enough
    cache covers the position (so a full server is skipped even if it reaches farther).
    Raises MissingBlocksError naming the blocks nobody covers.
    """
    candidates = list(servers)
    missing = uncovered_blocks(candidates, span)
    if missing:
        raise MissingBlocksError(missing)

    chain: list[Hop] = []
    position = span.start
    while position < span.end:
        here = [s for s in candidates if s.span.start <= position < s.span.end]
        roomy = [s for s in here if s.cache_tokens_left >= min_cache_tokens] or here
        best = max(roomy, key=lambda s: (min(s.span.end, span.end), s.throughput, s.peer_id))
        end = min(best.span.end, span.end)
        chain.append(Hop(best.peer_id, BlockRange(position, end)))
        position = end
    return chain


def coverage(servers: Iterable[ServerInfo], num_blocks: int) -> list[int]:
    """Number of online servers hosting each block of a model with ``num_blocks`` blocks."""
    counts = [0] * num_blocks
    for server in servers:
        if server.state != ServerState.ONLINE:
            continue
        for block in range(server.span.start, min(server.span.end, num_blocks)):
            counts[block] += 1
    return counts


DEFAULT_THROUGHPUT = 1.0  # steps/s assumed for a server announcing no usable throughput: slow but usable
_CLIENT = -1  # index of the client in the chain search: the "server" before the first hop


def _seconds(value: object, fallback: float) -> float:
    """A measured duration if it is a number >= 0 (inf allowed: unreachable), else ``fallback``."""
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    return fallback


def _speed(value: float, fallback: float) -> float:
    return value if value > 0 and math.isfinite(value) else fallback


def _candidates(servers: Iterable[ServerInfo], span: BlockRange) -> list[ServerInfo]:
    """Servers overlapping ``span``, in a fixed order (peer id, span) so results do not depend on input order."""
    overlapping = [s for s in servers if s.span.start < span.end and span.start < s.span.end]
    return sorted(overlapping, key=lambda s: (s.peer_id, s.span.start, s.span.end))


@dataclass(frozen=True)
class _Latency:
    """The latency model's numbers, per server index of the candidate list."""

    step: list[float]  # seconds to run one block (1 / throughput)
    penalty: list[float]  # seconds added once per hop: cache_penalty if the server is short of cache
    rtt: list[float]  # client <-> server round trip
    links: list[dict[int, float]]  # push mode: one-way seconds to the servers it measured (by index)
    push: bool

    def exit(self, last: int) -> float:
        """Network seconds after the last hop: its way back to the client (push mode only)."""
        return self.rtt[last] / 2 if self.push else 0.0


def _latency(
    candidates: Sequence[ServerInfo],
    client_pings: Mapping[str, float],
    default_rtt: float,
    min_cache_tokens: int,
    cache_penalty: float,
    push: bool,
) -> _Latency:
    indices: dict[str, list[int]] = {}
    for i, server in enumerate(candidates):
        indices.setdefault(server.peer_id, []).append(i)
    links: list[dict[int, float]] = []
    for server in candidates if push else ():
        measured = {}
        for peer, value in server.next_pings.items():
            targets = indices.get(peer)
            if targets and isinstance(value, int | float) and value >= 0:
                for j in targets:
                    measured[j] = value / 2
        links.append(measured)
    return _Latency(
        step=[1.0 / _speed(s.throughput, DEFAULT_THROUGHPUT) for s in candidates],
        penalty=[cache_penalty if s.cache_tokens_left < min_cache_tokens else 0.0 for s in candidates],
        rtt=[_seconds(client_pings.get(s.peer_id), default_rtt) for s in candidates],
        links=links,
        push=push,
    )


# How fastest_chain searches. States are (position p, server whose hop has just run block p - 1); from
# one, the hop either continues on the same server or a new hop starts on any server covering p. Every
# edge advances p, so the graph is acyclic and one pass in position order settles it exactly (Dijkstra's
# order and a topological order coincide here), over sum-of-coverage states.
#
# Hop ends are NOT restricted to span boundaries. For a fixed sequence of servers the cost is linear in
# each switch point, which suggests sliding switches to a boundary; but a switch can slide only until a
# hop would become empty, and dropping an empty hop changes the links paid: pings need not obey the
# triangle inequality, so a one-block hop on a slow server can be the cheapest relay between two servers
# that cannot reach each other, and it then sits off the boundaries (a unit test has such a swarm).
#
# Push mode: entering s at p costs min over predecessors j of arrive[j] + link(j, s). Measured links
# (``next_pings``) are few; every other link(j, s) is rtt(s) / 2 whoever j is, so the first j in
# increasing arrive[j] that has no measurement of s gives the best unmeasured entry. Each position costs
# O(sort + measured links) instead of O(servers^2).


def fastest_chain(
    servers: Iterable[ServerInfo],
    span: BlockRange,
    client_pings: Mapping[str, float],
    *,
    default_rtt: float = 0.05,
    min_cache_tokens: int = 0,
    cache_penalty: float = 1.0,
    push: bool = False,
) -> list[Hop]:
    """The inference chain over ``span`` with the lowest expected latency per token (exact optimum).

    Cost model, in seconds per generated token (``chain_latency`` evaluates it on any chain):

    - compute: a hop running blocks [p, q) on server s costs (q - p) / s.throughput; a throughput that
      is not a positive finite number counts as ``DEFAULT_THROUGHPUT`` (1 step/s: usable, heavily penalised);
    - network, client relay (``push=False``): every hop costs the client's round trip to its server,
      ``client_pings.get(s, default_rtt)``;
    - network, server-to-server push (``push=True``): the first hop costs client->s1, half its round trip;
      a later hop costs prev->s one way, ``prev.next_pings.get(s, client_pings.get(s, default_rtt)) / 2``;
      the end costs last->client, half its round trip. Pings that are not numbers >= 0 count as missing;
    - cache: a server with ``cache_tokens_left < min_cache_tokens`` adds ``cache_penalty`` per hop, so it is
      used only where that is worth ``cache_penalty`` seconds (or where nothing else covers the blocks).

    A hop may run any sub-range of its server's span, and servers may change at any block (see the
    search notes above). Ties go to continuing the current hop, then to lower peer ids.

    Raises MissingBlocksError naming the blocks no given server covers. Callers filter servers first
    (online, bans, allow lists).
    """
    if not (default_rtt >= 0 and cache_penalty >= 0):
        raise ValueError(f"default_rtt and cache_penalty must be >= 0, got {default_rtt}, {cache_penalty}")
    candidates = _candidates(servers, span)
    missing = uncovered_blocks(candidates, span)
    if missing:
        raise MissingBlocksError(missing)
    latency = _latency(candidates, client_pings, default_rtt, min_cache_tokens, cache_penalty, push)
    covering: list[list[int]] = [[] for _ in range(len(span))]
    for i, server in enumerate(candidates):
        for block in range(max(server.span.start, span.start), min(server.span.end, span.end)):
            covering[block - span.start].append(i)

    arrive: dict[int, float] = {_CLIENT: 0.0}  # server whose hop has run the blocks so far -> seconds
    parents: list[dict[int, int]] = []  # per block: server -> server before it (itself: same hop)
    for cover in covering:
        entries = _entries_push(arrive, cover, latency) if push else _entries_relay(arrive, cover, latency)
        reached, parent = {}, {}
        for i in cover:
            cost, before = entries[i]
            cost += latency.penalty[i]
            held = arrive.get(i)
            if held is not None and held <= cost:
                cost, before = held, i
            reached[i], parent[i] = cost + latency.step[i], before
        arrive = reached
        parents.append(parent)
    last = min(arrive, key=lambda i: (arrive[i] + latency.exit(i), i))
    return _backtrack(parents, last, candidates, span)


def _entries_relay(arrive: dict[int, float], cover: list[int], latency: _Latency) -> dict[int, tuple[float, int]]:
    """Client relay: entering s costs rtt(s) whoever came before, so the cheapest predecessor serves all."""
    before = min(arrive, key=lambda j: (arrive[j], j))
    return {i: (arrive[before] + latency.rtt[i], before) for i in cover}


def _entries_push(arrive: dict[int, float], cover: list[int], latency: _Latency) -> dict[int, tuple[float, int]]:
    """Push: the cheapest way to start a hop on each server of ``cover``, as (seconds, predecessor)."""
    best: dict[int, tuple[float, int]] = {}
    wanted, unmeasured = set(cover), set(cover)  # unmeasured: no default-link offer made yet
    ceiling = math.inf  # once every server has an offer: no entry costs more (links are >= 0)
    for rank, before in enumerate(sorted(arrive, key=lambda j: (arrive[j], j))):
        base = arrive[before]
        if base >= ceiling and not unmeasured:
            break  # this and later predecessors cannot improve any entry
        links = latency.links[before] if before != _CLIENT else {}
        if len(links) <= len(wanted):
            measured = [(i, cost) for i, cost in links.items() if i in wanted]
        else:
            measured = [(i, links[i]) for i in wanted if i in links]
        if unmeasured:
            fresh = [i for i in unmeasured if i not in links]
            measured.extend((i, latency.rtt[i] / 2) for i in fresh)
            unmeasured.difference_update(fresh)
        for i, link in measured:
            cost = base + link
            if i not in best or cost < best[i][0]:
                best[i] = (cost, before)
        if not unmeasured and (ceiling == math.inf or rank % 16 == 0):
            ceiling = max(cost for cost, _ in best.values())
    return best


def _backtrack(parents: list[dict[int, int]], last: int, candidates: list[ServerInfo], span: BlockRange) -> list[Hop]:
    hops: list[Hop] = []
    server, position, end = last, span.end, span.end
    while server != _CLIENT:
        before = parents[position - span.start - 1][server]
        position -= 1
        if before != server:  # the hop on ``server`` starts at ``position``
            hops.append(Hop(candidates[server].peer_id, BlockRange(position, end)))
            server, end = before, position
    hops.reverse()
    return hops


def chain_latency(
    chain: Sequence[Hop],
    servers: Iterable[ServerInfo],
    client_pings: Mapping[str, float],
    *,
    default_rtt: float = 0.05,
    min_cache_tokens: int = 0,
    cache_penalty: float = 1.0,
    push: bool = False,
) -> float:
    """Expected seconds per token of ``chain`` under ``fastest_chain``'s cost model.

    Servers are looked up by peer id (the first record of a peer wins); an unknown peer is a ValueError.
    """
    by_peer: dict[str, ServerInfo] = {}
    for server in servers:
        by_peer.setdefault(server.peer_id, server)
    total, previous = 0.0, None
    for hop in chain:
        server = by_peer.get(hop.peer_id)
        if server is None:
            raise ValueError(f"chain names unknown server {hop.peer_id}")
        rtt = _seconds(client_pings.get(server.peer_id), default_rtt)
        if not push:
            total += rtt
        elif previous is None:
            total += rtt / 2
        else:
            total += _seconds(previous.next_pings.get(server.peer_id), rtt) / 2
        total += len(hop.span) / _speed(server.throughput, DEFAULT_THROUGHPUT)
        total += cache_penalty if server.cache_tokens_left < min_cache_tokens else 0.0
        previous = server
    if push and previous is not None:
        total += _seconds(client_pings.get(previous.peer_id), default_rtt) / 2
    return total


def spread_forward(
    servers: Iterable[ServerInfo],
    span: BlockRange,
    rng: random.Random,
    *,
    client_pings: Mapping[str, float] | None = None,
    default_rtt: float = 0.05,
) -> list[Hop]:
    """A random chain for batched forward/backward passes that spreads load by forward throughput.

    From the first block on, each hop picks one of the servers covering the current block at random,
    with probability proportional to its weight, and runs as far as that server reaches. The weight is
    ``forward_throughput`` (else ``throughput``, else 1.0 where those are not positive finite numbers).
    With ``client_pings``, a server's weight is divided by ``1 + rtt / default_rtt``: a server twice as
    far as the default round trip gets 2/3 of the load of one at the default distance. Only ``rng``
    makes choices, so a seeded ``rng`` gives the same chain. Raises MissingBlocksError for uncovered blocks.
    """
    if not default_rtt > 0:
        raise ValueError(f"default_rtt must be > 0, got {default_rtt}")
    candidates = _candidates(servers, span)
    missing = uncovered_blocks(candidates, span)
    if missing:
        raise MissingBlocksError(missing)
    weights = []
    for server in candidates:
        weight = _speed(server.forward_throughput, _speed(server.throughput, 1.0))
        if client_pings is not None:
            weight /= 1.0 + _seconds(client_pings.get(server.peer_id), default_rtt) / default_rtt
        weights.append(max(weight, 1e-12))  # an unreachable (inf) server is chosen only if it is alone
    chain: list[Hop] = []
    position = span.start
    while position < span.end:
        here = [i for i, server in enumerate(candidates) if position in server.span]
        chosen = rng.choices(here, weights=[weights[i] for i in here])[0]
        end = min(candidates[chosen].span.end, span.end)
        chain.append(Hop(candidates[chosen].peer_id, BlockRange(position, end)))
        position = end
    return chain
