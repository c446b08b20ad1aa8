"""The per-server request envelope: what every request to one server carries, filled in one place.

Inference sessions (``client.hop``) and stateless passes (``client.passes``) both send a server its
tensors in the dtype it computes in (servers convert any float dtype on arrival, so this only saves
bytes and keeps a server's arithmetic its own), the activation compression agreed with it, the proof
of membership of a private swarm made for that server, and the voucher of the client's standing.
Built once per request or session from what the client knows now; no network, no locks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from proto import pb
from swarm.net import tensors

if TYPE_CHECKING:
    from client.handle import ClientHandle


@dataclass(frozen=True)
class Envelope:
    dtype: torch.dtype  # the server's compute dtype: float tensors travel in it
    compression: int = pb.COMPRESSION_NONE  # how hidden states travel to and from the server (pb.Compression)
    membership: bytes = b""  # private swarms: proof for this server that the client holds the swarm key
    voucher: pb.Voucher | None = None  # points: the standing this client may use

    @classmethod
    def for_server(cls, client: ClientHandle, peer_id: str) -> Envelope:
        return cls(
            client.server_dtype(peer_id),
            client.compression_for(peer_id),
            client.membership.proof_for(peer_id),
            client.vouchers.current(),
        )

    def hidden(self, value: torch.Tensor) -> pb.Tensor:
        """Hidden states for the server: in its dtype, compressed as agreed."""
        return tensors.to_proto(value.to(self.dtype), self.compression)

    def exact(self, value: torch.Tensor) -> pb.Tensor:
        """A float tensor sent uncompressed in the server's dtype (deep prompts, gradients)."""
        return tensors.to_proto(value.to(self.dtype))

    def credentials(self, message) -> None:
        """Membership proof and voucher, on a message that opens a session or runs a pass."""
        message.membership = self.membership
        if self.voucher is not None:
            message.voucher.CopyFrom(self.voucher)
