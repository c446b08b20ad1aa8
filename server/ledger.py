"""The server's side of points: the work it did for each client, the receipts they signed, its points,
and the standing of whoever asks for work (which orders a busy server's queue).

Used from the event loop only. The standing of a requester is the announced points of the server that
vouched for it (a volunteer's client carries a voucher from the volunteer's server), else its own
announced points if it serves too, else zero; the announced points of every server come from the DHT.

What it holds is bounded, so a server can run for weeks: one receipt per client, at most ``MAX_CLIENTS``
(the smallest dropped beyond), and the standings of the servers seen in the DHT within ``STANDING_TTL``.
The work a server does is not counted here: receipts are cumulative, counted by each client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hivemind.utils import get_dht_time

from swarm.errors import InvalidRequestError
from swarm.net.receipts import Receipt, Voucher, newer, points

logger = logging.getLogger(__name__)

MAX_CLIENTS = 100_000  # receipts kept (one per client); the smallest are dropped beyond this
STANDING_TTL = 3600.0  # seconds a server missing from every DHT look-up keeps its last known standing


class Ledger:
    def __init__(self, own_peer_id: str, clock: Callable[[], float] = time.monotonic):
        self.own_peer_id, self.clock = own_peer_id, clock
        self.receipts: dict[str, Receipt] = {}  # client peer id -> its latest receipt (at most MAX_CLIENTS)
        self.standings: dict[str, float] = {}  # server peer id -> points it announces (seen within STANDING_TTL)
        self._seen: dict[str, float] = {}  # server peer id -> when a look-up last returned its points

    def accept(self, receipt: Receipt, sender: str) -> None:
        """Keep ``receipt`` if it is the sender's own, for this server, signed, and newer than the one held."""
        if receipt.client != sender:
            raise InvalidRequestError("a receipt must be signed by the client that sends it")
        if receipt.server != self.own_peer_id:
            raise InvalidRequestError("this receipt is for another server")
        if not receipt.valid():
            raise InvalidRequestError("the receipt's signature does not match its client")
        if newer(self.receipts.get(sender), receipt):
            self.receipts[sender] = receipt
            if len(self.receipts) > MAX_CLIENTS:
                smallest = min(self.receipts, key=lambda client: self.receipts[client].units)
                del self.receipts[smallest]

    @property
    def points(self) -> float:
        return points(self.receipts.values())

    def update_standings(self, announced: dict[str, float]) -> None:
        """The points servers announce (refreshed from the DHT). A server missing from one look-up keeps its
        last known points: a DHT look-up under load can miss records, and a volunteer's standing must not
        flicker to zero because of it; one missing from every look-up for ``STANDING_TTL`` is forgotten."""
        now = self.clock()
        self._seen.update(dict.fromkeys(announced, now))
        self._seen = {peer: seen for peer, seen in self._seen.items() if now - seen <= STANDING_TTL}
        self.standings = {peer: announced.get(peer, self.standings.get(peer, 0.0)) for peer in self._seen}

    def sizes(self) -> dict[str, int]:
        """Entries of its long-lived structures (diagnostics: they must not grow with the work served)."""
        return {"receipts": len(self.receipts), "standings": len(self.standings)}

    def standing(self, sender: str, voucher: Voucher | None, now: float) -> float:
        """How much priority a request from ``sender`` gets at a busy server."""
        if voucher is not None and voucher.valid_for(sender, now):
            return self.standings.get(voucher.issuer, 0.0)
        return self.standings.get(sender, 0.0)

    def request_standing(self, sender: str, request) -> float:
        """The standing of a request (Inference step 0, Forward, Backward) that may carry a ``voucher``."""
        voucher = Voucher.from_proto(request.voucher) if request.HasField("voucher") else None
        return self.standing(sender, voucher, get_dht_time())
