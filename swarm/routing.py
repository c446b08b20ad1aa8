"""Pure routing: from the swarm's state to a chain of servers that covers a block range.

No I/O here. Inputs are ``ServerInfo`` records gathered from the DHT; the output is a list of
``Hop`` objects, each naming a server and the sub-span of blocks it should run.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    """The chain with the fewest hops that covers ``span`` (ties: higher throughput, then peer id).

    Greedy by farthest reach is optimal for the hop count on intervals. Servers with less free cache
    than ``min_cache_tokens`` are used only where nothing else covers a block.
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
