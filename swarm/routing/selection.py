"""Pure block selection: which blocks a new server should host, and when a running one should move.

No I/O here. Inputs are ``ServerInfo`` records gathered from the DHT. Only ONLINE servers count, each
adding its ``throughput`` (inference steps/s through one block; anything not a positive finite number
adds 0) to every block of its span. A block whose total is 0 is a gap: no usable server hosts it. The
swarm's end-to-end throughput is its weakest block's total (0 while there is a gap).

``choose_span`` ranks every window of ``n`` contiguous blocks, best first, by:

1. the most gaps inside the window (a new server closes as many holes as it can);
2. the highest swarm throughput once the new server's throughput is added to the window;
3. the lowest minimum per-block throughput inside the window (it helps the weakest blocks);
4. the lowest sum of per-block throughputs inside the window;
5. the lowest start.

``should_move`` asks the same question for a running server with its own contribution taken out, and
says yes only for a real gain, so that balanced swarms do not flap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from swarm.net.records import ServerInfo, ServerState
from swarm.spans import BlockRange


def _throughput(value: float) -> float:
    return value if value > 0 and math.isfinite(value) else 0.0


def _check(num_blocks: int) -> None:
    if num_blocks < 1:
        raise ValueError(f"a model has at least one block, got num_blocks={num_blocks}")


def block_throughputs(servers: Iterable[ServerInfo], num_blocks: int) -> list[float]:
    """Total throughput of the servers hosting each block (spans clipped to the model).

    JOINING servers count as well: they are loading those blocks now, and counting them keeps two
    servers from choosing (or moving into) the same hole at once.
    """
    _check(num_blocks)
    totals = [0.0] * num_blocks
    for server in servers:
        if server.state not in (ServerState.ONLINE, ServerState.JOINING):
            continue
        throughput = _throughput(server.throughput)
        for block in range(server.span.start, min(server.span.end, num_blocks)):
            totals[block] += throughput
    return totals


def swarm_throughput(servers: Iterable[ServerInfo], num_blocks: int) -> float:
    """End-to-end throughput: the weakest block's total (0 if some block has no usable server)."""
    return min(block_throughputs(servers, num_blocks))


def choose_span(servers: Iterable[ServerInfo], num_blocks: int, n: int, own_throughput: float) -> BlockRange:
    """The ``n`` contiguous blocks where a new server of ``own_throughput`` helps most (rule: module doc).

    ``n >= num_blocks`` gives the whole model.
    """
    if n < 1:
        raise ValueError(f"a server hosts at least one block, got n={n}")
    return _best_window(block_throughputs(servers, num_blocks), n, _throughput(own_throughput))


def _best_window(totals: list[float], n: int, own: float) -> BlockRange:
    if n >= len(totals):
        return BlockRange(0, len(totals))
    prefix_min = [math.inf]  # prefix_min[k]: min of totals[:k]; suffix_min[k]: min of totals[k:]
    for total in totals:
        prefix_min.append(min(prefix_min[-1], total))
    suffix_min = [math.inf]
    for total in reversed(totals):
        suffix_min.append(min(suffix_min[-1], total))
    suffix_min.reverse()

    def rank(start: int) -> tuple[int, float, float, float, int]:
        inside = totals[start : start + n]
        outside = min(prefix_min[start], suffix_min[start + n])
        after = min(outside, min(inside) + own)
        gaps = sum(1 for total in inside if total <= 0)
        return (-gaps, -after, min(inside), sum(inside), start)

    best = min(range(len(totals) - n + 1), key=rank)
    return BlockRange(best, best + n)


def _with(totals: list[float], span: BlockRange, throughput: float) -> list[float]:
    """``totals`` with ``throughput`` added over ``span`` (clipped to the model)."""
    return [total + throughput if block in span else total for block, total in enumerate(totals)]


def should_move(
    servers: Iterable[ServerInfo], own_peer_id: str, num_blocks: int, balance_quality: float = 0.75
) -> BlockRange | None:
    """Where the running server ``own_peer_id`` should move its span, or None to stay.

    Its own record (any state) is taken out, and the best span of the same length for its throughput
    is chosen as for a new server. It moves there only if that helps enough:

    - the swarm's throughput would become more than 1 / ``balance_quality`` times what it is now
      (``new * balance_quality > current``; with the default, at least 1.33x), or
    - the swarm has gaps now and moving closes some of them without opening any new one (a server whose
      blocks others also host moves into the hole, even when other holes remain).

    None if its record is not among ``servers`` or if the best span is the current one.
    """
    _check(num_blocks)
    if not 0 < balance_quality <= 1:
        raise ValueError(f"balance_quality must be in (0, 1], got {balance_quality}")
    listed = list(servers)
    own = next((s for s in listed if s.peer_id == own_peer_id), None)
    if own is None:
        return None
    base = block_throughputs([s for s in listed if s.peer_id != own_peer_id], num_blocks)
    throughput = _throughput(own.throughput)
    length = max(1, min(own.span.end, num_blocks) - own.span.start)
    target = _best_window(base, length, throughput)
    if target == own.span:
        return None
    now, then = _with(base, own.span, throughput), _with(base, target, throughput)
    if min(then) * balance_quality > min(now):
        return target
    gaps_now = {block for block, total in enumerate(now) if total <= 0}
    gaps_then = {block for block, total in enumerate(then) if total <= 0}
    return target if gaps_then < gaps_now else None
