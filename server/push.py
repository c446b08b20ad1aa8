"""Pusher: hands a step's output straight to the next server of a chain (one stream per next server).

Best effort: a push that cannot be written is reported as not pushed, and the client relays the
output itself. The receiving side is ``Handler.rpc_push``, which hands pushes to ``server.mailbox``.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P, PeerID

from proto import pb, rpc_name

logger = logging.getLogger(__name__)

MAX_IDLE_LOCKS = 1024  # locks kept for peers we have no stream to (clients may name any peer id)
MAX_WRITERS = 64  # open push streams; beyond, the least recently opened idle one is closed (reopened on demand)


class Pusher:
    def __init__(self, p2p: P2P, connect_timeout: float = 1.0, drop_all: bool = False, membership=None):
        self.membership = membership  # private swarms: a proof for the receiving server rides on each push
        self.p2p, self.connect_timeout = p2p, connect_timeout
        self.drop_all = drop_all  # test only: pretend every push fails, to exercise the client's fallback
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def push(self, peer_id: str, message: pb.PushRequest) -> bool:
        if self.drop_all:
            return False
        if len(self._locks) > MAX_IDLE_LOCKS:
            self._forget_idle()
        lock = self._locks.setdefault(peer_id, asyncio.Lock())
        async with lock:  # one writer per peer; messages must not interleave
            try:
                writer = self._writers.get(peer_id) or await self._open(peer_id)
                if self.membership is not None:
                    message.membership = self.membership.proof_for(peer_id)
                await P2P.send_protobuf(message, writer)
                return True
            except Exception as exc:
                logger.info("Push to %s failed (%r); the client will relay", peer_id, exc)
                stale = self._writers.pop(peer_id, None)
                if stale is not None:
                    stale.close()
                return False

    def _forget_idle(self) -> None:
        """Drop the locks of peers we hold no stream to and nobody is pushing to right now."""
        for peer_id, lock in list(self._locks.items()):
            if peer_id not in self._writers and not lock.locked():
                del self._locks[peer_id]

    def sizes(self) -> dict[str, int]:
        """Entries of its long-lived structures (diagnostics: they must not grow with the work served)."""
        return {"push_writers": len(self._writers), "push_locks": len(self._locks)}

    async def _open(self, peer_id: str) -> asyncio.StreamWriter:
        idle = [peer for peer in self._writers if not self._locks[peer].locked()]
        if len(self._writers) >= MAX_WRITERS and idle:
            self._writers.pop(idle[0]).close()
        _, _, writer = await asyncio.wait_for(
            self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), rpc_name("Push")), self.connect_timeout
        )
        self._writers[peer_id] = writer
        return writer

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
