"""The door of a private swarm's server: every RPC must carry a proof that its sender holds the key."""

from __future__ import annotations

from swarm.errors import NotAMemberError
from swarm.net.membership import check_rpc_proof


class Gate:
    def __init__(self, key: bytes | None, own_peer_id: str):
        self.key, self.own_peer_id = key, own_peer_id

    def check(self, sender: str, proof: bytes) -> None:
        """Raise NotAMemberError unless this is a public swarm or ``proof`` is the sender's valid proof."""
        if self.key is not None and not check_rpc_proof(self.key, sender, self.own_peer_id, proof):
            raise NotAMemberError(
                "not a member of this private swarm: the request carries no valid proof of the swarm key "
                "(start the client or server with the swarm's --swarm-key)"
            )
