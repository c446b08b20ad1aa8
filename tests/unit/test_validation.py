"""Server-side checks without a network: tensor headers before allocation, push rules, per-peer limits."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from proto import pb
from server import validation
from server.config import ServerConfig
from server.sessions import MAX_PENDING_INPUTS, Session, SessionRegistry
from swarm import errors, tensors
from swarm.core.cache import KVGeometry
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
        validation.step_input(pb.Tensor(buffer=b"\0" * 8, shape=shape, dtype=dtype), pb.Tensor(), pb.Tensor(), LIMITS)


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
    hidden = tensors.to_proto(torch.randn(1, 2, 64))
    bad = pb.Tensor(buffer=b"\0" * 8, shape=shape, dtype=dtype)
    ids, mask = (bad, pb.Tensor()) if field == "position_ids" else (pb.Tensor(), bad)
    with pytest.raises(errors.InvalidRequestError, match=field.replace("mask", "attention_mask")):
        validation.step_input(hidden, ids, mask, LIMITS)


def test_a_valid_step_passes():
    hidden = tensors.to_proto(torch.randn(2, 3, 64))
    ids = tensors.to_proto(torch.arange(5, 8).expand(2, 3).contiguous())
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 0] = False
    step = validation.step_input(hidden, ids, tensors.to_proto(mask), LIMITS, batch_size=2, past=5)
    assert step.hidden.shape == (2, 3, 64) and step.attention_mask.tolist() == mask.tolist()
    unpadded = validation.step_input(hidden, ids, tensors.to_proto(torch.ones(2, 3, dtype=torch.bool)), LIMITS)
    assert unpadded.attention_mask is None  # all true: nothing to mask
    with pytest.raises(errors.InvalidRequestError, match="attention_mask"):  # masks cover the new tokens only
        validation.step_input(hidden, ids, tensors.to_proto(torch.ones(2, 8, dtype=torch.bool)), LIMITS, past=5)


def test_pushed_input_is_converted_and_checked():
    pushed = validation.pushed_input(tensors.to_proto(torch.randn(1, 2, 64, dtype=torch.bfloat16)), LIMITS, 1)
    assert pushed.dtype == torch.float32
    for bad in (torch.full((1, 2, 64), float("nan")), torch.randn(2, 2, 64), torch.randn(1, 2, 63)):
        with pytest.raises(errors.InvalidRequestError):
            validation.pushed_input(tensors.to_proto(bad), LIMITS, 1)


@pytest.mark.parametrize(
    "fields",
    [
        dict(push_peer_id="not a peer id!", push_session_id="s"),
        dict(push_peer_id=PEER_A),
        dict(push_peer_id=PEER_A, push_session_id="s" * 129),
        dict(push_from_peer_id="0OIl"),  # not base58
        dict(push_from_peer_id="1" * 129),
        dict(push_peer_id=PEER_A, push_session_id="two\nlines"),
    ],
)
def test_push_fields_must_be_peer_ids_and_session_ids(fields):
    with pytest.raises(errors.InvalidRequestError):
        validation.push_fields(pb.InferenceRequest(**fields))
    validation.push_fields(pb.InferenceRequest(push_peer_id=PEER_A, push_session_id="s", push_from_peer_id=PEER_B))


def test_message_cap_leaves_room_for_the_largest_valid_step():
    layers = {"self_attn.q_proj": (576, 576), "self_attn.v_proj": (576, 192)}
    limits = validation.Limits.build(BlockRange(0, 6), 576, torch.float32, ServerConfig(max_lora_rank=8), layers)
    largest = pb.InferenceRequest(session_id="s" * 128, push_peer_id=PEER_A, push_session_id="s" * 128)
    tokens = limits.max_request_tokens
    largest.hidden.CopyFrom(tensors.to_proto(torch.zeros(1, tokens, 576)))
    largest.position_ids.CopyFrom(tensors.to_proto(torch.zeros(1, tokens, dtype=torch.int64)))
    largest.attention_mask.CopyFrom(tensors.to_proto(torch.zeros(1, tokens, dtype=torch.bool)))
    largest.prompts.CopyFrom(tensors.to_proto(torch.zeros(6, 1, tokens // 6, 576)))  # blocks x rows x prefix
    largest.reorder.CopyFrom(tensors.to_proto(torch.zeros(1, dtype=torch.int64)))
    lora = [
        pb.LoraWeight(
            block=block, module=name, a=tensors.to_proto(torch.zeros(8, i)), b=tensors.to_proto(torch.zeros(o, 8))
        )
        for block in range(6)
        for name, (i, o) in layers.items()
    ]
    largest.adapter.lora.CopyFrom(pb.LoraWeights(rank=8, alpha=16, weights=lora))
    assert largest.ByteSize() <= limits.max_message_bytes < 2 * largest.ByteSize()
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
    session, hidden = make_session(), torch.zeros(1, 1, 64)
    assert session.may_push("anyone")  # legacy: no pusher named yet
    session.deliver(0, hidden, "stranger")
    session.expect_input(PEER_A)
    assert 0 not in session.inputs  # pushed ahead by a peer the header did not name: dropped
    assert not session.deliver(0, hidden, "stranger")
    assert session.deliver(0, hidden, PEER_A)
    assert session.deliver(1, hidden, None)  # the client's own fallback is always welcome
    assert asyncio.run(session.take(0, timeout=1)) is hidden


def test_pending_inputs_are_bounded_and_stale_ones_dropped():
    session = make_session()
    accepted = [session.deliver(position, torch.zeros(1, 1, 64)) for position in range(10)]
    assert sum(accepted) == MAX_PENDING_INPUTS
    session.cache.advance(2)  # the cache moved past positions 0 and 1
    session.drop_stale_inputs()
    assert sorted(session.inputs) == [2, 3]


def test_a_waiting_header_stops_when_the_stream_ends():
    session = make_session()

    async def wait_then_end():
        waiting = asyncio.create_task(session.take(0, timeout=30))
        await asyncio.sleep(0.01)
        session.end_inputs(errors.SessionNotFoundError("stream ended"))
        return await waiting

    with pytest.raises(errors.SessionNotFoundError, match="stream ended"):
        asyncio.run(wait_then_end())


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


@pytest.mark.parametrize("session_id", ["", "s" * 129, "with space", "new\nline", "é"])
def test_session_ids_are_short_printable_ascii(session_id):
    request = pb.InferenceRequest(session_id=session_id, start_block=0, end_block=6, max_length=16, batch_size=1)
    with pytest.raises(errors.InvalidRequestError):
        validation.open_request(request, LIMITS)


def test_pushes_that_beat_their_header_wait_for_the_session():
    registry, hidden = SessionRegistry(max_per_peer=4), torch.zeros(1, 1, 64)
    assert registry.early.hold("early", 0, hidden, PEER_A)
    assert registry.early.hold("early", 0, torch.ones(1, 1, 64), PEER_B)  # a stranger's, for the same step
    assert registry.early.hold("other-batch", 0, torch.zeros(2, 1, 64), PEER_A)
    session = make_session("early")
    session.expect_input(PEER_A)  # what the opening header names, before the session is registered
    registry.add(session)
    assert session.inputs[0][0] is hidden and session.inputs[0][1] == PEER_A
    registry.add(make_session("other-batch"))  # a push of the wrong batch size is not handed over
    assert registry.get("other-batch").inputs == {}
    assert registry.early.held == []


def test_early_pushes_are_bounded_and_expire():
    from server import sessions

    early = sessions.EarlyPushes()
    small = torch.zeros(1, 1, 64)
    share = sessions.EARLY_PUSH_COUNT // sessions.EARLY_PUSH_SHARE
    assert all(early.hold(f"s{i}", 0, small, PEER_A) for i in range(share))
    assert not early.hold("one-more", 0, small, PEER_A)  # this peer's share is used up...
    assert early.hold("theirs", 0, small, PEER_B)  # ...not another peer's
    big = torch.zeros(1, sessions.EARLY_PUSH_BYTES // 256 + 1, 64)  # more than a peer's share of bytes
    assert not early.hold("big", 0, big, "QmOther")
    now = time.monotonic()
    early.clock = lambda: now + sessions.EARLY_PUSH_SECONDS + 1
    assert early.hold("later", 0, small, PEER_A) and len(early.held) == 1  # the old ones expired
