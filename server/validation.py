"""Checks on everything a peer sends, turning protobuf requests into validated domain objects.

Every check raises InvalidRequestError (or BlocksNotServedError) with a message that says what was
wrong; nothing here touches server state. A tensor's declared dtype and shape are checked against
what the request may carry *before* its bytes are copied, so a small message that declares a huge
tensor costs nothing. Error messages never echo unbounded strings a peer sent. Float inputs may come in
any of FLOAT_DTYPES and are converted to the server's dtype on arrival, in one place (``converted``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from proto import pb
from server.config import ServerConfig
from swarm.errors import BlocksNotServedError, InvalidRequestError
from swarm.net import tensors
from swarm.spans import BlockRange

MAX_POSITION = 1 << 20  # rotary positions beyond this are surely garbage
MAX_SESSION_ID = 128
MAX_PEER_ID = 128  # base58 libp2p peer ids have about 52 characters
BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what float inputs may come in (converted on arrival)
FLOAT_ITEMSIZE = 4  # bytes per value of the widest of them
MAX_ROUND_SIZE = 4096  # steps one declared round may have
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
        hidden = self.max_request_tokens * self.hidden_size * FLOAT_ITEMSIZE  # any float dtype may come in
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
    hidden: torch.Tensor  # [batch, new_tokens, hidden_size] in the server's dtype
    position_ids: torch.Tensor  # [batch, new_tokens] int64
    attention_mask: torch.Tensor | None  # [batch, new_tokens] bool, False marks padding; None = no padding
    round_id: int = 0  # the round the client declared this step part of...
    round_size: int = 0  # ...and how many steps it has (0: not declared)


def requested_blocks(start: int, end: int, limits: Limits) -> BlockRange:
    if not start < end:
        raise InvalidRequestError(f"empty block range {start}:{end}")
    blocks = BlockRange(start, end)
    if blocks not in limits.span:
        raise BlocksNotServedError(f"blocks {blocks} requested, this server serves {limits.span}")
    return blocks


def open_request(message: pb.Open, limits: Limits) -> OpenRequest:
    check_session_id(message.session_id, "session_id")
    blocks = requested_blocks(message.start_block, message.end_block, limits)
    if not 1 <= message.max_length <= limits.max_length:
        raise InvalidRequestError(f"max_length must be in 1..{limits.max_length}, got {message.max_length}")
    if not 1 <= message.batch_size <= limits.max_request_tokens:
        raise InvalidRequestError(f"batch_size must be in 1..{limits.max_request_tokens}, got {message.batch_size}")
    return OpenRequest(message.session_id, blocks, message.batch_size, message.max_length)


def push_target(message: pb.StepSpec) -> tuple[str, str] | None:
    """Where a step's output is pushed: (the next server's peer id, its session id); None if nowhere."""
    if not message.HasField("push_to"):
        return None
    check_peer_id(message.push_to.peer_id, "push_to.peer_id")
    check_session_id(message.push_to.session_id, "push_to.session_id")
    return message.push_to.peer_id, message.push_to.session_id


def declared_round(message: pb.StepSpec) -> tuple[int, int]:
    """(round id, round size) a step declares; (0, 0) when it is not part of a declared round."""
    if message.round_size == 0:
        if message.round_id != 0:
            raise InvalidRequestError("round_id: set without a round_size")
        return 0, 0
    if message.round_size > MAX_ROUND_SIZE:
        raise InvalidRequestError(f"round_size: at most {MAX_ROUND_SIZE} steps, got {message.round_size}")
    return message.round_id, message.round_size


def output_compression(value: int) -> int:
    """How the caller wants outputs sent (``pb.Compression``); only the ones this server knows."""
    if value not in tensors.COMPRESSIONS.values():
        raise InvalidRequestError(f"compression: unknown value {value}")
    return value


def check_session_id(value: str, field: str) -> None:
    """Printable ASCII without spaces (it ends up in logs), 1 to MAX_SESSION_ID characters."""
    if not 1 <= len(value) <= MAX_SESSION_ID or not (value.isascii() and value.isprintable()) or " " in value:
        raise InvalidRequestError(f"{field} must have 1 to {MAX_SESSION_ID} printable ASCII characters, no spaces")


def check_peer_id(value: str, field: str) -> None:
    """A base58 libp2p peer id (not empty)."""
    if not value or len(value) > MAX_PEER_ID or not set(value) <= BASE58:
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


def converted(message: pb.Tensor, field: str, limits: Limits) -> torch.Tensor:
    """A float tensor whose declared dtype (one of FLOAT_DTYPES) and shape were checked: read, converted to the
    server's dtype, and finite. Every float input a peer sends (steps, relays, pushes, passes, gradients, deep
    prompts, LoRA weights) arrives through here, whatever float dtype the peer computes in."""
    value = tensors.from_proto(message, field).to(limits.dtype)
    if not torch.isfinite(value).all():
        raise InvalidRequestError(f"{field}: contains NaN or infinite values")
    return value


def hidden_input(message: pb.Tensor, limits: Limits, batch_size: int | None) -> torch.Tensor:
    """Hidden states [batch, tokens, hidden_size] in any float dtype (a step's, a relay's, a push's or a pass's),
    checked as declared and converted to the server's dtype; ``batch_size`` is the session's, if any."""
    _check_hidden_shape(declared_shape(message, "hidden", FLOAT_DTYPES, 3), limits, batch_size)
    return converted(message, "hidden", limits)


def step_input(
    hidden: torch.Tensor,
    position_ids_msg: pb.Tensor,
    mask_msg: pb.Tensor,
    past: int = 0,
    declared: tuple[int, int] = (0, 0),
) -> Step:
    """One step (or one stateless forward when ``past`` is 0) on ``hidden`` from ``hidden_input``: positions
    (default ``past``..) and padding mask of its new tokens, and the round it is part of (``declared_round``)."""
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
    return Step(hidden, position_ids, attention_mask, *declared)
