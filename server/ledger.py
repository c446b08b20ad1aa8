"""The server's side of points: the work it did for each client, the receipts they signed, its points,
and the standing of whoever asks for work (which orders a busy server's queue).

Used from the event loop only. The standing of a requester is the announced points of the server that
vouched for it (a volunteer's client carries a voucher from the volunteer's server), else its own
announced points if it serves too, else zero; the announced points of every server come from the DHT.
"""

from __future__ import annotations

import logging

from hivemind.utils import get_dht_time

from swarm.errors import InvalidRequestError
from swarm.receipts import Receipt, Voucher, newer, points

logger = logging.getLogger(__name__)

MAX_CLIENTS = 100_000  # receipts kept (one per client); the smallest are dropped beyond this


class Ledger:
    def __init__(self, own_peer_id: str):
        self.own_peer_id = own_peer_id
        self.done: dict[str, int] = {}  # client peer id -> units (tokens x blocks) this server computed for it
        self.receipts: dict[str, Receipt] = {}  # client peer id -> its latest receipt
        self.standings: dict[str, float] = {}  # server peer id -> points it announces

    def record_work(self, client: str, units: int) -> None:
        self.done[client] = self.done.get(client, 0) + units

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
        flicker to zero because of it."""
        self.standings = {**self.standings, **announced}

    def standing(self, sender: str, voucher: Voucher | None, now: float) -> float:
        """How much priority a request from ``sender`` gets at a busy server."""
        if voucher is not None and voucher.valid_for(sender, now):
            return self.standings.get(voucher.issuer, 0.0)
        return self.standings.get(sender, 0.0)

    def request_standing(self, sender: str, request) -> float:
        """The standing of a request (Inference step 0, Forward, Backward) that may carry a ``voucher``."""
        voucher = Voucher.from_proto(request.voucher) if request.HasField("voucher") else None
        return self.standing(sender, voucher, get_dht_time())
