"""The pusher keeps a bounded number of streams to next servers, however many it ever pushed to."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import PeerID

from proto import pb
from server import push


class FakeWriter:
    def __init__(self):
        self.closed = False

    def write(self, data) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeP2P:
    """Opens a stream to anyone (what a swarm of ever-new next servers looks like to a pusher)."""

    def __init__(self):
        self.writers: list[FakeWriter] = []

    async def call_binary_stream_handler(self, peer_id, name):
        self.writers.append(FakeWriter())
        return None, None, self.writers[-1]


@pytest.mark.timeout(30)
def test_push_streams_to_ever_new_servers_stay_bounded(monkeypatch):
    monkeypatch.setattr(push, "MAX_WRITERS", 4)
    peers = [PeerID(bytes([0, 3, index, index, index])).to_base58() for index in range(10)]
    p2p = FakeP2P()
    pusher = push.Pusher(p2p)

    async def push_to_all() -> list[bool]:
        return [await pusher.push(peer, pb.PushRequest(session_id="s", position=0)) for peer in peers]

    assert all(asyncio.run(push_to_all()))
    assert pusher.sizes()["push_writers"] == 4
    assert [writer.closed for writer in p2p.writers] == [True] * 6 + [False] * 4  # the oldest were closed
