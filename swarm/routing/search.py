"""The exact search behind ``routing.fastest_chain``, vectorised with numpy (pure).

States are (position p, server whose hop has just run block p - 1); from one, the hop either continues
on the same server or a new hop starts on any server covering p. Every edge advances p, so the graph is
acyclic and one pass in position order settles it exactly (Dijkstra's order and a topological order
coincide here). All states live in flat arrays ordered by (position, server index); each position is a
few array operations on its slice, so the cost grows with positions, not with (server, block) pairs.

Hop ends are NOT restricted to span boundaries. For a fixed sequence of servers the cost is linear in
each switch point, which suggests sliding switches to a boundary; but a switch can slide only until a
hop would become empty, and dropping an empty hop changes the links paid: pings need not obey the
triangle inequality, so a one-block hop on a slow server can be the cheapest relay between two servers
that cannot reach each other, and it then sits off the boundaries (a unit test has such a swarm).

Entering server s at p: with client relay it costs the cheapest arrival at p plus rtt(s), whoever came
before. With push it costs min over predecessors j of arrive[j] + link(j, s); measured links
(``next_pings``) are few, and every other link(j, s) is rtt(s) / 2 whoever j is, so the default entry
comes from the first predecessor, in increasing (arrive[j], j), that has no measurement of s. Ties go
to continuing the current hop, then to the default link, then to the predecessor with the lower index
(lower peer id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIENT = -1  # parent of a first hop: the client
_SAME = -2  # parent of a state whose hop continues from the same server's previous state


@dataclass(frozen=True)
class Costs:
    """The latency model's numbers, one entry per candidate server (indices into the candidate list)."""

    start: np.ndarray  # int: first block it can run, relative to the routed span (clipped to it)
    end: np.ndarray  # int: end of its blocks (exclusive), relative and clipped; > start
    step: np.ndarray  # seconds to run one block (1 / throughput)
    penalty: np.ndarray  # seconds added once per hop (cache penalty when short of cache)
    rtt: np.ndarray  # client <-> server round trip, seconds
    links: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # push: measured (from, to, one-way seconds)


class _States:
    """Every (position, server) state in flat arrays sorted by position, then server index."""

    def __init__(self, costs: Costs, length: int):
        positions = np.arange(length)[:, None]
        covers = (costs.start[None, :] <= positions) & (positions < costs.end[None, :])  # [length, servers]
        self.position, self.server = np.nonzero(covers)  # row-major: by position, then server
        self.total = len(self.server)
        self.flat = np.cumsum(covers.ravel()).reshape(covers.shape) - 1  # flat index of (p, s) where covered
        self.bounds = np.searchsorted(self.position, np.arange(length + 1))  # states of p: [bounds[p], bounds[p+1])
        self.continues = self.position > costs.start[self.server]  # the server also covers p - 1
        above = self.flat[np.maximum(self.position - 1, 0), self.server]
        self.previous = np.where(self.continues, above, self.total)  # total: no such state (the inf slot)
        self.costs = costs

    def index(self, server: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Flat indices of the states (position, server), which must be covered."""
        return self.flat[position, server]


def search(costs: Costs, length: int, push: bool) -> list[tuple[int, int, int]]:
    """The best chain as (server index, first block, end block) hops, positions relative to the span."""
    states = _States(costs, length)
    server, bounds = states.server, states.bounds
    step, penalty = costs.step[server], costs.penalty[server]
    network = costs.rtt[server] / 2 if push else costs.rtt[server]  # entering a state from anywhere
    links = _links_by_position(states, length) if push else [None] * length
    measures = np.zeros(states.total + 1, dtype=bool)  # states with a measured link to the next position
    for usable in links[1:] if push else ():
        measures[usable[0]] = True
    arrive = np.full(states.total + 1, np.inf)  # seconds to finish blocks < p on that state; [total] = none
    parent = np.empty(states.total, dtype=np.int64)
    for p in range(length):
        a, b = bounds[p], bounds[p + 1]
        if p == 0:
            entry, before = network[a:b], CLIENT
        else:
            entry, before = _entries(arrive, bounds[p - 1], a, b, network, links[p], measures)
        entry = entry + penalty[a:b]
        held = arrive[states.previous[a:b]]
        stay = states.continues[a:b] & (held <= entry)  # it ran block p - 1 too, no slower: continue
        arrive[a:b] = np.where(stay, held, entry) + step[a:b]
        parent[a:b] = np.where(stay, _SAME, before)
    a, b = bounds[length - 1], bounds[length]
    ending = arrive[a:b] + (network[a:b] if push else 0.0)  # push: the last server's way back to the client
    return _backtrack(states, parent, a + int(np.argmin(ending)), length)


def _entries(arrive, start_before, a, b, network, links, measures):
    """Cheapest hop start on each state of [a, b), as (seconds, flat index of the state before it).

    ``network`` is the cost of entering each state from anywhere (relay: rtt; push: the default link);
    ``links`` (push only) are the measured (from state, to local index in [a, b), seconds) usable at
    this position, sorted by target, then by source. Equal offers go to the default link, then to the
    lower index."""
    best = start_before + int(np.argmin(arrive[start_before:a]))  # the first of the cheapest: lowest index
    entry = arrive[best] + network[a:b]
    if links is None or not len(links[0]):
        return entry, best
    src, target, seconds = links
    before = np.full(b - a, best)
    if measures[best]:  # the best predecessor measured some: their default comes from another one
        _defaults_after_measurers(arrive, start_before, a, network, src, target, entry, before)
    offered = entry[target]
    measured = arrive[src] + seconds
    np.minimum.at(entry, target, measured)
    lowest = entry[target]
    better = np.flatnonzero((measured == lowest) & (lowest < offered))
    if len(better):  # the first of each target's winners: the lowest index
        first = np.ones(len(better), dtype=bool)
        first[1:] = target[better][1:] != target[better][:-1]
        before[target[better[first]]] = src[better[first]]
    return entry, before


def _defaults_after_measurers(arrive, start_before, a, network, src, target, entry, before) -> None:
    """For targets measured by the best predecessor, the default link comes from the first predecessor
    in (arrive, index) order that did not measure them (the ``mex`` of the ranks that did); written into
    ``entry`` and ``before``. If every predecessor measured a target, its default is inf."""
    order = np.argsort(arrive[start_before:a], kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    ranks = rank[src - start_before]
    by_target = np.lexsort((ranks, target))
    target, ranks = target[by_target], ranks[by_target]
    starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]])
    sizes = np.diff(np.r_[starts, len(target)])
    within = np.arange(len(target)) - np.repeat(starts, sizes)  # 0, 1, 2... inside each target's group
    gap = np.where(ranks == within, len(target) + 1, within)  # ranks 0..k-1 all present, then a gap at k
    first_gap = np.minimum.reduceat(gap, starts)
    default_rank = np.where(first_gap > len(target), sizes, first_gap)
    moved = default_rank > 0
    # a rank past the last predecessor points at the "no state" slot, whose arrival is inf
    ranked = np.append(start_before + order, len(arrive) - 1)[default_rank[moved]]
    targets = target[starts][moved]
    entry[targets] = arrive[ranked] + network[a + targets]
    before[targets] = ranked


def _links_by_position(states: _States, length: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Measured links usable at each position p: (from state, to local index among the states of p,
    seconds), from a server that ran block p - 1 to one covering p."""
    costs = states.costs
    src, dst, seconds = costs.links
    lo = np.maximum(costs.start[src] + 1, costs.start[dst])
    hi = np.minimum(costs.end[src], costs.end[dst] - 1)  # inclusive
    keep = lo <= hi
    src, dst, seconds, lo, hi = src[keep], dst[keep], seconds[keep], lo[keep], hi[keep]
    spans = hi - lo + 1
    ids = np.repeat(np.arange(len(src)), spans)
    positions = lo[ids] + np.arange(len(ids)) - np.repeat(np.cumsum(spans) - spans, spans)
    to_state = states.index(dst[ids], positions)
    from_state = states.index(src[ids], positions - 1)
    order = np.lexsort((from_state, to_state))  # by target (flat order is position order), then source
    from_state, to_state, seconds = from_state[order], to_state[order], seconds[ids][order]
    cut = np.searchsorted(to_state, states.bounds)
    target = to_state - states.bounds[states.position[to_state]]  # local index within its position
    return [(from_state[i:j], target[i:j], seconds[i:j]) for i, j in zip(cut[:-1], cut[1:], strict=True)]


def _backtrack(states: _States, parent: np.ndarray, state: int, length: int) -> list[tuple[int, int, int]]:
    hops, end = [], length
    while True:
        before = int(parent[state])
        if before == _SAME:
            state = int(states.previous[state])
            continue
        start = int(states.position[state])
        hops.append((int(states.server[state]), start, end))
        if before == CLIENT:
            return hops[::-1]
        state, end = before, start
