"""Typed work items: every piece of torch work on a span of blocks, and the hooks that run it in slices.

A ``Work`` holds the blocks it must go through, its input (the hidden states entering block ``cursor``)
and what its attention needs (a session's cache, or a stateless pass's padding). Each kind of work is a
small class with the same three hooks, so whoever runs work (a server's scheduler, the client's referee)
needs no branch per kind:

- ``prepare()``: once, before the item's first slice (an inference step reorders its cache's rows);
- ``run_slice(stack, items, blocks)``: ``blocks`` more blocks of some items of one class, run together;
- ``result()``: the item's answer once it is done, else None (more slices to run).

Kinds: ``InferenceStep`` (a session's step: decode or prefill, with the session's KV cache),
``ForwardPass`` (stateless), and ``swarm.core.backward.BackwardPass`` (gradients). ``run_slice`` is the
one entry point that applies the hooks; ``run_to_end`` runs one item through all its blocks.

Concurrency: items are plain data touched by one thread at a time (a server's compute thread, or the
referee's caller).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import torch

from swarm.core.cache import SessionCache
from swarm.models.adapters import LoraAdapter
from swarm.spans import BlockRange


class Kind(enum.IntEnum):
    """What a piece of work is; a lower value is more urgent."""

    DECODE = 0  # an inference step of a few tokens: someone is waiting for each token
    PREFILL = 1  # an inference step of many tokens (a prompt)
    FORWARD = 2  # a stateless forward pass (batch work)
    BACKWARD = 3  # gradients through the blocks (training)


class Stack(Protocol):
    """What work runs on: ``swarm.core.blocks.BlockStack``."""

    def run(self, items: list[Work], num_blocks: int) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class Round:
    """A decode round a client declared: ``size`` steps (one per session) that it sends to one server for
    the same blocks at about the same time."""

    owner: str  # who declared it (the client's peer id): round ids of different clients never mix
    id: int
    size: int


@dataclass(eq=False)
class Work:
    blocks: BlockRange  # absolute blocks to run, in order
    hidden: torch.Tensor  # [batch, tokens, hidden_size]: the input of block ``cursor`` (the output once done)
    position_ids: torch.Tensor  # [batch, tokens] int64
    cache: SessionCache | None = None  # the KV cache attention writes to (inference steps); None when stateless
    block_offset: int = 0  # index of the first block of the cache (or of ``blocks``) in the server's span
    padding: torch.Tensor | None = None  # stateless work: [batch, tokens] bool, False marks padding
    points: float = 0.0  # the requester's standing: more points go first within a kind, and a larger fair share
    peer: str = ""  # who asked for it (a peer id): a busy server shares its compute fairly between peers
    kind: Kind = Kind.FORWARD  # how urgent (each class sets its own)
    cursor: int = field(init=False)  # the next block to run
    seq: int = 0  # arrival order, set by the scheduler
    solo: bool = False  # run alone (after a batch it was in failed)
    prepared: bool = False  # ``prepare`` ran
    prompts: torch.Tensor | None = None  # [num_blocks, batch or 1, prefix, hidden]: added to the first tokens
    adapter: LoraAdapter | None = None  # LoRA on this item's rows
    block_outputs: list[torch.Tensor] | None = None  # a list: each block's output is appended to it
    round: Round | None = None  # decode steps: the round its client declared (None: undeclared)

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

    def prepare(self) -> None:
        """Run once before the first slice."""

    @classmethod
    def run_slice(cls, stack: Stack, items: list[Work], blocks: int) -> None:
        """``blocks`` more blocks of ``items`` (all of this class, at the same cursor), as one computation."""
        with torch.inference_mode():
            outputs = stack.run(items, blocks)
        for item, output in zip(items, outputs, strict=True):
            item.hidden, item.cursor = output, item.cursor + blocks

    def result(self) -> torch.Tensor | None:
        """The output once every block ran, else None."""
        return None if self.remaining else self.hidden


@dataclass(eq=False)
class InferenceStep(Work):
    """A step of an inference session: its new tokens go through the blocks and into the session's cache."""

    kind: Kind = Kind.DECODE
    reorder: torch.Tensor | None = None  # [batch] int64: the session cache's rows to keep, before the first slice

    def prepare(self) -> None:
        if self.reorder is not None:
            self.cache.reorder(self.reorder)
            self.reorder = None

    def result(self) -> torch.Tensor | None:
        if self.remaining:
            return None
        self.cache.advance(self.hidden.shape[1])  # the step went through every block: its tokens are held
        return self.hidden


@dataclass(eq=False)
class ForwardPass(Work):
    """A stateless pass (nothing kept); with ``block_outputs`` it also collects each block's output."""

    kind: Kind = Kind.FORWARD


def step_kind(size: int, decode_tokens: int) -> Kind:
    """An inference step of ``size`` rows x tokens is a decode step if it is small."""
    return Kind.DECODE if size <= decode_tokens else Kind.PREFILL


def run_slice(stack: Stack, items: list[Work], blocks: int) -> list[torch.Tensor | None]:
    """One slice of ``items`` (one class, one cursor): each one's ``prepare`` first if it has not run, then
    the slice; each item's result (None: it has more slices to run)."""
    for item in items:
        if not item.prepared:
            item.prepare()
            item.prepared = True
    type(items[0]).run_slice(stack, items, blocks)
    return [item.result() for item in items]


def run_to_end(stack: Stack, item: Work) -> torch.Tensor:
    """Run ``item`` through all its remaining blocks, one slice at a time; its result."""
    while True:
        (result,) = run_slice(stack, [item], item.remaining)
        if result is not None:
            return result
