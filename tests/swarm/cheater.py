"""Test-only cheating servers: a real ``python -m server`` whose computation is tampered with.

``python -m tests.swarm.cheater MODE [PARAMS...] -- SERVER ARGS`` installs the cheat, then runs the
server's own entry point with SERVER ARGS (so it announces what an honest server would). Modes:

- ``noise REL START``: Gaussian noise of relative L2 size REL added to the span's output for every token
  at position START or later (honest before: the cheat starts mid-generation)
- ``skip BLOCK``: block BLOCK (absolute index) is skipped (its input passes through unchanged)
- ``lowprec``: every block runs in bfloat16 (weights and activations), whatever ``--dtype`` it announces

Serving another model needs no wrapper: start a real server with ``--model`` of another folder under
the same ``--dht-prefix``. Nothing here is reachable from the product.
"""

from __future__ import annotations

import sys

import torch

import swarm.core.blocks
from server.__main__ import main as server_main


class _Family:
    """The server's family adapter with ``call_block`` tampered with; everything else passes through."""

    def __init__(self, family, call_block):
        self._family, self.call_block = family, call_block

    def __getattr__(self, name):
        return getattr(self._family, name)


def _noise(rel: float, start: int) -> None:
    original = swarm.core.blocks.BlockStack.run

    def run(self, items, num_blocks):
        first = items[0].cursor
        outputs = original(self, items, num_blocks)
        tampered = []
        for item, output in zip(items, outputs, strict=True):
            if first + num_blocks == item.blocks.end:  # the item's last slice: its output leaves the server
                noise = torch.randn_like(output)
                scale = rel * output.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                late = (item.position_ids.reshape(output.shape[:2]) >= start).unsqueeze(-1)
                output = output + noise * scale * late
            tampered.append(output)
        return tampered

    swarm.core.blocks.BlockStack.run = run


def _tamper_blocks(make_call) -> None:
    original = swarm.core.blocks.BlockStack.__init__

    def init(self, config, family, span, blocks):
        original(self, config, family, span, blocks)
        self.family = _Family(family, make_call(self, family))

    swarm.core.blocks.BlockStack.__init__ = init


def _skip(block_index: int) -> None:
    def make_call(stack, family):
        skipped = stack.blocks[block_index - stack.span.start] if block_index in stack.span else None

        def call_block(block, hidden, *args):
            return hidden if block is skipped else family.call_block(block, hidden, *args)

        return call_block

    _tamper_blocks(make_call)


def _lowprec() -> None:
    def make_call(stack, family):
        for block in stack.blocks:  # bfloat16 weights, kept in the announced dtype's tensors
            for param in block.parameters():
                param.data = param.data.to(torch.bfloat16).to(param.dtype)

        def call_block(block, hidden, *args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = family.call_block(block, hidden.to(torch.bfloat16).to(hidden.dtype), *args)
            return output.to(torch.bfloat16).to(hidden.dtype)

        return call_block

    _tamper_blocks(make_call)


def main(argv: list[str]) -> int:
    split = argv.index("--")
    mode, params, server_args = argv[0], argv[1:split], argv[split + 1 :]
    if mode == "noise":
        _noise(float(params[0]), int(params[1]))
    elif mode == "skip":
        _skip(int(params[0]))
    elif mode == "lowprec":
        _lowprec()
    else:
        raise SystemExit(f"unknown cheat {mode!r}")
    return server_main(server_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
