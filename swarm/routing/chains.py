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

import numpy as np

from swarm.errors import MissingBlocksError
from swarm.net.records import ServerInfo, ServerState
from swarm.routing.search import Costs, search
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


def _costs(
    candidates: Sequence[ServerInfo],
    span: BlockRange,
    client_pings: Mapping[str, float],
    default_rtt: float,
    min_cache_tokens: int,
    cache_penalty: float,
    push: bool,
) -> Costs:
    """The latency model's numbers as arrays over ``candidates`` (see ``fastest_chain``)."""
    throughput = _numbers([s.throughput for s in candidates])
    rtt = _numbers([client_pings.get(s.peer_id, default_rtt) for s in candidates])
    cache = _numbers([s.cache_tokens_left for s in candidates])
    return Costs(
        start=np.array([max(s.span.start, span.start) - span.start for s in candidates], dtype=np.int64),
        end=np.array([min(s.span.end, span.end) - span.start for s in candidates], dtype=np.int64),
        step=1.0 / np.where((throughput > 0) & np.isfinite(throughput), throughput, DEFAULT_THROUGHPUT),
        penalty=np.where(cache < min_cache_tokens, cache_penalty, 0.0),
        rtt=np.where(rtt >= 0, rtt, default_rtt),  # NaN, negative and non-numbers count as missing
        links=_links(candidates) if push else None,
    )


def _numbers(values: list) -> np.ndarray:
    """``values`` as floats; anything that is not an int or float becomes NaN (missing)."""
    try:
        return np.array(values, dtype=float)
    except (TypeError, ValueError):
        return np.array([v if isinstance(v, int | float) else math.nan for v in values], dtype=float)


def _links(candidates: Sequence[ServerInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Measured one-way seconds between candidates, from their ``next_pings``: (from, to, seconds)."""
    index: dict[str, int] = {}
    duplicates: dict[str, list[int]] = {}  # a peer with several records: every one of them is a target
    for i, server in enumerate(candidates):
        if index.setdefault(server.peer_id, i) != i:
            duplicates.setdefault(server.peer_id, [index[server.peer_id]]).append(i)
    src, peers, values = [], [], []
    for i, server in enumerate(candidates):
        if server.next_pings:
            src.extend([i] * len(server.next_pings))
            peers.extend(server.next_pings)
            values.extend(server.next_pings.values())
    src = np.array(src, dtype=np.int64)
    dst = np.array([index.get(peer, -1) for peer in peers], dtype=np.int64)
    seconds = _numbers(values) / 2
    for peer, targets in duplicates.items():
        rows = np.flatnonzero(np.array([p == peer for p in peers], dtype=bool))
        for target in targets[1:]:
            src, dst, seconds = (
                np.append(src, src[rows]),
                np.append(dst, np.full(len(rows), target)),
                np.append(seconds, seconds[rows]),
            )
    keep = (dst >= 0) & (seconds >= 0)  # known targets, valid pings
    return src[keep], dst[keep], seconds[keep]


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

    A hop may run any sub-range of its server's span, and servers may change at any block (see
    ``swarm.routing.search`` for the search). Ties go to continuing the current hop, then to lower peer ids.

    Raises MissingBlocksError naming the blocks no given server covers. Callers filter servers first
    (online, bans, allow lists).
    """
    if not (default_rtt >= 0 and cache_penalty >= 0):
        raise ValueError(f"default_rtt and cache_penalty must be >= 0, got {default_rtt}, {cache_penalty}")
    candidates = _candidates(servers, span)
    if not candidates:
        raise MissingBlocksError(list(range(span.start, span.end)))
    costs = _costs(candidates, span, client_pings, default_rtt, min_cache_tokens, cache_penalty, push)
    covered = np.cumsum(
        np.bincount(costs.start, minlength=len(span) + 1) - np.bincount(costs.end, minlength=len(span) + 1)
    )
    if not covered[: len(span)].all():
        raise MissingBlocksError([span.start + int(b) for b in np.flatnonzero(covered[: len(span)] == 0)])
    hops = search(costs, len(span), push)
    return [Hop(candidates[i].peer_id, BlockRange(span.start + start, span.start + end)) for i, start, end in hops]


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
