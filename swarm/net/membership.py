"""Private swarms: a shared secret (the swarm key) that every member proves it holds.

- ``generate_key`` / ``load_key``: the key file (64 hex characters, readable by its owner only).
- ``SwarmKeyAuthorizer``: hivemind's DHT hook. Every DHT request and response carries an HMAC of its
  contents with the swarm key (plus time and nonce against replays): a node without the key can
  neither read nor write the swarm's records, and members ignore anything it says.
- ``rpc_proof`` / ``check_rpc_proof``: for Stamen's own RPCs. libp2p authenticates both peer ids of a
  connection, so a proof binds the sender's and receiver's peer ids: it cannot be replayed by anyone
  else, and only a key holder can make one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from hivemind.utils.auth import AuthorizerBase
from hivemind.utils.timed_storage import get_dht_time

KEY_BYTES = 32
MAX_CLOCK_SKEW = 120.0  # seconds a signed DHT request stays valid
NONCE_BYTES = 16


class SwarmKeyError(ValueError):
    """The swarm key file is missing or malformed."""


def generate_key(path: str | Path) -> Path:
    """Write a new random swarm key to ``path`` (which must not exist), readable by its owner only."""
    path = Path(path).expanduser()
    if path.exists():
        raise SwarmKeyError(f"{path} already exists; refusing to overwrite a swarm key")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(KEY_BYTES) + "\n")
    return path


def load_key(path: str | Path) -> bytes:
    path = Path(path).expanduser()
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except FileNotFoundError:
        raise SwarmKeyError(f"swarm key file {path} does not exist (make one with `python -m swarm keygen`)") from None
    except (OSError, ValueError) as exc:
        raise SwarmKeyError(f"swarm key file {path} is not a swarm key: {exc}") from None
    if len(key) != KEY_BYTES:
        raise SwarmKeyError(f"swarm key file {path} must hold {KEY_BYTES} bytes as hex, found {len(key)}")
    return key


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\0".join(parts), hashlib.sha256).digest()


def rpc_proof(key: bytes, sender: str, receiver: str) -> bytes:
    """Proof for RPCs from peer ``sender`` to peer ``receiver`` that the sender holds ``key``."""
    return _mac(key, b"stamen-rpc-v1", sender.encode(), receiver.encode())


def check_rpc_proof(key: bytes, sender: str, receiver: str, proof: bytes) -> bool:
    return hmac.compare_digest(rpc_proof(key, sender, receiver), proof)


class SwarmKeyAuthorizer(AuthorizerBase):
    """Signs and checks every DHT request and response with the swarm key (HMAC-SHA256)."""

    def __init__(self, key: bytes):
        self._key = key
        self._seen: dict[bytes, float] = {}  # nonces of recent requests -> when they expire (pruned by age)

    def _digest(self, message, field: str) -> bytes:
        auth = getattr(message, field)
        signature, auth.signature = auth.signature, b""
        try:
            return _mac(self._key, b"stamen-dht-v1", message.SerializeToString(deterministic=True))
        finally:
            auth.signature = signature

    async def sign_request(self, request, service_public_key) -> None:
        request.auth.time = get_dht_time()
        request.auth.nonce = secrets.token_bytes(NONCE_BYTES)
        request.auth.signature = self._digest(request, "auth")

    async def validate_request(self, request) -> bool:
        auth, now = request.auth, get_dht_time()
        if not hmac.compare_digest(self._digest(request, "auth"), auth.signature):
            return False
        if abs(now - auth.time) > MAX_CLOCK_SKEW or auth.nonce in self._seen:
            return False
        self._seen = {nonce: until for nonce, until in self._seen.items() if until > now}
        self._seen[auth.nonce] = now + 2 * MAX_CLOCK_SKEW
        return True

    async def sign_response(self, response, request) -> None:
        response.auth.nonce = request.auth.nonce
        response.auth.signature = self._digest(response, "auth")

    async def validate_response(self, response, request) -> bool:
        if response is None or response.auth.nonce != request.auth.nonce:
            return False
        return hmac.compare_digest(self._digest(response, "auth"), response.auth.signature)


class Membership:
    """What one node attaches to its RPCs: a proof per receiving peer (nothing in a public swarm)."""

    def __init__(self, key: bytes | None, own_peer_id: str):
        self.key, self.own_peer_id = key, own_peer_id

    def proof_for(self, peer_id: str) -> bytes:
        """Made afresh for every call (one HMAC, about a microsecond): a cache would grow with the peers met."""
        if self.key is None:
            return b""
        return rpc_proof(self.key, self.own_peer_id, peer_id)
