"""LoRA weights of the remote blocks, kept and trained on the client.

``RemoteLora`` holds, for every block of the model and every targeted linear layer, the pair
``a`` [rank, in_features] (random init) and ``b`` [out_features, rank] (zeros, so a new adapter
changes nothing). Requests carry the weights of the blocks they run; backward brings their
gradients back. Parameters are named ``blocks.<i>.a.<layer>`` (dots in a layer's name become ``__``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from swarm.models.adapters import DEFAULT_TARGETS, LoraAdapter, resolve_targets
from swarm.spans import BlockRange


def _key(name: str) -> str:
    return name.replace(".", "__")


class _BlockLora(nn.Module):
    def __init__(self, layers: dict[str, tuple[int, int]], names: list[str], rank: int):
        super().__init__()
        self.a = nn.ParameterDict({_key(n): nn.Parameter(torch.empty(rank, layers[n][0])) for n in names})
        self.b = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(layers[n][1], rank)) for n in names})
        for weight in self.a.values():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class RemoteLora(nn.Module):
    """LoRA on ``target_modules`` of each of ``num_blocks`` blocks (``layers``: the blocks' linear layers)."""

    def __init__(
        self,
        layers: dict[str, tuple[int, int]],
        num_blocks: int,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha = rank, float(alpha)
        self.names = resolve_targets(layers, tuple(target_modules))
        self.blocks = nn.ModuleList(_BlockLora(layers, self.names, rank) for _ in range(num_blocks))

    def adapter(self, span: BlockRange) -> tuple[LoraAdapter, list[nn.Parameter]]:
        """The weights of blocks ``span`` (detached, for the wire) and the parameters in the same order."""
        adapter, params = LoraAdapter(self.rank, self.alpha), []
        for block in range(span.start, span.end):
            for name in self.names:
                a, b = self.blocks[block].a[_key(name)], self.blocks[block].b[_key(name)]
                adapter.weights[(block, name)] = (a.detach(), b.detach())
                params += [a, b]
        return adapter, params

    def live(self, span: BlockRange) -> LoraAdapter:
        """The weights of blocks ``span`` as the parameters themselves (for blocks the client runs: gradients
        flow to them directly)."""
        adapter = LoraAdapter(self.rank, self.alpha)
        for block in range(span.start, span.end):
            for name in self.names:
                adapter.weights[(block, name)] = (self.blocks[block].a[_key(name)], self.blocks[block].b[_key(name)])
        return adapter

    def load(self, adapter: LoraAdapter) -> None:
        """Copy ``adapter``'s weights in (same rank and layers; blocks it lacks get b = 0: no change)."""
        if adapter.rank != self.rank or adapter.modules() - set(self.names):
            raise ValueError(
                f"adapter of rank {adapter.rank} on {sorted(adapter.modules())} does not fit this LoRA "
                f"(rank {self.rank} on {self.names})"
            )
        self.alpha = adapter.alpha
        with torch.no_grad():
            for index, block in enumerate(self.blocks):
                for name in self.names:
                    pair = adapter.weights.get((index, name))
                    if pair is None:
                        block.b[_key(name)].zero_()
                    else:
                        block.a[_key(name)].copy_(pair[0])
                        block.b[_key(name)].copy_(pair[1])
