"""Optional shared-secret authentication for the HTTP metadata server.

Wire-compatible with Mooncake (#4444): the client sends ``Authorization: Bearer <token>`` and a
server configured with a token rejects requests without it (401). Mooncake's C++ client reads the
token from ``MC_METADATA_HTTP_TOKEN``; our CLI honours the same variable.

The comparison hashes both sides first so it takes the same time whatever the length or content
of the guess: no timing side channel on the secret.
"""
from __future__ import annotations

import hashlib
import hmac

__all__ = ["TOKEN_ENV", "MAX_TOKEN_BYTES", "normalize_secret", "bearer_header", "is_authorized"]

#: Environment variable Mooncake uses for the HTTP metadata token.
TOKEN_ENV = "MC_METADATA_HTTP_TOKEN"
MAX_TOKEN_BYTES = 4096


def normalize_secret(secret: str | bytes | None) -> bytes | None:
    """Validate a shared secret and return it as bytes (``None`` or empty: auth off).

    It travels in an HTTP header, so it must be visible ASCII without spaces.
    """
    if secret is None:
        return None
    if isinstance(secret, str):
        try:
            secret = secret.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("metadata secret must be ASCII (it is sent in a header)") from None
    if not isinstance(secret, (bytes, bytearray)):
        raise ValueError(f"metadata secret must be str or bytes, not {type(secret).__name__}")
    secret = bytes(secret).strip()
    if not secret:
        return None
    if len(secret) > MAX_TOKEN_BYTES:
        raise ValueError(f"metadata secret is longer than {MAX_TOKEN_BYTES} bytes")
    if any(b < 0x21 or b > 0x7E for b in secret):
        raise ValueError("metadata secret must be visible ASCII without spaces")
    return secret


def bearer_header(secret: bytes) -> str:
    """The ``Authorization`` header value for ``secret``."""
    return "Bearer " + secret.decode("ascii")


def is_authorized(header: str | None, secret: bytes) -> bool:
    """Whether an ``Authorization`` header carries ``secret``, in constant time."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    provided = token.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(
        hashlib.sha256(provided).digest(), hashlib.sha256(secret).digest()
    )
