"""The pure decisions of what runs next: urgency order, decode batching, bounded slices, declared rounds.

``next_batch`` decides each slice from the items that are ready:

- The most urgent kind goes first: decode steps, then prefill steps, then stateless forward passes,
  then backward passes; within a kind, requesters with more points, then arrival order.
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


def next_batch(ready: list[Work], max_batch_tokens: int, chunk_token_blocks: int) -> tuple[list[Work], int]:
    """The items of the next slice (most urgent first) and how many blocks it runs. ``ready`` is not empty."""
    ordered = sorted(ready, key=Work.order)
    head = ordered[0]
    if head.kind != Kind.DECODE or head.solo:
        return [head], max(1, min(head.remaining, chunk_token_blocks // head.size))
    batch, tokens = [head], head.size
    for item in ordered[1:]:
        if item.kind > Kind.PREFILL or item.solo or (item.cursor, item.blocks.end) != (head.cursor, head.blocks.end):
            continue
        if item.cursor != item.blocks.start:  # a prefill already under way runs in its own slices
            continue
        if tokens + item.size <= max_batch_tokens:
            batch.append(item)
            tokens += item.size
    return batch, head.remaining


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
