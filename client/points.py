"""The client's side of points: it counts the work each server did for it, signs cumulative receipts
(``swarm.net.receipts``) and hands them to the servers now and then; with its volunteer's server key it
also carries a voucher that lets it use that server's standing at busy servers.

Concurrency: ``add`` may be called from any code on the client's event loop; ``send_due`` runs there too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hivemind.utils import get_dht_time

from proto import pb
from swarm.net.identity import Identity
from swarm.net.receipts import Receipt, Voucher
from swarm.net.rpc import ServerFailure, call_receipt

logger = logging.getLogger(__name__)

VOUCHER_SECONDS = 3600.0  # how long a voucher the client issues itself stays valid
RECEIPT_TIMEOUT = 2.0  # seconds to hand one receipt over
MAX_SERVERS = 4096  # servers the book counts for; beyond, the one that worked for us least recently is forgotten
MAX_MISSES = 3  # receipts in a row a server did not take (unreachable, gone) before the book forgets it


class ReceiptBook:
    def __init__(self, identity: Identity):
        self.identity = identity
        self.epoch = time.time()
        # the three are bounded by MAX_SERVERS; ``work`` is ordered from the least recent server to the most
        self.work: dict[str, int] = {}  # server peer id -> units (tokens x blocks) it computed for us
        self.verified: dict[str, int] = {}  # ... of which we checked this many on another server
        self.sent: dict[str, tuple[int, int]] = {}  # server -> (work, verified) of the last receipt it took
        self.misses: dict[str, int] = {}  # server -> receipts in a row it did not take (< MAX_MISSES)

    def add(self, server: str, units: int, verified: bool = False) -> None:
        self.work[server] = self.work.pop(server, 0) + units
        if verified:
            self.verified[server] = self.verified.get(server, 0) + units
        if len(self.work) > MAX_SERVERS:
            self._forget(next(iter(self.work)))

    def _forget(self, server: str) -> None:
        """Stop counting for ``server``. It keeps the receipt it took; if it works for us again, it counts
        from zero in this epoch, and its new receipts count only once they pass the one it holds."""
        for counts in (self.work, self.verified, self.sent, self.misses):
            counts.pop(server, None)

    def confirm(self, server: str, units: int) -> None:
        """Work already added (``add``) was checked on another server afterwards: count it as verified."""
        if server in self.work:
            self.verified[server] = self.verified.get(server, 0) + units

    def due(self) -> list[Receipt]:
        """Signed receipts for every server that did more for us since its last receipt."""
        receipts = []
        for server, work in self.work.items():
            counts = (work, min(self.verified.get(server, 0), work))
            if self.sent.get(server) != counts:
                receipts.append(Receipt(server, "", self.epoch, *counts).signed(self.identity))
        return receipts

    async def send_due(self, p2p, membership) -> int:
        """Hand out the due receipts; returns how many servers took theirs. A server that misses
        MAX_MISSES in a row is forgotten (``_forget``): no receipt is retried forever."""
        taken = 0
        for receipt in self.due():
            request = pb.ReceiptRequest(receipt=receipt.to_proto(), membership=membership.proof_for(receipt.server))
            try:
                await call_receipt(p2p, receipt.server, request, RECEIPT_TIMEOUT)
            except ServerFailure as failure:
                self._missed(receipt.server, failure.reason)
                continue
            self.sent[receipt.server] = (receipt.work, receipt.verified)
            self.misses.pop(receipt.server, None)
            taken += 1
        return taken

    def _missed(self, server: str, reason: str) -> None:
        misses = self.misses[server] = self.misses.get(server, 0) + 1
        if misses < MAX_MISSES:
            logger.debug("Could not hand a receipt to %s (%d in a row): %s", server, misses, reason)
            return
        logger.info("Dropping the receipt for %s: it took none of the last %d (%s)", server, misses, reason)
        self._forget(server)


class VoucherSource:
    """Vouchers from the volunteer's server key (``points_key``) for this client's peer id, renewed in time."""

    def __init__(self, key_path: str | None, holder: str):
        self.issuer = Identity(Path(key_path).expanduser()) if key_path else None
        self.holder = holder
        self._voucher: Voucher | None = None

    def current(self) -> pb.Voucher | None:
        if self.issuer is None:
            return None
        now = get_dht_time()
        if self._voucher is None or self._voucher.expires_at - now < VOUCHER_SECONDS / 2:
            self._voucher = Voucher.issue(self.issuer, self.holder, now + VOUCHER_SECONDS)
        return self._voucher.to_proto()
