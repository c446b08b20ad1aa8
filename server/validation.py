"""Checks on everything a peer sends, turning protobuf requests into validated domain objects.

Every check raises InvalidRequestError (or BlocksNotServedError) with a message that says what was
wrong; nothing here touches server state. A tensor's declared dtype and shape are checked against
what the request may carry *before* its bytes are copied, so a small message that declares a huge
tensor costs nothing. Error messages never echo unbounded strings a peer sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from proto import pb
from server.config import ServerConfig
from swarm import tensors
from swarm.errors import BlocksNotServedError, InvalidRequestError
from swarm.spans import BlockRange

MAX_POSITION = 1 << 20  # rotary positions beyond this are surely garbage
MAX_SESSION_ID = 128
MAX_PEER_ID = 128  # base58 libp2p peer ids have about 52 characters
BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what another server may push (converted on arrival)
MESSAGE_OVERHEAD = 64 << 10  # bytes a message may spend on everything besides its tensors


@dataclass(frozen=True)
class Limits:
    """What one server accepts."""

    span: BlockRange
    hidden_size: int
    dtype: torch.dtype
    max_request_tokens: int  # batch x new tokens of one request
    max_length: int  # largest max_length of a session
    message_bytes: int | None = None  # cap on one stream message; None = derived (max_message_bytes)
    max_lora_rank: int = 32  # largest rank of a LoRA adapter a client may send
    max_adapter_bytes: int = 0  # bytes of LoRA weights one request may carry
    lora_layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # linear layers: name -> (in, out)

    @classmethod
    def build(
        cls,
        span: BlockRange,
        hidden_size: int,
        dtype: torch.dtype,
        config: ServerConfig,
        lora_layers: dict[str, tuple[int, int]] | None = None,
    ) -> Limits:
        lora_layers = dict(lora_layers or {})
        adapter_bytes = config.max_adapter_bytes
        if adapter_bytes is None:  # room for an adapter of the largest rank on every linear layer of the span
            per_block = sum(in_features + out_features for in_features, out_features in lora_layers.values())
            adapter_bytes = config.max_lora_rank * per_block * len(span) * torch.empty(0, dtype=dtype).element_size()
        return cls(
            span,
            hidden_size,
            dtype,
            config.max_request_tokens,
            config.max_length_limit,
            config.max_message_bytes,
            config.max_lora_rank,
            adapter_bytes,
            lora_layers,
        )

    @property
    def dtype_name(self) -> str:
        return tensors.DTYPE_NAMES[self.dtype]

    @property
    def max_message_bytes(self) -> int:
        """The largest message a stream may carry: room for the largest valid step (with deep prompts, a LoRA
        adapter on its first step, and hypothesis indices) and its small fields."""
        if self.message_bytes is not None:
            return self.message_bytes
        hidden = self.max_request_tokens * self.hidden_size * torch.empty(0, dtype=self.dtype).element_size()
        position_ids = self.max_request_tokens * 8  # int64 [batch, new_tokens]
        mask = self.max_request_tokens  # bool [batch, new_tokens]
        reorder = self.max_request_tokens * 8  # int64 [batch]
        prompts = hidden  # [blocks, rows, prefix, hidden] with blocks x rows x prefix <= max_request_tokens
        return hidden + prompts + position_ids + mask + reorder + self.max_adapter_bytes + MESSAGE_OVERHEAD


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
    attention_mask: torch.Tensor | None  # [batch, new_tokens] bool, False marks padding; None = no padding


def requested_blocks(start: int, end: int, limits: Limits) -> BlockRange:
    if not start < end:
        raise InvalidRequestError(f"empty block range {start}:{end}")
    blocks = BlockRange(start, end)
    if blocks not in limits.span:
        raise BlocksNotServedError(f"blocks {blocks} requested, this server serves {limits.span}")
    return blocks


def open_request(request: pb.InferenceRequest, limits: Limits) -> OpenRequest:
    check_session_id(request.session_id, "session_id")
    blocks = requested_blocks(request.start_block, request.end_block, limits)
    if not 1 <= request.max_length <= limits.max_length:
        raise InvalidRequestError(f"max_length must be in 1..{limits.max_length}, got {request.max_length}")
    if not 1 <= request.batch_size <= limits.max_request_tokens:
        raise InvalidRequestError(f"batch_size must be in 1..{limits.max_request_tokens}, got {request.batch_size}")
    return OpenRequest(request.session_id, blocks, request.batch_size, request.max_length)


def push_fields(request: pb.InferenceRequest) -> None:
    """Where a step's output goes (push_peer_id, push_session_id) and who may push its input."""
    if request.push_peer_id:
        _check_peer_id(request.push_peer_id, "push_peer_id")
        check_session_id(request.push_session_id, "push_session_id")
    if request.push_from_peer_id:
        _check_peer_id(request.push_from_peer_id, "push_from_peer_id")


def output_compression(value: int) -> int:
    """How the caller wants outputs sent (``pb.Compression``); only the ones this server knows."""
    if value not in tensors.COMPRESSIONS.values():
        raise InvalidRequestError(f"compression: unknown value {value}")
    return value


def check_session_id(value: str, field: str) -> None:
    """Printable ASCII without spaces (it ends up in logs), 1 to MAX_SESSION_ID characters."""
    if not 1 <= len(value) <= MAX_SESSION_ID or not (value.isascii() and value.isprintable()) or " " in value:
        raise InvalidRequestError(f"{field} must have 1 to {MAX_SESSION_ID} printable ASCII characters, no spaces")


def _check_peer_id(value: str, field: str) -> None:
    if len(value) > MAX_PEER_ID or not set(value) <= BASE58:
        raise InvalidRequestError(f"{field}: not a base58 peer id")


def declared_shape(message: pb.Tensor, field: str, dtypes: tuple[str, ...], ndim: int) -> tuple[int, ...]:
    """The shape a tensor message declares, once its dtype and rank are right (nothing is copied)."""
    if message.dtype not in dtypes:
        raise InvalidRequestError(f"{field}: dtype {message.dtype[:32]!r} sent, expected {' or '.join(dtypes)}")
    if len(message.shape) != ndim:
        raise InvalidRequestError(f"{field}: {len(message.shape)} dimensions sent, expected {ndim}")
    return tuple(message.shape)


def _check_hidden_shape(shape: tuple[int, ...], limits: Limits, batch_size: int | None) -> None:
    """[batch, tokens, hidden_size] within the request limits (on the declared shape, before any copy)."""
    if len(shape) != 3 or shape[2] != limits.hidden_size or shape[0] < 1 or shape[1] < 1:
        raise InvalidRequestError(
            f"hidden: shape must be [batch, tokens, {limits.hidden_size}] with batch, tokens >= 1, got {list(shape)}"
        )
    batch, tokens = shape[:2]
    if batch_size is not None and batch != batch_size:
        raise InvalidRequestError(f"hidden: batch of {batch} in a session opened for {batch_size}")
    if batch * tokens > limits.max_request_tokens:
        raise InvalidRequestError(f"hidden: {batch}x{tokens} tokens exceed the limit of {limits.max_request_tokens}")


def _check_finite(hidden: torch.Tensor) -> None:
    if not torch.isfinite(hidden).all():
        raise InvalidRequestError("hidden: contains NaN or infinite values")


def pushed_input(message: pb.Tensor, limits: Limits, batch_size: int | None) -> torch.Tensor:
    """The input of a header's step, pushed by another server or relayed by the client: checked, and
    converted to the server's dtype (the previous server of a chain may compute in another one)."""
    _check_hidden_shape(declared_shape(message, "hidden", FLOAT_DTYPES, 3), limits, batch_size)
    hidden = tensors.from_proto(message, "hidden").to(limits.dtype)
    _check_finite(hidden)
    return hidden


def step_input(
    hidden_msg: pb.Tensor | torch.Tensor,
    position_ids_msg: pb.Tensor,
    mask_msg: pb.Tensor,
    limits: Limits,
    batch_size: int | None = None,
    past: int = 0,
) -> Step:
    """Validate one step (or one stateless forward when ``past`` is 0 and ``batch_size`` is None).

    ``hidden_msg`` is a tensor for a header's step (its input came from ``pushed_input``)."""
    if isinstance(hidden_msg, torch.Tensor):
        hidden = hidden_msg
        _check_hidden_shape(tuple(hidden.shape), limits, batch_size)
    else:
        _check_hidden_shape(declared_shape(hidden_msg, "hidden", (limits.dtype_name,), 3), limits, batch_size)
        hidden = tensors.from_proto(hidden_msg, "hidden")
    if hidden.dtype != limits.dtype:
        raise InvalidRequestError(f"hidden: dtype {hidden.dtype} sent, this server computes in {limits.dtype}")
    _check_finite(hidden)
    batch, tokens = hidden.shape[:2]

    if tensors.is_empty(position_ids_msg):
        position_ids = torch.arange(past, past + tokens).expand(batch, tokens)
    else:
        if declared_shape(position_ids_msg, "position_ids", ("int64",), 2) != (batch, tokens):
            raise InvalidRequestError(f"position_ids: must be int64 [{batch}, {tokens}]")
        position_ids = tensors.from_proto(position_ids_msg, "position_ids")
        if not (0 <= int(position_ids.min()) and int(position_ids.max()) < MAX_POSITION):
            raise InvalidRequestError(f"position_ids: values must be in 0..{MAX_POSITION - 1}")

    attention_mask = None
    if not tensors.is_empty(mask_msg):
        if declared_shape(mask_msg, "attention_mask", ("bool",), 2) != (batch, tokens):
            raise InvalidRequestError(f"attention_mask: must be bool [{batch}, {tokens}] (the new tokens)")
        attention_mask = tensors.from_proto(mask_msg, "attention_mask")
        if bool(attention_mask.all()):
            attention_mask = None
    return Step(hidden, position_ids, attention_mask)
