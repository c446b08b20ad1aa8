"""What sessions, chains, verification and stateless passes need of the client: ``ClientHandle``.

``client.swarmclient.SwarmClient`` is the one implementation; the modules that use it see only this protocol,
so none of them imports ``swarmclient`` (which imports them) and the client's imports stay acyclic.

Concurrency: as ``SwarmClient``: coroutines run on the client's event loop (``loop``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from client.config import ClientConfig
from client.loop import LoopThread
from client.points import ReceiptBook, VoucherSource
from client.sequence import RouteManager
from client.verdicts import VerifyStats
from swarm.models.adapters import LoraAdapter
from swarm.net.membership import Membership
from swarm.spans import BlockRange


class Referee(Protocol):
    """The client's own computation of a span (``client.referee.LocalReferee``); ``steps`` are a session's
    ``client.hop.StepInput`` (not imported here: ``client.hop`` sits above this module)."""

    def can_run(self, steps: list[Any], adapter: LoraAdapter | str | None) -> bool:
        """Whether it can recompute these steps with this adapter."""

    def run(self, span: BlockRange, steps: list[Any], adapter: LoraAdapter | None = None) -> torch.Tensor:
        """The span's output of the last of ``steps``, given all of them and the session's LoRA weights
        (blocking: run it off the loop)."""


class ClientHandle(Protocol):
    config: ClientConfig
    loop: LoopThread  # the event loop that owns libp2p
    p2p: object  # the libp2p handle (hivemind's P2P) on that loop
    routes: RouteManager
    membership: Membership  # private swarms: proofs for the servers
    vouchers: VoucherSource  # points: the standing this client uses
    receipts: ReceiptBook  # points: the work servers did for this client
    verification: VerifyStats  # what verification checked and found
    referee: Referee | None  # the client's own computation of disputed spans, if it can
    local: Any  # private mode: the blocks the client computes itself (``client.private.LocalBlocks``), or None

    async def measure_pings(self, span: BlockRange | None = None, limit: int = 32) -> None:
        """Measure round trips to the candidate servers of ``span`` whose ping is unknown or stale."""

    def server_dtype(self, peer_id: str) -> torch.dtype:
        """The dtype a server computes in (float32 if unknown)."""

    def compression_for(self, peer_id: str) -> int:
        """The activation compression to use with a server."""
