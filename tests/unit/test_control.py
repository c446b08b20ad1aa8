"""hivemind's reader of unary answers survives an answer to a call that was cancelled meanwhile
(``swarm.net.control``): without it the reader task dies and no later call of that handle is answered."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hivemind.p2p.p2p_daemon_bindings.control import ControlClient
from hivemind.proto import p2pd_pb2

from swarm.net.control import HandlerTasks, PendingCalls, harden_control

pytestmark = pytest.mark.timeout(30)


def framed(message) -> bytes:
    """A protobuf message as the daemon writes it: its length as a varint, then its bytes."""
    body, size, prefix = message.SerializeToString(), message.ByteSize(), bytearray()
    while True:
        prefix.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            return bytes(prefix) + body


def answer(call_id: uuid.UUID, payload: bytes):
    response = p2pd_pb2.CallUnaryResponse(response=payload)
    return p2pd_pb2.PersistentConnectionResponse(callId=call_id.bytes, callUnaryResponse=response)


async def read_answers(hardened: bool) -> tuple[asyncio.Task, asyncio.Future]:
    """A cancelled call's answer arrives, then a live call's: what becomes of the reader and the live call."""
    control = ControlClient(None, _initialized_with_create=True)
    if hardened:
        harden_control(control)
    late, live = uuid.uuid4(), uuid.uuid4()
    loop = asyncio.get_running_loop()
    control._pending_calls[late] = loop.create_future()
    control._pending_calls[late].cancel()  # its caller timed out; it is still listed until the caller runs again
    control._pending_calls[live] = loop.create_future()
    reader = asyncio.StreamReader()
    reader.feed_data(framed(answer(late, b"too late")) + framed(answer(live, b"on time")))
    reader.feed_eof()
    task = asyncio.ensure_future(control._read_from_persistent_conn(reader))
    await asyncio.wait([task], timeout=5)
    return task, control._pending_calls[live]


def test_the_reader_survives_the_answer_of_a_cancelled_call():
    task, live = asyncio.run(read_answers(hardened=True))
    assert task.done() and task.exception() is None  # it ended at the end of its input only
    assert live.result() == b"on time"


def test_unhardened_hivemind_loses_its_reader_there():
    """The bug this module works around (if hivemind fixes it, this test says so and the module can go)."""
    task, live = asyncio.run(read_answers(hardened=False))
    assert isinstance(task.exception(), asyncio.InvalidStateError)
    assert not live.done()  # never answered


def test_done_calls_count_as_absent_and_finished_handlers_are_dropped():
    async def run():
        loop = asyncio.get_running_loop()
        calls = PendingCalls(a=loop.create_future(), b=loop.create_future())
        calls["a"].cancel()
        assert "a" not in calls and "b" in calls and "c" not in calls
        tasks = HandlerTasks()
        tasks[1] = asyncio.ensure_future(asyncio.sleep(0))
        await tasks[1]
        tasks[2] = asyncio.ensure_future(asyncio.sleep(10))
        assert list(tasks) == [2]
        tasks[2].cancel()

    asyncio.run(run())
