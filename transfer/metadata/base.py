"""The contract every metadata backend honours, and the errors it raises.

The transfer engine publishes segment descriptors and looks up its peers' through a
:class:`MetadataStore`; which backend sits behind it (P2P handshake, HTTP server, etcd) is a
deployment choice made by the ``metadata_server`` string. Values are opaque bytes: encoding a
descriptor is the engine's business.

Versions make compare-and-set possible without locks: every successful write gives the key a new
version, an ``int > 0`` that is never reused for that key within one store (it is etcd's
``mod_revision``, or the HTTP server's global write counter), so a delete followed by a re-create
can never be mistaken for "unchanged".
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

__all__ = [
    "MetadataStore",
    "MetadataError",
    "MetadataUnavailableError",
    "MetadataAuthError",
    "DEFAULT_MAX_VALUE_SIZE",
    "MAX_TTL",
    "validate_value",
    "validate_ttl",
    "validate_version",
]

#: Largest value a store accepts by default (Mooncake descriptors are KBs; 16 MiB is headroom).
DEFAULT_MAX_VALUE_SIZE = 16 * 1024 * 1024
#: Longest TTL, in seconds: a key meant to outlive a dead owner for more than a day is a bug.
MAX_TTL = 86400.0


class MetadataError(Exception):
    """The metadata backend failed or refused a request.

    ``status`` is the HTTP status when the HTTP server answered, else ``None``.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class MetadataUnavailableError(MetadataError):
    """The backend could not be reached or did not answer in time.

    Distinct from "key not found" (``None``) on purpose: a cache must not drop a peer's
    descriptor because the metadata server blinked. Retrying later may succeed.
    """


class MetadataAuthError(MetadataError):
    """The HTTP metadata server rejected our credentials (HTTP 401)."""


@runtime_checkable
class MetadataStore(Protocol):
    """Async key/value store for segment descriptors and other engine metadata."""

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or ``None`` if it does not exist."""
        ...

    async def get_with_version(self, key: str) -> tuple[bytes, int] | None:
        """The value and current version of ``key``, or ``None`` if it does not exist."""
        ...

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` unconditionally.

        With ``ttl`` (seconds) the key is kept alive in the background while this store is open
        and disappears at most ~``ttl`` seconds after this process dies or closes the store.
        """
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` if it existed."""
        ...

    async def list(self, prefix: str) -> dict[str, bytes]:
        """All keys starting with ``prefix`` (``""`` = all) and their values."""
        ...

    async def compare_and_set(
        self, key: str, value: bytes, expected_version: int | None, *, ttl: float | None = None
    ) -> bool:
        """Write ``value`` only if ``key`` is at ``expected_version`` (``None``: must not exist).

        Returns whether the write happened. Exactly one of several racing writers wins.
        """
        ...

    async def close(self) -> None:
        """Stop keep-alives, release this store's TTL keys, close connections. Idempotent."""
        ...


def validate_value(value: object, max_size: int = DEFAULT_MAX_VALUE_SIZE) -> bytes:
    """Return ``value`` as ``bytes`` or raise ``ValueError`` (wrong type or too large)."""
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise ValueError(f"metadata value must be bytes, not {type(value).__name__}")
    if len(value) > max_size:
        raise ValueError(f"metadata value is {len(value)} bytes, the limit is {max_size}")
    return value


def validate_ttl(ttl: object) -> float | None:
    """Return ``ttl`` as a float in ``(0, MAX_TTL]`` (or ``None``), else raise ``ValueError``."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise ValueError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    ttl = float(ttl)
    if not math.isfinite(ttl) or not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be in (0, {MAX_TTL:.0f}] seconds, got {ttl}")
    return ttl


def validate_version(version: object) -> int | None:
    """Return an expected version (``None`` or an int >= 1), else raise ``ValueError``.

    0 is never a version (the P2P backend reports it for unversioned remote values), and etcd
    would read ``mod_revision == 0`` as "absent", so refuse it rather than guess.
    """
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"expected_version must be None or an int >= 1, got {version!r}")
    return version
