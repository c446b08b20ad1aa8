"""Checks on what fine-tuning and beam search add to requests: deep prompts, LoRA adapters, gradients,
hypothesis reorders, and the size of answers with every block's output.

Like ``server.validation``: every check raises a typed error that says what was wrong, declared
shapes and dtypes are checked before any bytes are copied, and nothing here touches server state.
"""

from __future__ import annotations

import math

import torch

from proto import pb
from server.validation import FLOAT_DTYPES, Limits, converted, declared_shape
from swarm.errors import AdapterNotFoundError, InvalidRequestError
from swarm.models.adapters import LoraAdapter
from swarm.net import tensors
from swarm.spans import BlockRange

MAX_ANSWER_BYTES = (4 << 20) - (64 << 10)  # a unary answer must fit the libp2p daemon's 4 MiB messages
MAX_MODULE_NAME = 128


def _float_tensor(message: pb.Tensor, field: str, shape: tuple[int, ...], limits: Limits) -> torch.Tensor:
    """A float tensor of exactly ``shape`` (checked as declared, then its bytes), finite, in the server's dtype."""
    if declared_shape(message, field, FLOAT_DTYPES, len(shape)) != shape:
        raise InvalidRequestError(f"{field}: shape {list(message.shape)} sent, expected {list(shape)}")
    return converted(message, field, limits)


def prompts(message: pb.Tensor, limits: Limits, blocks: BlockRange, batch: int, tokens: int) -> torch.Tensor | None:
    """Deep prompts [num_blocks, batch or 1, prefix, hidden] for a request of [batch, tokens]; None if empty."""
    if tensors.is_empty(message):
        return None
    shape = declared_shape(message, "prompts", FLOAT_DTYPES, 4)
    rows, prefix = shape[1], shape[2]
    if shape[0] != len(blocks) or rows not in (1, batch) or not 1 <= prefix <= tokens or shape[3] != limits.hidden_size:
        expected = f"[{len(blocks)}, 1 or {batch}, 1..{tokens}, {limits.hidden_size}]"
        raise InvalidRequestError(f"prompts: shape must be {expected}, got {list(shape)}")
    if len(blocks) * rows * prefix > limits.max_request_tokens:
        raise InvalidRequestError(f"prompts: {len(blocks)}x{rows}x{prefix} exceed {limits.max_request_tokens} tokens")
    return _float_tensor(message, "prompts", shape, limits)


def gradient(message: pb.Tensor, field: str, shape: tuple[int, ...], limits: Limits) -> torch.Tensor:
    """A gradient of exactly ``shape`` (the shape of what it is the gradient of)."""
    if tensors.is_empty(message):
        raise InvalidRequestError(f"{field}: missing")
    return _float_tensor(message, field, shape, limits)


def block_gradients(
    message: pb.Tensor, limits: Limits, blocks: BlockRange, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """Gradients w.r.t. the outputs of blocks start..end-2, [num_blocks - 1, *shape]; None if empty."""
    if tensors.is_empty(message):
        return None
    if len(blocks) < 2:
        raise InvalidRequestError("grad_block_outputs: a single block has no intermediate outputs")
    return gradient(message, "grad_block_outputs", (len(blocks) - 1, *shape), limits)


def block_outputs_fit(blocks: BlockRange, shape: tuple[int, ...], limits: Limits) -> None:
    """Every block's output must fit one answer; the client asks for fewer rows or blocks otherwise."""
    itemsize = torch.empty(0, dtype=limits.dtype).element_size()
    size = len(blocks) * math.prod(shape) * itemsize
    if size > MAX_ANSWER_BYTES:
        raise InvalidRequestError(
            f"output_hidden_states: {len(blocks)} block outputs of {list(shape)} need {size} bytes, more than one "
            f"answer may carry ({MAX_ANSWER_BYTES}); ask for fewer rows or blocks"
        )


def reorder(message: pb.Tensor, batch: int) -> torch.Tensor | None:
    """Hypothesis indices [batch] int64 in 0..batch-1; None if empty or the identity."""
    if tensors.is_empty(message):
        return None
    if declared_shape(message, "reorder", ("int64",), 1) != (batch,):
        raise InvalidRequestError(f"reorder: must be int64 [{batch}] (one source row per row of the session)")
    rows = tensors.from_proto(message, "reorder")
    if int(rows.min()) < 0 or int(rows.max()) >= batch:
        raise InvalidRequestError(f"reorder: rows must be in 0..{batch - 1}")
    return None if torch.equal(rows, torch.arange(batch)) else rows.clone()


def adapter(
    message: pb.Adapter, limits: Limits, blocks: BlockRange, preloaded: dict[str, LoraAdapter], trainable: bool
) -> LoraAdapter | None:
    """The adapter a request asks for, on ``blocks`` (preloaded by name, or sent); None if unset.
    Sent weights become leaves that require grad when ``trainable`` (a backward request)."""
    source = message.WhichOneof("source")
    if source is None:
        return None
    if source == "name":
        found = preloaded.get(message.name)
        if found is None:
            raise AdapterNotFoundError(f"adapter {message.name[:64]!r} is not loaded on this server")
        return found.within(blocks)
    return _sent_lora(message.lora, limits, blocks, trainable)


def _sent_lora(message: pb.LoraWeights, limits: Limits, blocks: BlockRange, trainable: bool) -> LoraAdapter:
    if not 1 <= message.rank <= limits.max_lora_rank:
        raise InvalidRequestError(f"adapter: rank must be in 1..{limits.max_lora_rank}, got {message.rank}")
    if not math.isfinite(message.alpha):
        raise InvalidRequestError("adapter: alpha must be finite")
    itemsize = torch.empty(0, dtype=limits.dtype).element_size()
    declared = sum(message.rank * sum(limits.lora_layers.get(w.module, (0, 0))) for w in message.weights) * itemsize
    if declared > limits.max_adapter_bytes:
        raise InvalidRequestError(f"adapter: {declared} bytes of weights exceed the limit, {limits.max_adapter_bytes}")
    result = LoraAdapter(message.rank, message.alpha)
    for weight in message.weights:
        if weight.block not in blocks:
            raise InvalidRequestError(f"adapter: weights for block {weight.block}, outside the blocks {blocks}")
        if weight.module not in limits.lora_layers:
            raise InvalidRequestError(f"adapter: no linear layer {weight.module[:MAX_MODULE_NAME]!r} in these blocks")
        key = (weight.block, weight.module)
        if key in result.weights:
            raise InvalidRequestError(f"adapter: block {weight.block} module {weight.module} sent twice")
        in_features, out_features = limits.lora_layers[weight.module]
        a = _float_tensor(weight.a, "adapter a", (message.rank, in_features), limits)
        b = _float_tensor(weight.b, "adapter b", (out_features, message.rank), limits)
        result.weights[key] = (a.requires_grad_(trainable), b.requires_grad_(trainable))
    return result


def lora_gradients(adapter: LoraAdapter) -> list[pb.LoraWeight]:
    """The gradients of a sent adapter's weights, in the order they were sent (zero where unused)."""
    grads = []
    for (block, module), (a, b) in adapter.weights.items():
        grad_a = a.grad if a.grad is not None else torch.zeros_like(a)
        grad_b = b.grad if b.grad is not None else torch.zeros_like(b)
        grads.append(pb.LoraWeight(block=block, module=module, a=tensors.to_proto(grad_a), b=tensors.to_proto(grad_b)))
    return grads
