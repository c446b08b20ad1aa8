"""Torch tensors <-> ``pb.Tensor`` (raw bytes + shape + dtype), with checks for remote input."""

from __future__ import annotations

import torch

from proto import pb
from swarm.errors import InvalidRequestError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Serialize a CPU tensor; the bytes are its row-major contents."""
    tensor = tensor.detach().cpu().contiguous()
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise TypeError(f"cannot send tensors of dtype {tensor.dtype}")
    raw = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    return pb.Tensor(buffer=raw.numpy().tobytes(), shape=list(tensor.shape), dtype=name)


def from_proto(message: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Deserialize a tensor, raising InvalidRequestError if its header and bytes disagree."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidRequestError(f"{field}: unsupported dtype {message.dtype!r}")
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidRequestError(f"{field}: negative dimension in shape {shape}")
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if numel * itemsize != len(message.buffer):
        raise InvalidRequestError(
            f"{field}: shape {shape} of {message.dtype} needs {numel * itemsize} bytes, got {len(message.buffer)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(message.buffer), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def is_empty(message: pb.Tensor) -> bool:
    """True for an unset optional tensor field."""
    return not message.dtype and not message.shape and not message.buffer
