"""The remote blocks as a module: ``model.model.layers`` (the family's name for it).

``RemoteBlocks`` stands for blocks [start, end) of the model, served by the swarm (in private mode the
client's own blocks among them run on the client, ``client.private``, and the rest on servers). It has ``len``,
slices (``layers[a:b]`` is the stack of blocks a..b-1), indexing and iteration, and calling it on
hidden states runs those blocks: a stateless forward pass through the chain of servers. Whenever a
gradient is needed (grad mode on and the input, the deep prompts or the LoRA weights require grad),
the call is one ``torch.autograd.Function``: forward through the servers keeping each request's
input, backward through them in reverse (``client.passes``), so a researcher can run part of the
model, change activations, insert local modules, or train prompts and LoRA weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from client.lora import RemoteLora
from client.passes import PassInputs, PassRecord, PassRunner
from client.private import LocalBlocks
from swarm.spans import BlockRange


@dataclass
class BlocksState:
    """What every slice of a model's remote blocks shares."""

    runner: Callable[[], PassRunner]  # the client's passes (the client connects after the model is built)
    num_blocks: int
    lora: RemoteLora | None = None  # LoRA weights kept on the client, sent with each request
    adapter_name: str | None = None  # or: a LoRA adapter preloaded on the servers, chosen by name
    local: LocalBlocks | None = None  # private mode: the blocks the client computes itself


class _ThroughServers(torch.autograd.Function):
    """Blocks run by servers as one differentiable function of (hidden, prompts, LoRA weights)."""

    @staticmethod
    def forward(ctx, runner: PassRunner, inputs: PassInputs, hidden: torch.Tensor, prompts, *lora_weights):
        ctx.set_materialize_grads(False)
        output, block_outputs, record = runner.forward(hidden.detach(), inputs, keep=True)
        ctx.runner, ctx.record = runner, record
        ctx.has_prompts = prompts is not None
        ctx.output_like = output.new_zeros(())
        if block_outputs is None:
            block_outputs = hidden.new_zeros(0)
        return output, block_outputs

    @staticmethod
    def backward(ctx, grad_output, grad_block_outputs):
        record: PassRecord = ctx.record
        if grad_output is None:  # only the outputs of earlier blocks were used
            grad_output = ctx.output_like.new_zeros(_output_shape(record))
        if grad_block_outputs is not None and grad_block_outputs.numel() == 0:
            grad_block_outputs = None
        grad_hidden, grad_prompts, grad_lora = ctx.runner.backward(record, grad_output, grad_block_outputs)
        lora_grads = []
        if record.inputs.adapter is not None and not isinstance(record.inputs.adapter, str):
            for key, (a, b) in record.inputs.adapter.weights.items():
                grad_a, grad_b = grad_lora.get(key, (torch.zeros_like(a), torch.zeros_like(b)))
                lora_grads += [grad_a.to(a.dtype), grad_b.to(b.dtype)]
        return None, None, grad_hidden, (grad_prompts if ctx.has_prompts else None), *lora_grads


def _output_shape(record: PassRecord) -> tuple[int, ...]:
    rows = sum(part.stop - part.start for part, _ in record.chunks)
    _, tokens, hidden = record.chunks[0][1][0].hidden.shape
    return rows, tokens, hidden


class RemoteBlocks(nn.Module):
    """Blocks [start, end) of the model, computed by the swarm."""

    def __init__(self, state: BlocksState, start: int = 0, end: int | None = None):
        super().__init__()
        self._state = state
        self.start, self.end = start, state.num_blocks if end is None else end

    @property
    def span(self) -> BlockRange:
        """The blocks, as a range (not for an empty slice)."""
        return BlockRange(self.start, self.end)

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> RemoteBlocks:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("remote blocks can be sliced only with step 1 (a contiguous stack of blocks)")
            return RemoteBlocks(self._state, self.start + start, self.start + max(start, stop))
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"block {index} of a stack of {len(self)}")
        return RemoteBlocks(self._state, self.start + position, self.start + position + 1)

    def __iter__(self) -> Iterator[RemoteBlocks]:
        return (self[i] for i in range(len(self)))

    def extra_repr(self) -> str:
        return f"blocks {self.start}..{self.end - 1} served by the swarm"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Hidden states [batch, tokens, hidden] after these blocks. ``attention_mask`` [batch, tokens] (0 marks
        padding), ``position_ids`` [batch, tokens] (default 0..tokens-1), ``prompts`` [len(self), 1 or batch,
        prefix, hidden] deep prompts added before each block to the first ``prefix`` tokens. With
        ``output_hidden_states``: (output, the output of every block but the last)."""
        if len(self) == 0:
            return (hidden_states, ()) if output_hidden_states else hidden_states
        batch, tokens, _ = hidden_states.shape
        if position_ids is None:
            position_ids = torch.arange(tokens).expand(batch, tokens)
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, tokens):
                raise ValueError(
                    f"attention_mask must be a [{batch}, {tokens}] padding mask, got {attention_mask.shape}"
                )
            mask = None if bool(attention_mask.bool().all()) else attention_mask.bool()
        if prompts is not None and (prompts.dim() != 4 or prompts.shape[0] != len(self)):
            raise ValueError(f"prompts must be [{len(self)}, 1 or batch, prefix, hidden], got {list(prompts.shape)}")
        position_ids = position_ids.expand(batch, tokens).to(torch.int64)
        pieces = self._state.local.pieces(self.span) if self._state.local is not None else [(self.span, False)]
        outputs: list[torch.Tensor] = []
        for piece, local in pieces:
            piece_prompts = prompts[piece.start - self.start : piece.end - self.start] if prompts is not None else None
            run = self._local if local else self._remote
            hidden_states, block_outputs = run(
                piece, hidden_states, position_ids, mask, piece_prompts, output_hidden_states
            )
            outputs += [*block_outputs, hidden_states] if output_hidden_states else []
        if not output_hidden_states:
            return hidden_states
        return hidden_states, tuple(outputs[:-1])

    def _local(self, span, hidden, position_ids, mask, prompts, hidden_states: bool):
        """Blocks ``span`` on the client (private mode, ``client.private``), with autograd."""
        state = self._state
        state.local.check_adapter(state.adapter_name)
        adapter = state.lora.live(span) if state.lora is not None else None
        return state.local.forward(span, hidden, position_ids, mask, prompts, adapter, hidden_states)

    def _remote(self, span, hidden, position_ids, mask, prompts, hidden_states: bool):
        """Blocks ``span`` through the servers: (output, every block's output but the last if asked)."""
        state = self._state
        batch, tokens, _ = hidden.shape
        adapter, weights = (None, [])
        if state.lora is not None:
            adapter, weights = state.lora.adapter(span)
        inputs = PassInputs(
            span,
            position_ids.expand(batch, tokens).to(torch.int64),
            mask,
            prompts.detach() if prompts is not None else None,
            adapter if adapter is not None else state.adapter_name,
            hidden_states,
        )
        trainable = [hidden, *([prompts] if prompts is not None else []), *weights]
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in trainable):
            output, block_outputs = _ThroughServers.apply(state.runner(), inputs, hidden, prompts, *weights)
        else:
            output, block_outputs, _ = state.runner().forward(hidden.detach(), inputs)
        if block_outputs is None or not block_outputs.numel():
            return output, ()
        return output, tuple(block_outputs.unbind(0))
