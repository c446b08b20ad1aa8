"""The engine's lanes (``client.api.engine``): requests stepped together in lockstep rounds, and how many
requests move between lanes to keep them even (``surplus``, pure)."""

from __future__ import annotations

import asyncio


class Lane:
    """Requests stepped together in lockstep rounds. The engine runs several lanes at once, so while one lane's
    round is on one server of the chain, another lane's round can be on the next one."""

    def __init__(self, index: int):
        self.index = index
        self.active: list = []  # Generations stepped in its rounds (all, or a fair share between keys)
        self.joining: list = []  # prefilled (or moved here), joining at the next round
        self.wake = asyncio.Event()
        self.counts: dict[str, float] = {}  # key name -> its steps in this lane's shared rounds, over its weight

    @property
    def load(self) -> int:
        return len(self.active) + len(self.joining)

    def discard(self, generation) -> None:
        for pending in (self.active, self.joining):
            if generation in pending:
                pending.remove(generation)


def surplus(lanes: list[Lane], lane: Lane) -> int:
    """How many of ``lane``'s active requests to move to the least loaded lane, so lanes stay even (pure)."""
    least = min(lanes, key=lambda other: other.load)
    return max(0, (lane.load - least.load) // 2) if least is not lane else 0
