"""Server records: what each server announces in the DHT, as a dataclass and as DHT bytes."""

from __future__ import annotations

import dataclasses
import enum
import functools

from google.protobuf.message import DecodeError

from proto import pb
from swarm.net.identity import Identity, verify
from swarm.spans import BlockRange


class ServerState(enum.IntEnum):
    JOINING = pb.JOINING
    ONLINE = pb.ONLINE
    OFFLINE = pb.OFFLINE


@dataclasses.dataclass(frozen=True)
class PeerUsage:
    """One peer's use of a server (``ServerInfo.usage``)."""

    peer_id: str
    served: int  # rows x tokens x blocks run for it
    queued: int = 0  # its work items waiting at announcement time


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """One server's announcement. ``span`` is the whole range it hosts."""

    peer_id: str
    state: ServerState
    span: BlockRange
    throughput: float = 0.0  # inference: single-token steps per second through ONE block (batch 1)
    dtype: str = "float32"
    cache_tokens_left: int = 0  # free KV budget in tokens (batch x length summed over sessions)
    version: str = ""
    public_name: str = ""
    model: str = ""
    maddrs: tuple[str, ...] = ()
    hidden_size: int = 0
    max_request_tokens: int = 0
    forward_throughput: float = 0.0  # batched forward: tokens per second through ONE block
    next_pings: dict[str, float] = dataclasses.field(default_factory=dict)  # peer id -> round trip, seconds
    announced_at: float = 0.0  # DHT time of the announcement; a peer's newest record wins (e.g. after a move)
    expires_at: float = 0.0  # DHT time the announcement may be kept until (signed: replays cannot extend it)
    points: float = 0.0  # the sum of the receipts its clients signed (``swarm.net.receipts``)
    compressions: tuple[int, ...] = ()  # activation compressions (``pb.Compression``) it reads and sends
    public_key: bytes = b""  # the server's libp2p public key; peer_id is its hash
    signature: bytes = b""  # by that key over the record serialized with an empty signature
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters the server has loaded (--adapters)
    fair_share: bool = False  # it shares its compute fairly between peers (--fair-share)
    usage: tuple[PeerUsage, ...] = ()  # the peers it served most

    def to_proto(self) -> pb.ServerRecord:
        return pb.ServerRecord(
            peer_id=self.peer_id,
            state=int(self.state),
            start_block=self.span.start,
            end_block=self.span.end,
            throughput=self.throughput,
            dtype=self.dtype,
            cache_tokens_left=self.cache_tokens_left,
            version=self.version,
            public_name=self.public_name,
            model=self.model,
            maddrs=list(self.maddrs),
            hidden_size=self.hidden_size,
            max_request_tokens=self.max_request_tokens,
            forward_throughput=self.forward_throughput,
            next_pings=dict(self.next_pings),
            announced_at=self.announced_at,
            public_key=self.public_key,
            signature=self.signature,
            expires_at=self.expires_at,
            points=self.points,
            compressions=list(self.compressions),
            adapters=list(self.adapters),
            fair_share=self.fair_share,
            usage=[pb.PeerUsage(peer_id=u.peer_id, served=u.served, queued=u.queued) for u in self.usage],
        )

    @classmethod
    def from_proto(cls, record: pb.ServerRecord) -> ServerInfo:
        return cls(
            peer_id=record.peer_id,
            state=ServerState(record.state),
            span=BlockRange(record.start_block, record.end_block),
            throughput=record.throughput,
            dtype=record.dtype,
            cache_tokens_left=record.cache_tokens_left,
            version=record.version,
            public_name=record.public_name,
            model=record.model,
            maddrs=tuple(record.maddrs),
            hidden_size=record.hidden_size,
            max_request_tokens=record.max_request_tokens,
            forward_throughput=record.forward_throughput,
            next_pings=dict(record.next_pings),
            announced_at=record.announced_at,
            public_key=record.public_key,
            signature=record.signature,
            expires_at=record.expires_at,
            points=record.points,
            compressions=tuple(record.compressions),
            adapters=tuple(record.adapters),
            fair_share=record.fair_share,
            usage=tuple(PeerUsage(u.peer_id, u.served, u.queued) for u in record.usage),
        )

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString(deterministic=True)

    def _signed_content(self) -> bytes:
        return dataclasses.replace(self, signature=b"").to_bytes()

    def signed(self, identity: Identity) -> ServerInfo:
        """This record, signed by ``identity`` (which must be the record's own peer)."""
        if identity.peer_id != self.peer_id:
            raise ValueError(f"identity {identity.peer_id} cannot sign a record of {self.peer_id}")
        unsigned = dataclasses.replace(self, public_key=identity.public_key, signature=b"")
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.to_bytes()))

    def verified(self) -> bool:
        """True if the record was signed by the key its peer id belongs to (so nobody else made it)."""
        return verify(self.public_key, self.peer_id, self._signed_content(), self.signature)

    @classmethod
    def from_bytes(cls, data: object) -> ServerInfo | None:
        """Parse a DHT value; None for anything that is not a well-formed record (never raises)."""
        if not isinstance(data, bytes):
            return None
        try:
            record = pb.ServerRecord.FromString(data)
            return cls.from_proto(record)
        except (DecodeError, ValueError):
            return None


SIGNED_MEMORY = 1024  # distinct record bytes whose parse and signature check are remembered


def signed_record(data: object) -> ServerInfo | None:
    """The record in DHT value ``data`` if it is well-formed and signed by the key its peer id belongs to,
    else None (never raises). A server's record arrives as the same bytes under each of its blocks' keys,
    from every DHT node asked, at every look-up until it announces again, and a signature check costs far
    more than a dictionary look-up: the outcome for the last ``SIGNED_MEMORY`` distinct values is kept."""
    return _signed_record(data) if isinstance(data, bytes) else None


@functools.lru_cache(maxsize=SIGNED_MEMORY)
def _signed_record(data: bytes) -> ServerInfo | None:
    info = ServerInfo.from_bytes(data)
    return info if info is not None and info.verified() else None
