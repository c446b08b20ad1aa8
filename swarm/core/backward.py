"""Backward work: gradients through a span's blocks with bounded memory and bounded slices.

The server's weights stay frozen; gradients flow to the blocks' input and to the request's own
tensors (deep prompts, LoRA weights), which the handler passes as leaves that require grad.

A backward item runs in two phases, one slice of blocks at a time like any other work, so decode
steps of other sessions wait at most one slice:

1. Forward: each slice but the last runs without grad; only its input is kept (a checkpoint).
2. Walk back: the last slice, then each earlier one, is recomputed with grad from its checkpoint and
   back-propagated; the gradient w.r.t. its input is the gradient at the output of the slice before.

Memory holds the checkpoints (one [batch, tokens, hidden] tensor per slice) and one slice's
activations; compute is one forward pass without grad plus one with grad and its backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swarm.core.work import ForwardPass, Kind, Stack, Work


@dataclass(eq=False)
class BackwardPass(Work):
    """Gradients w.r.t. the input of ``blocks``, given those at their output (and, optionally, at the
    outputs of the blocks before the last). Always runs alone."""

    kind: Kind = Kind.BACKWARD
    grad_output: torch.Tensor | None = None  # [batch, tokens, hidden]: gradient at the output of block ``end - 1``
    grad_block_outputs: torch.Tensor | None = None  # [num_blocks - 1, batch, tokens, hidden] or None (zero)
    end: int = -1  # blocks [.., end) are not yet walked back; set when the walk starts
    checkpoints: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first block, input) per slice
    grad_input: torch.Tensor | None = None  # the answer, once the walk reached the first block

    @property
    def walking(self) -> bool:
        return self.end >= 0

    @classmethod
    def run_slice(cls, stack: Stack, items: list[Work], blocks: int) -> None:
        for item in items:
            item.step(stack, blocks)

    def result(self) -> torch.Tensor | None:
        return self.grad_input

    def step(self, stack: Stack, blocks: int) -> None:
        """One slice: ``blocks`` more blocks forward without grad, or one slice of the walk back."""
        if not self.walking:
            self.checkpoints.append((self.cursor, self.hidden))
            if self.cursor + blocks < self.blocks.end:
                with torch.no_grad():
                    (self.hidden,) = stack.run([self], blocks)
                self.cursor += blocks
                return
            self.end = self.blocks.end  # the last slice: recomputed with grad right away
        start, inputs = self.checkpoints.pop()
        self.grad_output = self._backward_through(stack, start, inputs)
        self.end = self.cursor = start
        if not self.checkpoints:
            self.grad_input = self.grad_output

    def _backward_through(self, stack: Stack, start: int, inputs: torch.Tensor) -> torch.Tensor:
        """Recompute blocks [start, end) from ``inputs`` with grad and back-propagate; the input's gradient."""
        end = self.end
        leaf = inputs.detach().requires_grad_()
        intermediate = self.grad_block_outputs is not None and end - start > 1
        view = ForwardPass(
            self.blocks,
            leaf,
            self.position_ids,
            block_offset=self.block_offset,
            padding=self.padding,
            prompts=self.prompts,
            adapter=self.adapter,
            block_outputs=[] if intermediate else None,
        )
        view.cursor = start
        with torch.enable_grad():
            (output,) = stack.run([view], end - start)
            outputs, grads = [output], [self.grad_output]
            if intermediate:  # outputs of blocks start..end-2 also had gradients (hidden states used downstream)
                for block, block_output in zip(range(start, end - 1), view.block_outputs, strict=False):
                    outputs.append(block_output)
                    grads.append(self.grad_block_outputs[block - self.blocks.start])
            torch.autograd.backward(outputs, grads)
        if self.grad_block_outputs is not None and start > self.blocks.start:  # the gradient at block start - 1
            return leaf.grad + self.grad_block_outputs[start - 1 - self.blocks.start]
        return leaf.grad
