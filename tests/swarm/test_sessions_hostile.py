"""Hostile peers around sessions and pushes: a push from a peer the client did not name, too many sessions
from one peer, steps flooded ahead of their inputs, a stream ended while a header waits. Each gets a
typed error or is ignored, and the sessions of honest clients carry on correctly."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from client.loop import LoopThread
from proto import pb
from swarm import errors
from swarm.net import tensors
from swarm.net.rpc import call_forward, call_info
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.hostile import (
    FRAME_END,
    HostilePeer,
    header_request,
    open_request,
    receive,
    send,
    session_start,
    step_request,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)
HIDDEN = 64


@pytest.fixture(scope="module")
def push_pair(tiny_models):
    """Two servers (0:3 pushes into 3:6), a client peer and an attacker peer, each with its own peer id."""
    limits = ("--max-sessions-per-peer", "3", "--max-queued-steps", "4")
    with LocalSwarm() as swarm:
        servers = swarm.start(tiny_models["llama"], [("0:3", limits), ("3:6", limits)])
        loop = LoopThread()
        client = loop.run(HostilePeer.start(swarm.initial_peers))
        attacker = loop.run(HostilePeer.start(swarm.initial_peers))
        try:
            yield servers, loop, client, attacker
        finally:
            for peer in (client, attacker):
                loop.run(peer.shutdown())
            loop.stop()


def header(session_id: str, push_from: str) -> list[pb.InferenceRequest]:
    """A session over blocks 3:6 opened, and its step 0, whose input comes from ``push_from`` (or a relay)."""
    return [open_request(session_id, start_block=3, end_block=6), header_request(push_from)]


def test_push_from_a_peer_the_client_did_not_name_is_ignored(push_pair):
    (first, second), loop, client, attacker = push_pair
    hidden = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(5))

    async def reference() -> torch.Tensor:  # stateless forward passes through both servers
        current = tensors.to_proto(hidden)
        for server, (start, end) in ((first, (0, 3)), (second, (3, 6))):
            message = pb.ForwardRequest(start_block=start, end_block=end, hidden=current)
            current = (await call_forward(client.p2p, server.peer_id, message, timeout=10)).hidden
        return tensors.from_proto(current)

    async def pushed_through_the_chain() -> torch.Tensor:
        ours, theirs = "s-" + uuid.uuid4().hex, "s-" + uuid.uuid4().hex
        to_second = await client.stream(second.peer_id)
        await send(to_second[1], *header(theirs, first.peer_id))
        _, push = await attacker.stream(second.peer_id, "Push")
        garbage = pb.PushRequest(
            session_id=theirs, position=0, hidden=tensors.to_proto(torch.full((1, 3, HIDDEN), 7.0))
        )
        dropped = f"Dropped a push from {attacker.peer_id} into session {theirs}"
        deadline = asyncio.get_running_loop().time() + 20
        while not any(dropped in line for line in list(second.output)):  # retried until the session is open
            assert asyncio.get_running_loop().time() < deadline, "the server never saw the attacker's push"
            await send(push, garbage)
            await asyncio.sleep(0.1)
        to_first = await client.stream(first.peer_id)
        opening = open_request(ours, end_block=3)
        await send(to_first[1], opening, step_request(hidden=hidden, push_to=(second.peer_id, theirs)))
        answer = await receive(to_first[0], timeout=10)
        assert answer is not None and answer.pushed, answer
        answer = await receive(to_second[0], timeout=10)
        assert answer is not None and not answer.HasField("error"), answer
        for _, writer in (to_first, to_second):
            writer.write(FRAME_END)
        push.close()
        return tensors.from_proto(answer.hidden)

    expected = loop.run(reference())
    actual = loop.run(pushed_through_the_chain())
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_too_many_sessions_from_one_peer_get_a_typed_error(push_pair):
    (_, second), loop, client, attacker = push_pair

    async def open_session(peer: HostilePeer):
        reader, writer = await peer.stream(second.peer_id)
        await send(writer, *session_start("s-" + uuid.uuid4().hex, start_block=3, end_block=6))
        return await receive(reader, timeout=10), writer

    async def scenario():
        held = [await open_session(attacker) for _ in range(3)]
        assert all(answer is not None and not answer.HasField("error") for answer, _ in held)
        refused, writer = await open_session(attacker)
        others, other_writer = await open_session(client)  # another peer is not affected
        for _, held_writer in held + [(None, writer), (None, other_writer)]:
            held_writer.write(FRAME_END)
        return refused, others

    refused, others = loop.run(scenario())
    assert refused is not None and isinstance(errors.from_proto(refused.error), errors.TooManyRequestsError), refused
    assert others is not None and not others.HasField("error"), others
    free = lambda: loop.run(call_info(client.p2p, second.peer_id, timeout=5)).cache_tokens_left  # noqa: E731
    wait_for(lambda: free() == 16384, 20, "the closed sessions to free their cache")
    again, writer = loop.run(open_session(attacker))
    writer.write(FRAME_END)
    assert again is not None and not again.HasField("error"), again


def test_flooding_steps_ahead_fails_the_stream(push_pair):
    (_, second), loop, _, attacker = push_pair

    async def flood():
        reader, writer = await attacker.stream(second.peer_id)
        session = "s-" + uuid.uuid4().hex
        steps = [step_request(step=i) for i in range(1, 8)]
        await send(writer, *header(session, attacker.peer_id), *steps)  # the header waits for an input that never comes
        answer = await receive(reader, timeout=10)
        writer.close()
        return answer

    answer = loop.run(flood())
    assert answer is not None and answer.error.code == pb.INVALID_ARGUMENT, answer
    assert "steps sent ahead" in answer.error.message


def test_ending_the_stream_releases_a_waiting_header_at_once(push_pair):
    (_, second), loop, _, attacker = push_pair

    async def end_early():
        reader, writer = await attacker.stream(second.peer_id)
        await send(writer, *header("s-" + uuid.uuid4().hex, attacker.peer_id))
        writer.write(FRAME_END)
        return await receive(reader, timeout=10)  # not after the idle timeout (120 s)

    answer = loop.run(end_early())
    assert answer is not None and answer.error.code == pb.SESSION_NOT_FOUND, answer
