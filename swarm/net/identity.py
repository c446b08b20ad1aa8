"""A node's libp2p identity, used to sign what it announces.

The identity file is the one the libp2p daemon loads (hivemind's format: a protobuf ``PrivateKey``
holding an RSA key), so the key that signs a server's record is the key its peer id is derived from:
anyone can check a record against the peer id it claims, with no other trust.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2


class Identity:
    def __init__(self, path: Path):
        self.path = Path(path)
        message = crypto_pb2.PrivateKey.FromString(self.path.read_bytes())
        if message.key_type != crypto_pb2.RSA:
            raise ValueError(f"{path}: only RSA identities are supported")
        self._key = serialization.load_der_private_key(message.data, password=None)
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def load_or_create(cls, path: str | Path | None) -> Identity:
        """The identity in ``path`` (created there if missing), or a fresh one in a temporary file."""
        if path is None:
            handle, name = tempfile.mkstemp(prefix="stamen-identity-", suffix=".key")
            os.close(handle)
            os.unlink(name)
            path = name
        path = Path(path).expanduser()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(path))
        return cls(path)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id of a protobuf-encoded RSA public key (sha2-256 multihash, base58)."""
    digest = multihash.encode(hashlib.sha256(public_key).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def verify(public_key: bytes, peer_id: str, data: bytes, signature: bytes) -> bool:
    """True if ``public_key`` belongs to ``peer_id`` and signed ``data``; never raises."""
    try:
        if not signature or peer_id_of(public_key) != peer_id:
            return False
        message = crypto_pb2.PublicKey.FromString(public_key)
        if message.key_type != crypto_pb2.RSA:
            return False
        key = serialization.load_der_public_key(message.data)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError, Exception):
        return False
