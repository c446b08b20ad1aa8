"""Tests for swarm.spans (block ranges, DHT names), swarm.net.tensors (wire tensors) and swarm.errors."""

from __future__ import annotations

import pytest
import torch

from proto import pb
from swarm import errors
from swarm.errors import InvalidRequestError, format_blocks
from swarm.net import tensors
from swarm.spans import BlockRange, block_key, model_prefix, parse_blocks

pytestmark = pytest.mark.timeout(30)


# --- spans -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10:20", BlockRange(10, 20)), ("5", BlockRange(5, 6)), (" 3 : 7 ", BlockRange(3, 7)), ("0:1", BlockRange(0, 1))],
)
def test_parse_blocks_accepts_ranges_and_single_blocks(text, expected):
    assert parse_blocks(text) == expected


@pytest.mark.parametrize("text", ["", ":", "a:b", "10-20", "-1:3", "3:", ":3", "5:5", "7:3", "1:2:3", "1.5:3", "x"])
def test_parse_blocks_rejects_malformed_text(text):
    with pytest.raises(ValueError):
        parse_blocks(text)


def test_parse_blocks_checks_the_model_depth():
    assert parse_blocks("0:16", num_blocks=16) == BlockRange(0, 16)
    assert parse_blocks("15", num_blocks=16) == BlockRange(15, 16)
    with pytest.raises(ValueError, match="outside the model"):
        parse_blocks("10:20", num_blocks=16)
    with pytest.raises(ValueError, match="outside the model"):
        parse_blocks("16", num_blocks=16)


def test_block_range_rejects_empty_and_negative_ranges():
    for start, end in [(3, 3), (4, 2), (-1, 2)]:
        with pytest.raises(ValueError):
            BlockRange(start, end)


def test_block_range_containment_of_blocks_and_ranges():
    span = BlockRange(2, 6)
    assert len(span) == 4 and str(span) == "2:6"
    assert 2 in span and 5 in span
    assert 1 not in span and 6 not in span
    assert BlockRange(2, 6) in span and BlockRange(3, 5) in span
    assert BlockRange(1, 3) not in span and BlockRange(5, 7) not in span
    assert "3" not in span and 3.0 not in span


def test_model_prefix_of_hub_names_and_paths():
    assert model_prefix("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert model_prefix("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert model_prefix("/tmp/models/tiny_llama/") == "tiny_llama"
    assert model_prefix("C:\\models\\tiny") == "tiny"
    assert model_prefix("/data/my model (v2)") == "my-model--v2-"
    assert model_prefix("") == "model" and model_prefix("/") == "model"
    assert block_key("tiny", 3) == "tiny.block.3"


# --- tensors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 3, 4),
        torch.randn(3, 5).to(torch.bfloat16),
        torch.randn(4).to(torch.float16),
        torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        torch.arange(6, dtype=torch.int32),
        torch.tensor([[True, False, True], [False, False, True]]),
        torch.empty(0, 7),
        torch.empty(2, 0, 3, dtype=torch.bfloat16),
        torch.tensor(3.5),
        torch.randn(4, 6).t(),  # not contiguous
    ],
    ids=["f32", "bf16", "f16", "i64", "i32", "bool", "empty", "empty-bf16", "scalar", "transposed"],
)
def test_tensor_round_trip(tensor):
    message = tensors.to_proto(tensor)
    assert message.dtype == str(tensor.dtype).removeprefix("torch.")
    back = tensors.from_proto(pb.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_to_proto_refuses_unsupported_dtypes():
    with pytest.raises(TypeError):
        tensors.to_proto(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (pb.Tensor(buffer=b"\x00" * 12, shape=[2, 2], dtype="float32"), "needs 16 bytes"),
        (pb.Tensor(buffer=b"\x00" * 20, shape=[2, 2], dtype="float32"), "needs 16 bytes"),
        (pb.Tensor(buffer=b"\x00" * 3, shape=[0], dtype="int64"), "needs 0 bytes"),
        (pb.Tensor(buffer=b"\x00" * 4, shape=[2, 2], dtype="float64"), "unsupported dtype"),
        (pb.Tensor(buffer=b"", shape=[], dtype=""), "unsupported dtype"),
        (pb.Tensor(buffer=b"\x00" * 16, shape=[-2, -2], dtype="float32"), "negative dimension"),
    ],
)
def test_from_proto_rejects_inconsistent_messages(message, match):
    with pytest.raises(errors.InvalidRequestError, match=match):
        tensors.from_proto(message, field="hidden")


def test_from_proto_names_the_field():
    with pytest.raises(errors.InvalidRequestError, match="^position_ids: "):
        tensors.from_proto(pb.Tensor(dtype="nope"), field="position_ids")


def test_is_empty():
    assert tensors.is_empty(pb.Tensor())
    assert not tensors.is_empty(tensors.to_proto(torch.empty(0)))


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        errors.InvalidRequestError,
        errors.CacheFullError,
        errors.SessionNotFoundError,
        errors.BlocksNotServedError,
        errors.ShuttingDownError,
        errors.RemoteInternalError,
    ],
)
def test_error_round_trip_preserves_the_class(cls):
    wire = pb.Error.FromString(errors.to_proto(cls("something went wrong")).SerializeToString())
    back = errors.from_proto(wire, peer="12D3KooWpeer")
    assert type(back) is cls
    assert str(back) == "server 12D3KooWpeer: something went wrong"
    assert str(errors.from_proto(wire)) == "something went wrong"


def test_unknown_exceptions_become_internal_errors():
    wire = errors.to_proto(KeyError("boom"))
    assert wire.code == pb.INTERNAL and "KeyError" in wire.message
    assert type(errors.from_proto(wire)) is errors.RemoteInternalError
    assert type(errors.from_proto(pb.Error(code=pb.ERROR_CODE_UNSPECIFIED, message="?"))) is errors.RemoteInternalError


def test_missing_blocks_error_names_the_blocks():
    exc = errors.MissingBlocksError([5, 3, 4, 9], detail="waited 5 s")
    assert exc.blocks == [5, 3, 4, 9]
    assert str(exc) == "no server in the swarm serves blocks 3:6, 9:10: waited 5 s"
    assert isinstance(exc, errors.StamenError)


@pytest.mark.parametrize(
    ("blocks", "text"),
    [([], ""), ([0], "0:1"), ([3, 4, 5, 9], "3:6, 9:10"), ([9, 3, 5, 4, 4], "3:6, 9:10"), ([1, 3, 5], "1:2, 3:4, 5:6")],
)
def test_format_blocks(blocks, text):
    assert format_blocks(blocks) == text


@pytest.mark.parametrize(
    "compression, ratio, tolerance",
    [(pb.COMPRESSION_NONE, 1.0, 0.0), (pb.COMPRESSION_FLOAT16, 0.5, 1e-3), (pb.COMPRESSION_INT8, 0.26, 2e-2)],
)
def test_compressed_activations_are_smaller_and_close(compression, ratio, tolerance):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 576, generator=generator) * torch.linspace(0.1, 30, 576)  # very different scales
    plain = tensors.to_proto(hidden)
    message = tensors.to_proto(hidden, compression)
    decoded = tensors.from_proto(message)
    assert decoded.dtype == torch.float32 and decoded.shape == hidden.shape
    assert len(message.buffer) + len(message.scales) <= ratio * len(plain.buffer) + 64
    assert ((decoded - hidden).norm() / hidden.norm()).item() <= tolerance


def test_integer_tensors_are_never_compressed():
    ids = torch.arange(6).reshape(2, 3)
    assert torch.equal(tensors.from_proto(tensors.to_proto(ids, pb.COMPRESSION_INT8)), ids)


@pytest.mark.parametrize(
    "change",
    [
        dict(compression=7),  # unknown
        dict(scales=b"\0" * 3),  # int8 scales of the wrong length
        dict(dtype="int64"),  # integers cannot be compressed
        dict(buffer=b"\0" * 5),  # values of the wrong length
    ],
)
def test_malformed_compressed_tensors_are_refused(change):
    message = tensors.to_proto(torch.randn(2, 4), pb.COMPRESSION_INT8)
    for name, value in change.items():
        setattr(message, name, value)
    with pytest.raises(InvalidRequestError):
        tensors.from_proto(message, "hidden")


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_an_empty_compressed_tensor_reads_as_empty(shape):
    """No honest sender compresses an empty tensor, but a peer may send one: it is read, not a crash."""
    message = pb.Tensor(shape=list(shape), dtype="float32", compression=pb.COMPRESSION_INT8)
    assert tensors.from_proto(message).shape == shape
