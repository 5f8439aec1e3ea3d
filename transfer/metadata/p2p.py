"""``P2PHANDSHAKE`` (Mooncake's default): no central store at all.

Each engine keeps its own descriptors in memory and serves them over its RPC port; a peer's
descriptor is fetched from the peer itself, the segment name (``host:port``) being its address.
This module is the store-shaped side of that: the engine plugs in the function that asks a peer
over RPC (``fetch``), and its RPC handler answers peers from :meth:`P2PHandshakeMetadata.get_local`.

Consequences of having no shared store, by design: ``put``/``delete``/``compare_and_set`` only
touch this process's entries, ``list`` only sees them, and remote values are unversioned
(version 0). A TTL needs no keep-alive: local entries die with the process, or on ``close()``.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from transfer.metadata.base import (
    DEFAULT_MAX_VALUE_SIZE,
    MetadataError,
    MetadataUnavailableError,
    validate_ttl,
    validate_value,
    validate_version,
)
from transfer.metadata.keys import (
    MAX_KEY_BYTES,
    parse_segment_key,
    validate_key,
    validate_prefix,
)
from transfer.metadata.table import Outcome, VersionedTable

__all__ = ["P2PHandshakeMetadata", "FetchFn"]

#: Ask the peer ``segment_name`` ("host:port") for its descriptor; ``None`` if it has none.
FetchFn = Callable[[str], Awaitable["bytes | None"]]


class P2PHandshakeMetadata:
    """:class:`~transfer.metadata.base.MetadataStore` for ``metadata_server="P2PHANDSHAKE"``."""

    def __init__(
        self,
        fetch: FetchFn,
        *,
        fetch_timeout: float = 5.0,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        max_key_size: int = MAX_KEY_BYTES,
    ) -> None:
        if not callable(fetch):
            raise ValueError("P2PHandshakeMetadata needs a fetch(segment_name) coroutine function")
        if fetch_timeout <= 0:
            raise ValueError("fetch_timeout must be positive")
        self._fetch = fetch
        self._fetch_timeout = fetch_timeout
        self._max_value_size = max_value_size
        self._max_key_size = max_key_size
        self._local = VersionedTable()
        self._closed = False

    def __repr__(self) -> str:
        return f"P2PHandshakeMetadata(local_entries={len(self._local)})"

    async def __aenter__(self) -> P2PHandshakeMetadata:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def get_local(self, key: str) -> bytes | None:
        """This process's own entry for ``key``: what the RPC handler serves to peers.

        Never asks a peer, so a handler calling it cannot end up fetching from itself.
        """
        entry = self._local.get(validate_key(key, max_bytes=self._max_key_size))
        return None if entry is None else entry.value

    async def get(self, key: str) -> bytes | None:
        found = await self.get_with_version(key)
        return None if found is None else found[0]

    async def get_with_version(self, key: str) -> tuple[bytes, int] | None:
        key = validate_key(key, max_bytes=self._max_key_size)
        self._check_open()
        entry = self._local.get(key)
        if entry is not None:
            return entry.value, entry.version
        segment_name = parse_segment_key(key)
        if segment_name is None:
            return None  # not a descriptor key: only local entries exist
        value = await self._fetch_remote(segment_name)
        return None if value is None else (value, 0)

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        key, value = self._checked(key, value, ttl)
        self._local.put(key, value)

    async def compare_and_set(
        self, key: str, value: bytes, expected_version: int | None, *, ttl: float | None = None
    ) -> bool:
        expected = validate_version(expected_version)
        key, value = self._checked(key, value, ttl)
        return self._local.compare_and_set(key, value, expected) is not None

    async def delete(self, key: str) -> bool:
        key = validate_key(key, max_bytes=self._max_key_size)
        self._check_open()
        return self._local.delete(key) is Outcome.OK

    async def list(self, prefix: str) -> dict[str, bytes]:
        prefix = validate_prefix(prefix, max_bytes=self._max_key_size)
        self._check_open()
        return {key: entry.value for key, entry in self._local.items(prefix)}

    async def close(self) -> None:
        """Forget the local entries: peers asking from now on are told there is nothing."""
        self._closed = True
        self._local = VersionedTable()

    async def _fetch_remote(self, segment_name: str) -> bytes | None:
        try:
            value = await asyncio.wait_for(self._fetch(segment_name), self._fetch_timeout)
        except MetadataError:
            raise
        except (OSError, asyncio.TimeoutError) as e:
            raise MetadataUnavailableError(
                f"P2P handshake with {segment_name} failed: {e or type(e).__name__}"
            ) from None
        if value is None:
            return None
        try:
            return validate_value(value, self._max_value_size)
        except ValueError as e:
            raise MetadataError(f"peer {segment_name} sent an unusable descriptor: {e}") from None

    def _checked(self, key: str, value: bytes, ttl: float | None) -> tuple[str, bytes]:
        key = validate_key(key, max_bytes=self._max_key_size)
        value = validate_value(value, self._max_value_size)
        validate_ttl(ttl)
        self._check_open()
        return key, value

    def _check_open(self) -> None:
        if self._closed:
            raise MetadataError(f"{self!r} is closed")
