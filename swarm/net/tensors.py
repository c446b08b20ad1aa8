"""Torch tensors <-> ``pb.Tensor`` (bytes + shape + dtype), with checks for remote input, and the
activation compressions a client may ask for (``pb.Compression``; off by default, since they round).

- float16: each value rounded to float16 (half the bytes of float32).
- int8: each row (all dimensions but the last) divided by its absolute maximum / 127 and rounded, with
  that scale kept per row as float32 (about a quarter of the bytes of float32).
"""

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
FLOATING = (torch.float32, torch.float16, torch.bfloat16)
COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "float16": pb.COMPRESSION_FLOAT16, "int8": pb.COMPRESSION_INT8}
_ENCODED = {pb.COMPRESSION_FLOAT16: torch.float16, pb.COMPRESSION_INT8: torch.int8}  # how values travel


def to_proto(tensor: torch.Tensor, compression: int = pb.COMPRESSION_NONE) -> pb.Tensor:
    """Serialize a CPU tensor; floating-point tensors may be compressed (``pb.Compression``)."""
    tensor = tensor.detach().cpu().contiguous()
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise TypeError(f"cannot send tensors of dtype {tensor.dtype}")
    if compression == pb.COMPRESSION_NONE or tensor.dtype not in FLOATING or not tensor.numel():
        return pb.Tensor(buffer=_bytes(tensor), shape=list(tensor.shape), dtype=name)
    message = pb.Tensor(shape=list(tensor.shape), dtype=name, compression=compression)
    if compression == pb.COMPRESSION_FLOAT16:
        message.buffer = _bytes(tensor.to(torch.float16))
    elif compression == pb.COMPRESSION_INT8:
        rows = tensor.float().reshape(-1, tensor.shape[-1]) if tensor.dim() else tensor.float().reshape(1, 1)
        scales = rows.abs().amax(dim=1).clamp(min=1e-30) / 127.0  # [rows] float32
        message.buffer = _bytes(torch.round(rows / scales[:, None]).to(torch.int8))
        message.scales = _bytes(scales)
    else:
        raise ValueError(f"unknown compression {compression}")
    return message


def _bytes(tensor: torch.Tensor) -> bytes:
    raw = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    return raw.numpy().tobytes()


def from_proto(message: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Deserialize (and decompress) a tensor, raising InvalidRequestError if its header and bytes disagree."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidRequestError(f"{field}: unsupported dtype {message.dtype!r}")
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidRequestError(f"{field}: negative dimension in shape {shape}")
    if message.compression == pb.COMPRESSION_NONE:
        return _read(message.buffer, shape, dtype, field)
    encoded = _ENCODED.get(message.compression)
    if encoded is None or dtype not in FLOATING:
        raise InvalidRequestError(f"{field}: unsupported compression {message.compression} of {message.dtype}")
    values = _read(message.buffer, shape, encoded, field)
    if message.compression == pb.COMPRESSION_FLOAT16 or not values.numel():  # an empty one has no rows to scale
        return values.to(dtype)
    rows = values.numel() // shape[-1] if shape and shape[-1] else 1
    scales = _read(message.scales, (rows,), torch.float32, f"{field} scales")
    return (values.reshape(rows, -1).float() * scales[:, None]).reshape(shape).to(dtype)


def _read(buffer: bytes, shape: tuple[int, ...], dtype: torch.dtype, field: str) -> torch.Tensor:
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if numel * itemsize != len(buffer):
        raise InvalidRequestError(
            f"{field}: shape {shape} of {DTYPE_NAMES.get(dtype, dtype)} needs {numel * itemsize} bytes, "
            f"got {len(buffer)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(buffer), dtype=torch.uint8).view(dtype).reshape(shape)


def is_empty(message: pb.Tensor) -> bool:
    """True for an unset optional tensor field."""
    return not message.dtype and not message.shape and not message.buffer
