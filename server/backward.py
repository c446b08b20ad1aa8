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

import dataclasses
from dataclasses import dataclass, field

import torch

from server.blocks import BlockStack
from server.work import Work


@dataclass(eq=False)
class BackwardState:
    grad_output: torch.Tensor  # [batch, tokens, hidden]: gradient at the output of block ``end - 1``
    grad_block_outputs: torch.Tensor | None = None  # [num_blocks - 1, batch, tokens, hidden] or None (zero)
    end: int = -1  # blocks [.., end) are not yet walked back; set when the walk starts
    checkpoints: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first block, input) per slice

    @property
    def walking(self) -> bool:
        return self.end >= 0


def run_slice(stack: BlockStack, work: Work, blocks: int) -> torch.Tensor | None:
    """Run one slice of a backward item: ``blocks`` more blocks forward, or one slice of the walk back.
    Returns the gradient w.r.t. the item's input once the walk reaches the first block, else None."""
    state = work.backward
    if not state.walking:
        state.checkpoints.append((work.cursor, work.hidden))
        if work.cursor + blocks < work.blocks.end:
            with torch.no_grad():
                (work.hidden,) = stack.run([work], blocks)
            work.cursor += blocks
            return None
        state.end = work.blocks.end  # the last slice: recomputed with grad right away
    start, inputs = state.checkpoints.pop()
    state.grad_output = _backward_through(stack, work, start, state.end, inputs)
    state.end = work.cursor = start
    return None if state.checkpoints else state.grad_output


def _backward_through(stack: BlockStack, work: Work, start: int, end: int, inputs: torch.Tensor) -> torch.Tensor:
    """Recompute blocks [start, end) from ``inputs`` with grad and back-propagate; the input's gradient."""
    state = work.backward
    leaf = inputs.detach().requires_grad_()
    intermediate = state.grad_block_outputs is not None and end - start > 1
    view = dataclasses.replace(work, hidden=leaf, block_outputs=[] if intermediate else None, backward=None)
    view.cursor = start
    with torch.enable_grad():
        (output,) = stack.run([view], end - start)
        outputs, grads = [output], [state.grad_output]
        if intermediate:  # outputs of blocks start..end-2 also had gradients (hidden states used downstream)
            for block, block_output in zip(range(start, end - 1), view.block_outputs, strict=False):
                outputs.append(block_output)
                grads.append(state.grad_block_outputs[block - work.blocks.start])
        torch.autograd.backward(outputs, grads)
    if state.grad_block_outputs is not None and start > work.blocks.start:  # the gradient at block start - 1
        return leaf.grad + state.grad_block_outputs[start - 1 - work.blocks.start]
    return leaf.grad
