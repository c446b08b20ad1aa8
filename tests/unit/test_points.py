"""Points: signed cumulative receipts, vouchers, a server's ledger and the standing of requesters."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from client import points as client_points
from server.ledger import STANDING_TTL, Ledger
from swarm.errors import InvalidRequestError
from swarm.net.identity import Identity
from swarm.net.receipts import CLIENT_CAP, POINTS_PER_UNIT, VERIFIED_WEIGHT, Receipt, Voucher, newer, points
from swarm.net.rpc import ServerFailure

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    return [Identity.load_or_create(root / f"{name}.key") for name in ("client", "server", "other")]


def test_a_receipt_is_signed_by_its_client_and_tampering_shows(identities):
    client, server, other = identities
    receipt = Receipt(server.peer_id, "", 1.0, work=120, verified=20).signed(client)
    assert receipt.client == client.peer_id and receipt.valid()
    assert Receipt.from_proto(receipt.to_proto()) == receipt
    for forged in (
        dataclasses.replace(receipt, work=1200),  # inflated after signing
        dataclasses.replace(receipt, server=other.peer_id),  # moved to another server
        dataclasses.replace(receipt, client=other.peer_id),  # claimed by someone else
        dataclasses.replace(receipt, verified=121),  # more verified than received
    ):
        assert not forged.valid()


def test_points_count_each_client_up_to_a_cap_and_verified_work_more(identities):
    client, server, _ = identities
    small = Receipt(server.peer_id, "", 1.0, work=1000, verified=500).signed(client)
    assert points([small]) == pytest.approx(POINTS_PER_UNIT * (1000 + (VERIFIED_WEIGHT - 1) * 500))
    huge = Receipt(server.peer_id, "", 1.0, work=10 * CLIENT_CAP).signed(client)
    assert points([huge]) == pytest.approx(POINTS_PER_UNIT * CLIENT_CAP)


def test_the_latest_receipt_of_a_client_replaces_older_ones(identities):
    client, server, _ = identities
    old = Receipt(server.peer_id, "", 1.0, work=10).signed(client)
    assert newer(None, old)
    assert newer(old, dataclasses.replace(old, work=11))
    assert not newer(old, dataclasses.replace(old, work=9))  # a replayed older receipt changes nothing
    assert newer(old, dataclasses.replace(old, epoch=2.0, work=1))  # the client started counting again


def test_the_ledger_keeps_only_valid_receipts_meant_for_it(identities):
    client, server, other = identities
    ledger = Ledger(server.peer_id)
    receipt = Receipt(server.peer_id, "", 1.0, work=3000).signed(client)
    with pytest.raises(InvalidRequestError, match="signed by the client that sends it"):
        ledger.accept(receipt, sender=other.peer_id)
    with pytest.raises(InvalidRequestError, match="another server"):
        Ledger(other.peer_id).accept(receipt, sender=client.peer_id)
    with pytest.raises(InvalidRequestError, match="signature"):
        ledger.accept(dataclasses.replace(receipt, work=9000), sender=client.peer_id)
    ledger.accept(receipt, sender=client.peer_id)
    ledger.accept(dataclasses.replace(receipt, work=10).signed(client), sender=client.peer_id)  # older: ignored
    assert ledger.points == pytest.approx(3.0)


def test_a_voucher_lends_its_issuers_standing_to_its_holder_only(identities):
    client, server, other = identities
    ledger = Ledger(other.peer_id)
    ledger.update_standings({server.peer_id: 42.0, client.peer_id: 1.0})
    voucher = Voucher.issue(server, client.peer_id, expires_at=100.0)
    assert Voucher.from_proto(voucher.to_proto()) == voucher
    assert ledger.standing(client.peer_id, voucher, now=50.0) == 42.0
    assert ledger.standing(client.peer_id, voucher, now=150.0) == 1.0  # expired: its own standing
    assert ledger.standing(other.peer_id, voucher, now=50.0) == 0.0  # someone else's voucher
    forged = dataclasses.replace(voucher, expires_at=1e12)
    assert ledger.standing(client.peer_id, forged, now=50.0) == 1.0
    assert ledger.standing(client.peer_id, None, now=50.0) == 1.0


def test_a_look_up_that_misses_a_server_keeps_its_standing(identities):
    client, server, other = identities
    ledger = Ledger(other.peer_id)
    ledger.update_standings({server.peer_id: 42.0})
    ledger.update_standings({client.peer_id: 1.0})  # this look-up did not return the server's record
    assert ledger.standing(server.peer_id, None, now=0.0) == 42.0
    ledger.update_standings({server.peer_id: 50.0})
    assert ledger.standing(server.peer_id, None, now=0.0) == 50.0


def test_a_server_missing_from_look_ups_for_long_is_forgotten(identities):
    client, server, other = identities
    now = [0.0]
    ledger = Ledger(other.peer_id, clock=lambda: now[0])
    ledger.update_standings({server.peer_id: 42.0})
    now[0] = STANDING_TTL / 2
    ledger.update_standings({client.peer_id: 1.0})
    assert ledger.standing(server.peer_id, None, now=0.0) == 42.0
    now[0] = STANDING_TTL + 1.0  # the server left the swarm an hour ago: a long-running server forgets it
    ledger.update_standings({client.peer_id: 2.0})
    assert ledger.standings == {client.peer_id: 2.0}
    assert ledger.sizes() == {"receipts": 0, "standings": 1}


def test_a_client_counts_for_a_bounded_number_of_servers(monkeypatch):
    monkeypatch.setattr(client_points, "MAX_SERVERS", 3)
    book = client_points.ReceiptBook.__new__(client_points.ReceiptBook)
    book.work, book.verified, book.sent, book.misses = {}, {}, {}, {}
    for server in ("a", "b", "c", "a", "d"):  # "b" worked for us least recently when "d" came
        book.add(server, 10, verified=True)
    book.sent["d"] = (10, 10)
    assert book.work == {"c": 10, "a": 20, "d": 10} and set(book.verified) == {"c", "a", "d"}
    book.confirm("b", 5)  # a late confirmation for a forgotten server adds nothing back
    assert "b" not in book.verified


class NoMembership:
    def proof_for(self, server):
        return b""


def test_receipts_to_a_server_that_stays_unreachable_are_dropped_after_a_few_tries(identities, monkeypatch):
    calls = []

    async def call_receipt(p2p, server, request, timeout):
        calls.append(server)
        if server == "gone":
            raise ServerFailure(server, "unreachable")

    monkeypatch.setattr(client_points, "call_receipt", call_receipt)
    book = client_points.ReceiptBook(identities[0])
    book.add("gone", 10)
    book.add("here", 10)
    for _ in range(client_points.MAX_MISSES + 2):
        book.add("here", 1)  # something due for the live server at every round
        asyncio.run(book.send_due(None, NoMembership()))
    assert calls.count("gone") == client_points.MAX_MISSES  # then never again
    assert calls.count("here") == client_points.MAX_MISSES + 2
    assert "gone" not in book.work and "gone" not in book.misses
    book.add("gone", 5)  # it works for us again: counted afresh, and handed receipts again
    asyncio.run(book.send_due(None, NoMembership()))
    assert calls.count("gone") == client_points.MAX_MISSES + 1
