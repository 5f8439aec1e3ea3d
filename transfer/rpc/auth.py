"""Shared-secret mutual authentication: HMAC-SHA256 challenge-response.

Both sides send a fresh random nonce in their hello. The client then proves it knows the
secret with ``HMAC(secret, CLIENT_LABEL || client_nonce || server_nonce)``, and the server
answers with ``HMAC(secret, SERVER_LABEL || client_nonce || server_nonce)``. Why this shape:

* the secret never crosses the wire, and both nonces make every proof single-use, so a
  recorded handshake cannot be replayed against either side;
* distinct labels mean a proof one side produces can never be reflected back as the other
  side's proof;
* the server proves itself only *after* checking the client, so an unauthenticated peer
  receives nothing computed from the secret (it gets a refusal and a closed connection);
* digests are compared with :func:`hmac.compare_digest` (constant time).

A client may also authenticate as a named *identity* (a tenant of the store master) with that
identity's own secret: the identity is then part of both proofs, so a proof for one identity is
worthless for another even if two identities were given the same secret.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from .wire import PROTOCOL_VERSION

__all__ = [
    "NONCE_SIZE",
    "check_secret",
    "client_proof",
    "new_nonce",
    "proof_matches",
    "server_proof",
]

NONCE_SIZE = 32
_CLIENT_LABEL = b"mooncake-rpc/%d client\x00" % PROTOCOL_VERSION
_SERVER_LABEL = b"mooncake-rpc/%d server\x00" % PROTOCOL_VERSION


def new_nonce() -> bytes:
    """A fresh random challenge from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def client_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes,
                 identity: str = "") -> bytes:
    """What the client sends to prove it knows ``secret`` (of ``identity``, if one is named)."""
    return hmac.new(secret, _CLIENT_LABEL + client_nonce + server_nonce + _bind(identity),
                    hashlib.sha256).digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes,
                 identity: str = "") -> bytes:
    """What the server sends back to prove it knows ``secret`` too."""
    return hmac.new(secret, _SERVER_LABEL + client_nonce + server_nonce + _bind(identity),
                    hashlib.sha256).digest()


def _bind(identity: str) -> bytes:
    # Empty for the cluster secret, so those proofs are unchanged on the wire.
    return b"identity\x00" + identity.encode("utf-8") if identity else b""


def proof_matches(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison, so response timing leaks nothing about the expected digest."""
    return hmac.compare_digest(expected, received)


def check_secret(secret: bytes | None) -> bytes | None:
    """Validate a configured secret: ``None`` (no auth) or non-empty bytes."""
    if secret is None:
        return None
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be bytes or None, got {type(secret).__name__}")
    if not secret:
        raise ValueError("secret must not be empty (use None to disable authentication)")
    return bytes(secret)
