"""LoRA on the span's linear layers, per request: each request of a batch may bring its own adapter.

The base linear layer runs once for all tokens of a batched computation; a forward hook then adds
each request's low-rank delta, ``(x @ a^T) @ b^T * alpha / rank``, to that request's rows only. Hooks
are installed lazily, on the linear layers some adapter has used, and stay (a hook with no adapter
in the batch returns at once). Only the compute thread runs blocks, so the plan of the computation
in progress is a plain attribute.
"""

from __future__ import annotations

import torch
from torch import nn

from swarm.core.attention import Plan
from swarm.models.adapters import LoraAdapter


class LoraHooks:
    """The LoRA hooks of one block stack."""

    def __init__(self, blocks: nn.ModuleList, first_block: int):
        self.blocks, self.first_block = blocks, first_block
        self.plan: Plan | None = None  # the computation in progress, while it has adapters
        self._hooked: set[str] = set()  # module names hooked in every block

    def available(self) -> dict[str, tuple[int, int]]:
        """Linear layers of the blocks: name inside a block -> (in_features, out_features)."""
        return {
            name: (module.in_features, module.out_features)
            for name, module in self.blocks[0].named_modules()
            if isinstance(module, nn.Linear)
        }

    def ensure(self, adapter: LoraAdapter) -> None:
        """Hook the linear layers ``adapter`` uses (compute thread only)."""
        for name in adapter.modules() - self._hooked:
            for local, block in enumerate(self.blocks):
                block.get_submodule(name).register_forward_hook(self._hook(self.first_block + local, name))
            self._hooked.add(name)

    def _hook(self, block: int, name: str):
        key = (block, name)

        def add_deltas(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            plan = self.plan
            if plan is None:
                return None
            x = args[0]  # [1, total_tokens, in_features]
            for segment in plan.segments:
                pair = segment.adapter.weights.get(key) if segment.adapter is not None else None
                if pair is None:
                    continue
                a, b = pair  # [rank, in], [out, rank]
                rows = x[0, segment.start : segment.end]  # [tokens of this request, in]
                delta = torch.matmul(torch.matmul(rows, a.t()), b.t()) * segment.adapter.scaling
                output[0, segment.start : segment.end] += delta  # the linear's backward never reads its output
            return output

        return add_deltas
