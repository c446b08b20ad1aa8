"""The pure decisions of what runs next: fair share, urgency order, decode batching, bounded slices, rounds.

``next_batch`` decides each slice from the items that are ready:

- Fair share (on unless a server turns it off): the peer (requester) that was served least goes first,
  counting the work a server did for each peer (rows x tokens x blocks) over its weight (1, plus 1 per
  decade of its standing's points: ``weight``). ``FairShare`` keeps these counts the way start-time fair
  queuing does: a peer whose work comes back after it had none queued starts where the least served
  peer stood when the last slice began, so being idle earns no credit, and a lone peer runs at full speed.
- Within a peer (or among all work, with fair share off), the most urgent kind goes first: decode steps,
  then prefill steps, then stateless forward passes, then backward passes; then more points, then
  arrival order.
- Decode steps that stand at the same blocks run together as one batch (up to ``max_batch_tokens``
  rows x tokens), whatever their sessions; small prefill steps ride along if there is room.
- Anything else runs alone, ``chunk_token_blocks // tokens`` blocks at a time, so a long prompt or a
  large forward pass delays the decode steps that arrive meanwhile by at most one bounded slice.

``hold_seconds`` decides how long a decode batch may wait for steps not queued yet:

- A client that steps many sessions together (the API engine, batched ``generate``) declares each
  round (``Round``: its id, and the number of its steps this server gets for the same blocks). A
  batch holding a declared round waits until all the round's steps are queued and then runs at once;
  a round whose steps never all arrive waits at most ``batch_wait``, then runs what is there.
- Undeclared steps keep the timer heuristic: ``ActiveSessions`` knows which sessions stepped lately
  without declaring rounds, and a batch waits a moment (at most half a decode slice) for those of them
  not queued yet, so sessions that step in lockstep share every batch. A lone session never waits.
"""

from __future__ import annotations

import math
from collections import Counter

from swarm.core.work import Kind, Work
from swarm.spans import BlockRange


class ActiveSessions:
    """The sessions that sent undeclared decode steps lately, by the blocks they run."""

    def __init__(self, window: float):
        self.window = window  # seconds after its last step that a session is forgotten at the latest
        self._seen: dict[tuple[BlockRange, int], float] = {}  # (blocks, session cache id) -> last step

    def __len__(self) -> int:
        return len(self._seen)  # bounded by age: entries older than the window go at each decode slice

    def saw(self, work: Work, now: float) -> None:
        if work.cache is not None and work.kind == Kind.DECODE and work.round is None:
            self._seen[(work.blocks, id(work.cache))] = now

    def expected(self, blocks: BlockRange, now: float, window: float | None = None) -> int:
        """How many sessions on ``blocks`` stepped within ``window`` seconds (they may step any moment)."""
        window = self.window if window is None else window
        self._seen = {key: seen for key, seen in self._seen.items() if now - seen <= max(window, self.window)}
        return sum(1 for (key_blocks, _), seen in self._seen.items() if key_blocks == blocks and now - seen <= window)


MAX_PEERS = 4096  # peers whose served work a FairShare remembers (those served least and not waiting go first)


def weight(points: float) -> float:
    """A peer's share of a busy server, from its standing: 1, plus 1 per decade of points."""
    return 1.0 + math.log10(1.0 + max(0.0, points))


def cost(item: Work, blocks: int) -> float:
    """What running ``blocks`` blocks of ``item`` counts against its peer's fair share."""
    return item.size * blocks / weight(item.points)


class FairShare:
    """Each peer's served work over its weight, and the virtual time of start-time fair queuing: the count
    of the least served peer when it last ran (new peers start there)."""

    def __init__(self, max_peers: int = MAX_PEERS):
        self.max_peers = max_peers
        self.served: dict[str, float] = {}  # peer -> sum of ``cost`` of its work run here (see ``catch_up``)
        self.clock = 0.0  # the count of the least served peer in the last slice, before that slice

    def __len__(self) -> int:
        return len(self.served)

    def catch_up(self, waiting: set[str]) -> None:
        """Before a decision: a peer now ``waiting`` without a count starts at ``clock``; a peer not waiting
        whose count is at most ``clock`` is forgotten (it would start there anyway: idle earns nothing)."""
        self.served = {peer: v for peer, v in self.served.items() if peer in waiting or v > self.clock}
        for peer in waiting:
            self.served.setdefault(peer, self.clock)
        if len(self.served) > self.max_peers:  # keep the waiting ones, then those served most
            kept = sorted(self.served, key=lambda peer: (peer not in waiting, -self.served[peer]))
            self.served = {peer: self.served[peer] for peer in kept[: self.max_peers]}

    def charge(self, items: list[Work], blocks: int) -> None:
        """Count a slice that ran ``blocks`` blocks of ``items``."""
        self.clock = max(self.clock, min(self.served.get(item.peer, self.clock) for item in items))
        for item in items:
            self.served[item.peer] = self.served.get(item.peer, self.clock) + cost(item, blocks)


def next_batch(
    ready: list[Work], max_batch_tokens: int, chunk_token_blocks: int, served: dict[str, float] | None = None
) -> tuple[list[Work], int]:
    """The items of the next slice (most urgent first) and how many blocks it runs. ``ready`` is not empty.
    ``served``: each waiting peer's count (``FairShare.served``) for fair share; None: urgency order only."""
    ordered = sorted(ready, key=Work.order)
    if served is not None:
        ordered.sort(key=lambda item: served.get(item.peer, 0.0))  # stable: urgency order within a peer
    head = ordered[0]
    if head.kind != Kind.DECODE or head.solo:
        return [head], max(1, min(head.remaining, chunk_token_blocks // head.size))
    riders = [item for item in ordered[1:] if _rides_with(head, item)]
    if served is None:
        batch, room = [head], max_batch_tokens - head.size
        for item in riders:
            if item.size <= room:
                batch.append(item)
                room -= item.size
        return batch, head.remaining
    return [head, *_fair_fill(head, riders, max_batch_tokens - head.size, served)], head.remaining


def _rides_with(head: Work, item: Work) -> bool:
    """Whether ``item`` can run in a decode batch led by ``head`` (same blocks ahead, a fresh small step)."""
    if item.kind > Kind.PREFILL or item.solo or (item.cursor, item.blocks.end) != (head.cursor, head.blocks.end):
        return False
    return item.cursor == item.blocks.start  # a prefill already under way runs in its own slices


def _fair_fill(head: Work, riders: list[Work], room: int, served: dict[str, float]) -> list[Work]:
    """Steps that join ``head`` within ``room`` rows x tokens: each time the next step (in urgency order) of
    the peer whose count, with the steps taken so far, is lowest."""
    queues: dict[str, list[Work]] = {}
    for item in riders:
        queues.setdefault(item.peer, []).append(item)
    blocks = head.remaining
    counts = {peer: served.get(peer, 0.0) for peer in queues}
    counts[head.peer] = served.get(head.peer, 0.0) + cost(head, blocks)
    taken = []
    while queues and room > 0:
        peer = min(queues, key=lambda p: (counts[p], queues[p][0].seq))
        item = queues[peer].pop(0)
        if not queues[peer]:
            del queues[peer]
        if item.size <= room:
            taken.append(item)
            room -= item.size
            counts[peer] += cost(item, blocks)
    return taken


def hold_seconds(
    batch: list[Work],
    ready: list[Work],
    expected: int,
    max_batch_tokens: int,
    batch_wait: float,
    decode_seconds: float,
) -> float:
    """How long after it was first chosen a decode ``batch`` may wait for more steps (0: run it now).

    ``ready``: every queued item; ``expected``: the undeclared sessions on the batch's blocks that stepped
    lately (``ActiveSessions.expected``); ``batch_wait``: the most any batch waits; ``decode_seconds``: the
    usual time of a decode slice (an undeclared batch waits at most half of it)."""
    if sum(item.size for item in batch) >= max_batch_tokens:
        return 0.0
    rounds = {item.round for item in batch if item.round is not None}
    if rounds:
        at = (batch[0].blocks, batch[0].cursor)
        queued = Counter(item.round for item in ready if item.round in rounds and (item.blocks, item.cursor) == at)
        if any(queued[declared] < declared.size for declared in rounds):
            return batch_wait  # a declared round is not all in yet
    undeclared = sum(1 for item in batch if item.round is None)
    if undeclared and undeclared < expected:
        return min(batch_wait, decode_seconds / 2)
    return 0.0
