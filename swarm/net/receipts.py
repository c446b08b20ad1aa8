"""Points for volunteers: receipts that clients sign for the work servers did for them, and vouchers that
let a volunteer's client use the standing of the volunteer's server.

- A ``Receipt`` is cumulative and signed by the client's libp2p identity: "server S did W units of work
  for me, client C, in my epoch E (V of them I checked on another server)". A unit is one token through
  one block (``work_units``; a backward pass counts twice: it recomputes the forward pass, then goes
  back). A server keeps the latest receipt of each client; its points are ``points(receipts)``.
- A ``Voucher`` is signed by a server's identity: "client C may use my standing until time T". A client
  started with its volunteer's server key (``--points-key``) sends one with its requests; a busy server
  serves requests in the order of their standing (the voucher issuer's announced points).

What points prove, and what they do not (README, "Points"): a receipt proves that the identity that
signed it acknowledged that work; it does not prove the identity is a distinct person. Colluding or
made-up identities can mint receipts. The design bounds what that buys: each client identity counts
for at most ``CLIENT_CAP`` units, so minting takes ever more identities; points only order work that
is waiting at a busy server (nobody is refused or preempted for them); and every receipt is signed, so
a server's claim can be checked against the receipts it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from proto import pb
from swarm.net.identity import Identity, verify

CLIENT_CAP = 50_000_000  # units (tokens x blocks) one client identity may contribute to a server's points
VERIFIED_WEIGHT = 2.0  # a unit the client checked on another server counts this much
POINTS_PER_UNIT = 1e-3  # points are shown in thousands of units


def work_units(shape: tuple[int, ...], blocks, backward: bool = False) -> int:
    """Units of work for a [batch, tokens, ...] input through ``blocks`` (anything with a length)."""
    return shape[0] * shape[1] * len(blocks) * (2 if backward else 1)


@dataclasses.dataclass(frozen=True)
class Receipt:
    server: str  # peer id of the server that did the work
    client: str  # peer id of the client that signs
    epoch: float  # when the client's counting began (a new epoch starts from zero)
    work: int  # units received from the server in this epoch
    verified: int = 0  # of which the client checked this many on another server
    public_key: bytes = b""
    signature: bytes = b""

    def to_proto(self) -> pb.Receipt:
        return pb.Receipt(
            server_peer_id=self.server,
            client_peer_id=self.client,
            epoch=self.epoch,
            work=self.work,
            verified_work=self.verified,
            public_key=self.public_key,
            signature=self.signature,
        )

    @classmethod
    def from_proto(cls, message: pb.Receipt) -> Receipt:
        return cls(
            message.server_peer_id,
            message.client_peer_id,
            message.epoch,
            message.work,
            message.verified_work,
            message.public_key,
            message.signature,
        )

    def _content(self) -> bytes:
        return dataclasses.replace(self, signature=b"").to_proto().SerializeToString(deterministic=True)

    def signed(self, identity: Identity) -> Receipt:
        unsigned = dataclasses.replace(self, client=identity.peer_id, public_key=identity.public_key, signature=b"")
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned._content()))

    def valid(self) -> bool:
        """Signed by the client it names, and self-consistent."""
        return 0 <= self.verified <= self.work and verify(self.public_key, self.client, self._content(), self.signature)

    @property
    def units(self) -> float:
        """What this receipt adds to the server's points, before scaling."""
        return min(self.work + (VERIFIED_WEIGHT - 1.0) * self.verified, CLIENT_CAP)


def points(receipts: Iterable[Receipt]) -> float:
    """A server's points from the latest receipt of each of its clients."""
    return POINTS_PER_UNIT * sum(receipt.units for receipt in receipts)


def newer(held: Receipt | None, candidate: Receipt) -> bool:
    """Whether ``candidate`` replaces ``held`` (same client): a later epoch, or more work in the same one."""
    if held is None:
        return True
    return (candidate.epoch, candidate.work, candidate.verified) > (held.epoch, held.work, held.verified)


@dataclasses.dataclass(frozen=True)
class Voucher:
    issuer: str  # peer id of the volunteer's server, whose standing the holder uses
    holder: str  # peer id of the client that carries it
    expires_at: float  # DHT time
    public_key: bytes = b""
    signature: bytes = b""

    def to_proto(self) -> pb.Voucher:
        return pb.Voucher(
            issuer_peer_id=self.issuer,
            holder_peer_id=self.holder,
            expires_at=self.expires_at,
            public_key=self.public_key,
            signature=self.signature,
        )

    @classmethod
    def from_proto(cls, message: pb.Voucher) -> Voucher:
        return cls(
            message.issuer_peer_id, message.holder_peer_id, message.expires_at, message.public_key, message.signature
        )

    def _content(self) -> bytes:
        return dataclasses.replace(self, signature=b"").to_proto().SerializeToString(deterministic=True)

    @classmethod
    def issue(cls, issuer: Identity, holder: str, expires_at: float) -> Voucher:
        unsigned = cls(issuer.peer_id, holder, expires_at, issuer.public_key)
        return dataclasses.replace(unsigned, signature=issuer.sign(unsigned._content()))

    def valid_for(self, sender: str, now: float) -> bool:
        """Carried by the client it names, not expired, and signed by its issuer."""
        return (
            self.holder == sender
            and now < self.expires_at
            and verify(self.public_key, self.issuer, self._content(), self.signature)
        )
