"""Server-side checks without a network: tensor headers before allocation, float dtypes converted on arrival,
push rules (the mailbox), per-peer limits."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from proto import pb
from server import mailbox, validation
from server.config import ServerConfig
from server.mailbox import MAX_PENDING_INPUTS, Mailbox
from server.sessions import Session, SessionRegistry
from swarm import errors
from swarm.core.cache import KVGeometry
from swarm.net import tensors
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(30)
LIMITS = validation.Limits(BlockRange(0, 6), 64, torch.float32, max_request_tokens=64, max_length=128)
PEER_A = "12D3KooWGzBPmD6C4nj3ss1n4bYnpoc7XgpCfiEHRAzNixBBnF5u"
PEER_B = "QmTpG2QpaGmhUTHQTmhT4fwfyMMigthhx8wCV7zwqbdBee"


@pytest.fixture
def no_copies(monkeypatch):
    """Fail the test if a tensor's bytes are deserialized."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was deserialized before its declared shape was checked")

    monkeypatch.setattr(tensors, "from_proto", refuse)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ([1, 2**40, 64], "float32"),
        ([2**62, 2**62, 64], "float32"),
        ([1] * 10000, "float32"),
        ([-1, -1, 64], "float32"),
        ([1, 2, 64], "float64"),
        ([1, 2, 64], "int64"),
        ([1, 65, 64], "float32"),  # more tokens than a request may carry
    ],
)
def test_declared_hidden_is_checked_before_its_bytes(no_copies, shape, dtype):
    with pytest.raises(errors.InvalidRequestError):
        validation.hidden_input(pb.Tensor(buffer=b"\0" * 8, shape=shape, dtype=dtype), LIMITS, batch_size=None)


@pytest.mark.parametrize(
    "field, shape, dtype",
    [
        ("position_ids", [1, 2**40], "int64"),
        ("position_ids", [1, 2], "int32"),
        ("position_ids", [1, 2, 1], "int64"),
        ("mask", [1, 2**40], "bool"),
        ("mask", [1, 2], "float32"),
    ],
)
def test_declared_ids_and_masks_are_checked_before_their_bytes(field, shape, dtype):
    hidden = torch.randn(1, 2, 64)
    bad = pb.Tensor(buffer=b"\0" * 8, shape=shape, dtype=dtype)
    ids, mask = (bad, pb.Tensor()) if field == "position_ids" else (pb.Tensor(), bad)
    with pytest.raises(errors.InvalidRequestError, match=field.replace("mask", "attention_mask")):
        validation.step_input(hidden, ids, mask)


def test_a_valid_step_passes():
    hidden = validation.hidden_input(tensors.to_proto(torch.randn(2, 3, 64)), LIMITS, batch_size=2)
    ids = tensors.to_proto(torch.arange(5, 8).expand(2, 3).contiguous())
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 0] = False
    step = validation.step_input(hidden, ids, tensors.to_proto(mask), past=5, declared=(7, 3))
    assert step.hidden.shape == (2, 3, 64) and step.attention_mask.tolist() == mask.tolist()
    assert (step.round_id, step.round_size) == (7, 3)
    unpadded = validation.step_input(hidden, ids, tensors.to_proto(torch.ones(2, 3, dtype=torch.bool)))
    assert unpadded.attention_mask is None and unpadded.round_size == 0  # all true: nothing to mask
    with pytest.raises(errors.InvalidRequestError, match="attention_mask"):  # masks cover the new tokens only
        validation.step_input(hidden, ids, tensors.to_proto(torch.ones(2, 8, dtype=torch.bool)), past=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hidden_of_any_float_dtype_is_converted_to_the_servers(dtype):
    sent = torch.randn(1, 2, 64).to(dtype)
    for limits in (LIMITS, dataclasses.replace(LIMITS, dtype=torch.bfloat16)):
        hidden = validation.hidden_input(tensors.to_proto(sent), limits, 1)
        assert hidden.dtype == limits.dtype and torch.equal(hidden, sent.to(limits.dtype))
    for bad in (torch.full((1, 2, 64), float("nan")), torch.randn(2, 2, 64), torch.randn(1, 2, 63)):
        with pytest.raises(errors.InvalidRequestError):
            validation.hidden_input(tensors.to_proto(bad.to(dtype)), LIMITS, 1)


def test_float16_overflow_is_refused_not_converted_to_infinity():
    with pytest.raises(errors.InvalidRequestError, match="infinite"):
        validation.hidden_input(tensors.to_proto(torch.full((1, 1, 64), 1e5).half()), LIMITS, 1)


def spec(**fields) -> pb.StepSpec:
    message = pb.StepSpec()
    for name, value in fields.items():
        if name == "push_to":
            message.push_to.peer_id, message.push_to.session_id = value
        else:
            setattr(message, name, value)
    return message


@pytest.mark.parametrize(
    "push_to",
    [("not a peer id!", "s"), (PEER_A, ""), (PEER_A, "s" * 129), ("", "s"), ("1" * 129, "s"), (PEER_A, "two\nlines")],
)
def test_push_targets_must_be_peer_ids_and_session_ids(push_to):
    with pytest.raises(errors.InvalidRequestError):
        validation.push_target(spec(push_to=push_to))
    assert validation.push_target(spec(push_to=(PEER_A, "s"))) == (PEER_A, "s")
    assert validation.push_target(spec()) is None


@pytest.mark.parametrize("pusher", ["", "0OIl", "1" * 129])
def test_a_header_must_name_its_pusher(pusher):
    with pytest.raises(errors.InvalidRequestError):
        validation.check_peer_id(pusher, "push_from")
    validation.check_peer_id(PEER_B, "push_from")


def test_declared_rounds():
    assert validation.declared_round(spec()) == (0, 0)
    assert validation.declared_round(spec(round_id=2**64 - 1, round_size=3)) == (2**64 - 1, 3)
    for bad in (spec(round_id=5), spec(round_size=validation.MAX_ROUND_SIZE + 1)):
        with pytest.raises(errors.InvalidRequestError, match="round"):
            validation.declared_round(bad)


def test_message_cap_leaves_room_for_the_largest_valid_step():
    layers = {"self_attn.q_proj": (576, 576), "self_attn.v_proj": (576, 192)}
    limits = validation.Limits.build(BlockRange(0, 6), 576, torch.float32, ServerConfig(max_lora_rank=8), layers)
    tokens = limits.max_request_tokens
    largest = spec(push_to=(PEER_A, "s" * 128), round_id=2**64 - 1, round_size=4096)
    largest.position_ids.CopyFrom(tensors.to_proto(torch.zeros(1, tokens, dtype=torch.int64)))
    largest.attention_mask.CopyFrom(tensors.to_proto(torch.zeros(1, tokens, dtype=torch.bool)))
    largest.prompts.CopyFrom(tensors.to_proto(torch.zeros(6, 1, tokens // 6, 576)))  # blocks x rows x prefix
    largest.reorder.CopyFrom(tensors.to_proto(torch.zeros(1, dtype=torch.int64)))
    step = pb.InferenceRequest(step=pb.Step(spec=largest, hidden=tensors.to_proto(torch.zeros(1, tokens, 576))))
    lora = [
        pb.LoraWeight(
            block=block, module=name, a=tensors.to_proto(torch.zeros(8, i)), b=tensors.to_proto(torch.zeros(o, 8))
        )
        for block in range(6)
        for name, (i, o) in layers.items()
    ]
    opening = pb.Open(session_id="s" * 128, start_block=0, end_block=6, max_length=2048, batch_size=1)
    opening.adapter.lora.CopyFrom(pb.LoraWeights(rank=8, alpha=16, weights=lora))
    largest_bytes = step.ByteSize() + pb.InferenceRequest(open=opening).ByteSize()
    assert largest_bytes <= limits.max_message_bytes < 2 * largest_bytes
    # a float32 step fits a bfloat16 server too: it converts on arrival
    half = validation.Limits.build(BlockRange(0, 6), 576, torch.bfloat16, ServerConfig(max_lora_rank=8), layers)
    assert step.ByteSize() <= half.max_message_bytes
    assert (
        validation.Limits.build(
            BlockRange(0, 6), 576, torch.float32, ServerConfig(max_message_bytes=10)
        ).max_message_bytes
        == 10
    )


def make_session(session_id: str = "s", peer: str = PEER_B) -> Session:
    cache = KVGeometry(2, 32, torch.float32).allocate(1, 1, 16)
    return Session(session_id, peer, BlockRange(0, 1), 1, 16, cache)


def test_only_the_named_pusher_fills_a_header():
    box, hidden = Mailbox(), torch.zeros(1, 1, 64)
    box.open("s", batch_size=1)
    assert box.push("s", 0, hidden, "stranger")  # kept until a header names the previous server...
    box.expect("s", PEER_A)
    assert not box.push("s", 1, hidden, "stranger")  # ...which drops it, and refuses others from now on
    assert not box.push("s", 0, torch.zeros(2, 1, 64), PEER_A)  # not the session's batch size
    assert box.push("s", 0, hidden, PEER_A)
    assert box.relay("s", 1, hidden)  # the client's own relay is always welcome
    assert asyncio.run(box.take("s", 0, timeout=1)) is hidden
    with pytest.raises(errors.SessionNotFoundError, match="no input"):
        asyncio.run(box.take("s", 2, timeout=0.05))


def test_pending_inputs_are_bounded_and_stale_ones_dropped():
    box = Mailbox()
    box.open("s", batch_size=1)
    accepted = [box.relay("s", position, torch.zeros(1, 1, 64)) for position in range(10)]
    assert sum(accepted) == MAX_PENDING_INPUTS
    box.advance("s", 2)  # the cache moved past positions 0 and 1
    assert sorted(box.boxes["s"].inputs) == [2, 3]
    assert not box.relay("s", 1, torch.zeros(1, 1, 64))


def test_a_waiting_header_stops_when_the_stream_ends():
    box = Mailbox()
    box.open("s", batch_size=1)

    async def wait_then_end():
        waiting = asyncio.create_task(box.take("s", 0, timeout=30))
        await asyncio.sleep(0)  # the header starts waiting
        box.end("s", errors.SessionNotFoundError("stream ended"))
        return await waiting

    with pytest.raises(errors.SessionNotFoundError, match="stream ended"):
        asyncio.run(wait_then_end())


@pytest.mark.parametrize("session_id", ["", "s" * 129, "with space", "new\nline", "é"])
def test_session_ids_are_short_printable_ascii(session_id):
    request = pb.Open(session_id=session_id, start_block=0, end_block=6, max_length=16, batch_size=1)
    with pytest.raises(errors.InvalidRequestError):
        validation.open_request(request, LIMITS)


def test_pushes_that_beat_their_session_wait_for_it():
    box, hidden = Mailbox(), torch.zeros(1, 1, 64)
    assert box.push("early", 0, hidden, PEER_A)
    assert box.push("early", 0, torch.ones(1, 1, 64), PEER_B)  # a stranger's, for the same step
    assert box.push("other-batch", 0, torch.zeros(2, 1, 64), PEER_A)
    box.open("early", batch_size=1)
    box.expect("early", PEER_A)  # what the first header names
    assert box.boxes["early"].inputs == {0: (hidden, PEER_A)}
    box.open("other-batch", batch_size=1)  # a push of the wrong batch size is not handed over
    assert box.boxes["other-batch"].inputs == {}
    assert box.early == []


def test_early_pushes_are_bounded_and_expire():
    box = Mailbox()
    small = torch.zeros(1, 1, 64)
    share = mailbox.EARLY_PUSH_COUNT // mailbox.EARLY_PUSH_SHARE
    assert all(box.push(f"s{i}", 0, small, PEER_A) for i in range(share))
    assert not box.push("one-more", 0, small, PEER_A)  # this peer's share is used up...
    assert box.push("theirs", 0, small, PEER_B)  # ...not another peer's
    big = torch.zeros(1, mailbox.EARLY_PUSH_BYTES // 256 + 1, 64)  # more than a peer's share of bytes
    assert not box.push("big", 0, big, "QmOther")
    now = time.monotonic()
    box.clock = lambda: now + mailbox.EARLY_PUSH_SECONDS + 1
    assert box.push("later", 0, small, PEER_A) and len(box.early) == 1  # the old ones expired


def test_registry_limits_sessions_per_peer_and_hides_other_sessions():
    registry = SessionRegistry(max_per_peer=2)
    first, second = make_session("a", PEER_A), make_session("b", PEER_A)
    registry.add(first)
    registry.add(second)
    with pytest.raises(errors.TooManyRequestsError):
        registry.check_can_open("c", PEER_A)
    with pytest.raises(errors.InvalidRequestError) as caught:
        registry.check_can_open("a", PEER_B)  # another peer reusing an id learns nothing about its owner
    assert PEER_A not in str(caught.value) and "'a'" not in str(caught.value)
    registry.remove(make_session("a", PEER_B))  # not the registered object: ignored
    registry.remove(first)
    registry.check_can_open("c", PEER_A)
    assert registry.get("b") is second and len(registry) == 1
