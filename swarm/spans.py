"""Block ranges: the ``10:20`` of ``--blocks``, and DHT key names derived from a model."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class BlockRange:
    """Half-open range of transformer blocks [start, end)."""

    start: int
    end: int

    def __post_init__(self):
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid block range {self.start}:{self.end} (need 0 <= start < end)")

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    def __contains__(self, other: object) -> bool:
        if isinstance(other, BlockRange):
            return self.start <= other.start and other.end <= self.end
        return isinstance(other, int) and self.start <= other < self.end


def parse_blocks(text: str, num_blocks: int | None = None) -> BlockRange:
    """Parse ``"10:20"`` (or ``"10"`` for a single block); check it against the model's depth."""
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text)
    if not match:
        raise ValueError(f"--blocks must look like START:END (e.g. 10:20), got {text!r}")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) is not None else start + 1
    span = BlockRange(start, end)
    if num_blocks is not None and span.end > num_blocks:
        raise ValueError(f"--blocks {span} is outside the model, which has {num_blocks} blocks (0:{num_blocks})")
    return span


def model_prefix(model: str) -> str:
    """Default DHT prefix for a model name or path: its last path component, made key-safe."""
    name = model.rstrip("/\\").replace("\\", "/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def block_key(prefix: str, block: int) -> str:
    """DHT key under which every server of ``block`` stores its record (subkey: its peer id)."""
    return f"{prefix}.block.{block}"
