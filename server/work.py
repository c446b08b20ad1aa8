"""Typed work items of a server's compute core, and the pure decision of what runs next.

Every piece of torch work a server does is a ``Work``: the blocks it must go through, its input
(the hidden states entering block ``cursor``) and, for an inference step, the session's cache. The
scheduler runs work in *slices*: some blocks of one or more items. ``next_batch`` decides each
slice from the items that are ready:

- The most urgent kind goes first: decode steps, then prefill steps, then stateless forward passes,
  then backward passes; within a kind, requesters with more points, then arrival order.
- Decode steps that stand at the same blocks run together as one batch (up to ``max_batch_tokens``
  rows x tokens), whatever their sessions; small prefill steps ride along if there is room.
- Anything else runs alone, ``chunk_token_blocks // tokens`` blocks at a time, so a long prompt or a
  large forward pass delays the decode steps that arrive meanwhile by at most one bounded slice.
- ``ActiveSessions`` knows which sessions stepped lately: a decode batch waits a moment (a fraction of
  a slice) for those of them not queued yet, so sessions that step in lockstep share every batch
  instead of one running alone while the rest queue behind it. A lone session never waits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.cache import SessionCache
from swarm.models.adapters import LoraAdapter
from swarm.spans import BlockRange

if TYPE_CHECKING:
    from server.backward import BackwardState


class Kind(enum.IntEnum):
    """What a piece of work is; a lower value is more urgent."""

    DECODE = 0  # an inference step of a few tokens: someone is waiting for each token
    PREFILL = 1  # an inference step of many tokens (a prompt)
    FORWARD = 2  # a stateless forward pass (batch work)
    BACKWARD = 3  # gradients through the blocks (training)


@dataclass(eq=False)
class Work:
    kind: Kind
    blocks: BlockRange  # absolute blocks to run, in order
    hidden: torch.Tensor  # [batch, tokens, hidden_size]: the input of block ``cursor`` (the output once done)
    position_ids: torch.Tensor  # [batch, tokens] int64
    cache: SessionCache | None = None  # an inference step's session cache; None for stateless work
    block_offset: int = 0  # index of the first block of the cache in the server's span
    padding: torch.Tensor | None = None  # stateless work: [batch, tokens] bool, False marks padding
    points: float = 0.0  # the requester's standing: more points go first within a kind
    cursor: int = field(init=False)  # the next block to run
    seq: int = 0  # arrival order, set by the scheduler
    solo: bool = False  # run alone (after a batch it was in failed)
    prompts: torch.Tensor | None = None  # [num_blocks, batch or 1, prefix, hidden]: added to the first tokens
    adapter: LoraAdapter | None = None  # LoRA on this item's rows
    reorder: torch.Tensor | None = None  # [batch] int64: the session cache's rows to keep, before the first slice
    block_outputs: list[torch.Tensor] | None = None  # a list: each block's output is appended to it
    backward: BackwardState | None = None  # BACKWARD work: the gradients and the walk back through the slices

    def __post_init__(self):
        self.cursor = self.blocks.start

    @property
    def size(self) -> int:
        """Rows x new tokens."""
        return self.hidden.shape[0] * self.hidden.shape[1]

    @property
    def remaining(self) -> int:
        return self.blocks.end - self.cursor

    def order(self) -> tuple:
        return (int(self.kind), -self.points, self.seq)


class ActiveSessions:
    """The sessions that sent decode steps lately, by the blocks they run."""

    def __init__(self, window: float):
        self.window = window  # seconds after its last step that a session is forgotten at the latest
        self._seen: dict[tuple[BlockRange, int], float] = {}  # (blocks, session cache id) -> last step

    def __len__(self) -> int:
        return len(self._seen)  # bounded by age: entries older than the window go at each decode slice

    def saw(self, work: Work, now: float) -> None:
        if work.cache is not None and work.kind == Kind.DECODE:
            self._seen[(work.blocks, id(work.cache))] = now

    def expected(self, blocks: BlockRange, now: float, window: float | None = None) -> int:
        """How many sessions on ``blocks`` stepped within ``window`` seconds (they may step any moment)."""
        window = self.window if window is None else window
        self._seen = {key: seen for key, seen in self._seen.items() if now - seen <= max(window, self.window)}
        return sum(1 for (key_blocks, _), seen in self._seen.items() if key_blocks == blocks and now - seen <= window)


def step_kind(size: int, decode_tokens: int) -> Kind:
    """An inference step of ``size`` rows x tokens is a decode step if it is small."""
    return Kind.DECODE if size <= decode_tokens else Kind.PREFILL


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
