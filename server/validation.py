"""Checks on everything a peer sends, turning protobuf requests into validated domain objects.

Every check raises InvalidRequestError (or BlocksNotServedError) with a message that says what was
wrong; nothing here touches server state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from proto import pb
from swarm import tensors
from swarm.errors import BlocksNotServedError, InvalidRequestError
from swarm.spans import BlockRange

MAX_POSITION = 1 << 20  # rotary positions beyond this are surely garbage
MAX_SESSION_ID = 128


@dataclass(frozen=True)
class Limits:
    """What one server accepts."""

    span: BlockRange
    hidden_size: int
    dtype: torch.dtype
    max_request_tokens: int
    max_length: int


@dataclass(frozen=True)
class OpenRequest:
    session_id: str
    blocks: BlockRange
    batch_size: int
    max_length: int


@dataclass(frozen=True)
class Step:
    hidden: torch.Tensor  # [batch, new_tokens, hidden_size]
    position_ids: torch.Tensor  # [batch, new_tokens] int64
    attention_mask: torch.Tensor | None  # [batch, past + new_tokens] bool, None = no padding


def requested_blocks(start: int, end: int, limits: Limits) -> BlockRange:
    if not start < end:
        raise InvalidRequestError(f"empty block range {start}:{end}")
    blocks = BlockRange(start, end)
    if blocks not in limits.span:
        raise BlocksNotServedError(f"blocks {blocks} requested, this server serves {limits.span}")
    return blocks


def open_request(request: pb.InferenceRequest, limits: Limits) -> OpenRequest:
    if not request.session_id or len(request.session_id) > MAX_SESSION_ID:
        raise InvalidRequestError(f"session_id must have 1 to {MAX_SESSION_ID} characters")
    blocks = requested_blocks(request.start_block, request.end_block, limits)
    if not 1 <= request.max_length <= limits.max_length:
        raise InvalidRequestError(f"max_length must be in 1..{limits.max_length}, got {request.max_length}")
    if not 1 <= request.batch_size <= limits.max_request_tokens:
        raise InvalidRequestError(f"batch_size must be in 1..{limits.max_request_tokens}, got {request.batch_size}")
    return OpenRequest(request.session_id, blocks, request.batch_size, request.max_length)


def step_input(
    hidden_msg: pb.Tensor | torch.Tensor,
    position_ids_msg: pb.Tensor,
    mask_msg: pb.Tensor,
    limits: Limits,
    batch_size: int | None = None,
    past: int = 0,
) -> Step:
    """Validate one step (or one stateless forward when ``past`` is 0 and ``batch_size`` is None)."""
    hidden = hidden_msg if isinstance(hidden_msg, torch.Tensor) else tensors.from_proto(hidden_msg, "hidden")
    if hidden.dtype != limits.dtype:
        raise InvalidRequestError(f"hidden: dtype {hidden.dtype} sent, this server computes in {limits.dtype}")
    if hidden.ndim != 3 or hidden.shape[2] != limits.hidden_size or hidden.shape[0] < 1 or hidden.shape[1] < 1:
        raise InvalidRequestError(
            f"hidden: shape must be [batch, tokens, {limits.hidden_size}] with batch, tokens >= 1, "
            f"got {list(hidden.shape)}"
        )
    batch, tokens = hidden.shape[:2]
    if batch_size is not None and batch != batch_size:
        raise InvalidRequestError(f"hidden: batch of {batch} in a session opened for {batch_size}")
    if batch * tokens > limits.max_request_tokens:
        raise InvalidRequestError(f"hidden: {batch}x{tokens} tokens exceed the limit of {limits.max_request_tokens}")
    if not torch.isfinite(hidden).all():
        raise InvalidRequestError("hidden: contains NaN or infinite values")

    if tensors.is_empty(position_ids_msg):
        position_ids = torch.arange(past, past + tokens).expand(batch, tokens)
    else:
        position_ids = tensors.from_proto(position_ids_msg, "position_ids")
        if position_ids.dtype != torch.int64 or tuple(position_ids.shape) != (batch, tokens):
            raise InvalidRequestError(f"position_ids: must be int64 [{batch}, {tokens}]")
        if position_ids.numel() and not (0 <= int(position_ids.min()) and int(position_ids.max()) < MAX_POSITION):
            raise InvalidRequestError(f"position_ids: values must be in 0..{MAX_POSITION - 1}")

    attention_mask = None
    if not tensors.is_empty(mask_msg):
        attention_mask = tensors.from_proto(mask_msg, "attention_mask")
        if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (batch, past + tokens):
            raise InvalidRequestError(f"attention_mask: must be bool [{batch}, {past + tokens}] (past + new tokens)")
    return Step(hidden, position_ids, attention_mask)
