"""Tests for swarm.net.records (ServerInfo <-> DHT bytes) and swarm.net.dht.parse_records (DHT values -> records)."""

from __future__ import annotations

import random

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from proto import pb
from swarm.net.dht import SignedRecordValidator, parse_records
from swarm.net.identity import Identity
from swarm.net.records import ServerInfo, ServerState
from swarm.spans import BlockRange, block_key

pytestmark = pytest.mark.timeout(30)

PREFIX = "tiny-model"


_IDENTITIES: dict[str, Identity] = {}


def identity(name: str) -> Identity:
    """A real libp2p identity per test name (so records can be signed as real servers sign them)."""
    if name not in _IDENTITIES:
        _IDENTITIES[name] = Identity.load_or_create(None)
        _IDENTITIES[name].path.unlink()
    return _IDENTITIES[name]


def pid(name: str) -> str:
    return identity(name).peer_id


def info(peer: str, start: int, end: int, state: ServerState = ServerState.ONLINE, **kwargs) -> ServerInfo:
    """A record of the named server, signed by that server (valid until DHT time 1000 unless told)."""
    kwargs.setdefault("expires_at", 1000.0)
    return ServerInfo(pid(peer), state, BlockRange(start, end), **kwargs).signed(identity(peer))


def test_round_trip_keeps_every_field():
    original = ServerInfo(
        peer_id="12D3KooWexample",
        state=ServerState.JOINING,
        span=BlockRange(3, 9),
        throughput=123.5,
        dtype="bfloat16",
        cache_tokens_left=4096,
        version="0.1.0",
        public_name="alice's box",
        model="SmolLM2-135M-Instruct",
        maddrs=("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWexample", "/ip4/10.0.0.1/tcp/4001"),
        hidden_size=576,
        max_request_tokens=8192,
    )
    data = original.to_bytes()
    assert isinstance(data, bytes)
    assert ServerInfo.from_bytes(data) == original
    assert ServerInfo.from_proto(original.to_proto()) == original


@pytest.mark.parametrize("state", list(ServerState))
def test_round_trip_every_state(state):
    original = info("peer", 0, 1, state)
    assert ServerInfo.from_bytes(original.to_bytes()) == original


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "a string",
        {"peer_id": "x"},
        bytearray(info("peer", 0, 1).to_bytes()),  # only real bytes are DHT record values
        b"",  # an empty record: no state, empty span
        b"\xff\xff\xff\xff",
        b"garbage that is not a protobuf message \x00\x01",
        pb.ServerRecord(peer_id="p", state=pb.ONLINE, start_block=4, end_block=4).SerializeToString(),
        pb.ServerRecord(peer_id="p", state=pb.ONLINE, start_block=5, end_block=2).SerializeToString(),
        pb.ServerRecord(peer_id="p", state=pb.SERVER_STATE_UNSPECIFIED, end_block=2).SerializeToString(),
        pb.ServerRecord(peer_id="p", state=pb.ONLINE, end_block=2).SerializeToString() + b"\x0a\xff",  # truncated
    ],
)
def test_from_bytes_returns_none_for_anything_malformed(value):
    assert ServerInfo.from_bytes(value) is None


def test_from_bytes_never_raises_on_random_bytes():
    rng = random.Random(0)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        result = ServerInfo.from_bytes(data)
        assert result is None or isinstance(result, ServerInfo)


def raw_store(*entries: tuple[int, str, bytes | object, float]) -> dict[str, dict[str, tuple[object, float]]]:
    """(block, subkey, value, expiration) -> the dict shape SwarmDHT gets from hivemind."""
    raw: dict[str, dict[str, tuple[object, float]]] = {}
    for block, subkey, value, expiration in entries:
        raw.setdefault(block_key(PREFIX, block), {})[subkey] = (value, expiration)
    return raw


def announce(record: ServerInfo, expiration: float = 100.0) -> list[tuple[int, str, bytes, float]]:
    """The entries a server stores: its record under every block it hosts."""
    return [(b, record.peer_id, record.to_bytes(), expiration) for b in range(record.span.start, record.span.end)]


def test_parse_records_keeps_well_formed_records_once_per_peer():
    a, b = info("a", 0, 2), info("b", 1, 4)
    found = parse_records(PREFIX, 4, raw_store(*announce(a), *announce(b)))
    assert sorted(found, key=lambda s: s.peer_id) == sorted([a, b], key=lambda s: s.peer_id)


def test_parse_records_drops_a_record_stored_under_a_block_outside_its_span():
    liar = info("liar", 0, 2)
    assert parse_records(PREFIX, 4, raw_store((3, pid("liar"), liar.to_bytes(), 100.0))) == []


def test_parse_records_drops_a_record_whose_peer_id_is_not_its_subkey():
    impostor = info("victim", 0, 2)
    assert parse_records(PREFIX, 4, raw_store((0, pid("impostor"), impostor.to_bytes(), 100.0))) == []


def test_parse_records_drops_spans_beyond_the_model():
    too_long = info("long", 0, 6)
    assert parse_records(PREFIX, 4, raw_store(*announce(too_long)[:4])) == []


def test_parse_records_drops_garbage_and_other_prefixes():
    good = info("good", 0, 1)
    raw = raw_store((0, "junk", b"\xff\x00junk", 100.0), (0, "none", None, 100.0), *announce(good))
    raw[block_key("other-model", 0)] = {"x": (info("x", 0, 1).to_bytes(), 100.0)}
    assert parse_records(PREFIX, 2, raw) == [good]


def test_parse_records_keeps_the_freshest_record_per_peer():
    old = info("a", 0, 2, throughput=1.0)
    new = info("a", 0, 3, state=ServerState.OFFLINE, throughput=2.0)
    raw = raw_store((0, pid("a"), old.to_bytes(), 10.0), (1, pid("a"), new.to_bytes(), 20.0))
    assert parse_records(PREFIX, 4, raw) == [new]
    raw = raw_store((0, pid("a"), new.to_bytes(), 20.0), (1, pid("a"), old.to_bytes(), 10.0))
    assert parse_records(PREFIX, 4, raw) == [new]


def test_parse_records_drops_unsigned_records():
    unsigned = ServerInfo(pid("a"), ServerState.ONLINE, BlockRange(0, 2))
    assert parse_records(PREFIX, 4, raw_store(*announce(unsigned))) == []


def test_parse_records_drops_a_record_forged_for_another_peer():
    """The attacker signs a record naming the victim: the key does not hash to the victim's peer id."""
    forged = ServerInfo(pid("victim"), ServerState.OFFLINE, BlockRange(0, 2))
    with pytest.raises(ValueError):
        forged.signed(identity("attacker"))  # our own code refuses to sign for someone else...
    unsigned = forged.signed(identity("victim"))
    stolen_key = ServerInfo(**{**unsigned.__dict__, "public_key": identity("attacker").public_key})
    resigned = ServerInfo(**{**stolen_key.__dict__, "signature": identity("attacker").sign(b"whatever")})
    for record in (stolen_key, resigned):  # ...and records made by hand do not verify
        assert parse_records(PREFIX, 4, raw_store(*announce(record))) == []


def test_parse_records_drops_a_tampered_record():
    honest = info("a", 0, 2, throughput=1.0)
    tampered = ServerInfo(**{**honest.__dict__, "throughput": 1e9})
    assert not tampered.verified() and honest.verified()
    assert parse_records(PREFIX, 4, raw_store(*announce(tampered))) == []


def test_parse_records_drops_a_record_kept_longer_than_signed_for():
    """A replayed record stored with a later expiration than its signed one is ignored."""
    honest = info("a", 0, 2, expires_at=50.0)
    assert parse_records(PREFIX, 4, raw_store(*announce(honest, expiration=50.0))) == [honest]
    assert parse_records(PREFIX, 4, raw_store(*announce(honest, expiration=500.0))) == []


def test_dht_validator_rejects_what_parse_records_would_drop():
    """The same rules run inside every DHT node, so forged records are never even stored."""
    validator = SignedRecordValidator()

    def record(subkey, value, expiration=50.0):
        dumps = MSGPackSerializer.dumps
        return DHTRecord(b"key-id", dumps(subkey), dumps(value), expiration)

    honest = info("a", 0, 2, expires_at=50.0)
    assert validator.validate(record(pid("a"), honest.to_bytes()))
    assert not validator.validate(record(pid("b"), honest.to_bytes()))  # under someone else's peer id
    assert not validator.validate(record(pid("a"), honest.to_bytes(), expiration=60.0))  # prolonged
    unsigned = ServerInfo(pid("a"), ServerState.OFFLINE, BlockRange(0, 2), expires_at=50.0)
    assert not validator.validate(record(pid("a"), unsigned.to_bytes()))
    assert not validator.validate(record(pid("a"), b"junk"))
    assert validator.validate(record("not-a-peer-subkey", b"anything"))  # other uses of the DHT are not ours
