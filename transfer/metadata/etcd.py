"""etcd backend (``etcd://host:port[,host:port...]``) through aetcd, the asyncio etcd v3 client.

Versions are etcd's ``mod_revision``; compare-and-set is one etcd transaction comparing
``mod_revision`` (or ``create_revision == 0`` for "must not exist"). Keys written with a TTL are
attached to a lease of their own that a background task keeps alive, so the descriptor of an
engine that dies disappears when its lease runs out, and the descriptor of one that lives stays.

aetcd talks to one endpoint, so failover across the listed endpoints is done here: a read that
finds an endpoint unavailable moves on to the next one; a compare-and-set only does so when the
connection was never made, because retrying one that may have been applied could report a win as
a loss.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aetcd

from transfer.metadata.base import (
    DEFAULT_MAX_VALUE_SIZE,
    MetadataError,
    MetadataUnavailableError,
    validate_ttl,
    validate_value,
    validate_version,
)
from transfer.metadata.factory import parse_endpoints
from transfer.metadata.keepalive import KeepAlive
from transfer.metadata.keys import MAX_KEY_BYTES, prefix_range_end, validate_key, validate_prefix

__all__ = ["EtcdMetadataStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class _Held:
    """A TTL key kept alive by this store: its lease, and the value to re-create it with."""

    value: bytes
    ttl: int
    lease_id: int


class EtcdMetadataStore:
    """:class:`~transfer.metadata.base.MetadataStore` on a real etcd cluster."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        max_key_size: int = MAX_KEY_BYTES,
        max_list_size: int = 256 * 1024 * 1024,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.endpoints = parse_endpoints(endpoints)
        self._timeout = timeout
        self._auth = (username, password)
        self._max_value_size = max_value_size
        self._max_key_size = max_key_size
        self._grpc_options = {
            "grpc.max_receive_message_length": max_list_size,
            "grpc.max_send_message_length": max_value_size + max_key_size + 4096,
        }
        self._clients: list[aetcd.Client | None] = [None] * len(self.endpoints)
        self._current = 0
        self._held: dict[str, _Held] = {}
        self._keepalive = KeepAlive(f"etcd metadata store {self._describe()}")
        self._closed = False

    def __repr__(self) -> str:
        return f"EtcdMetadataStore({self._describe()!r})"

    async def __aenter__(self) -> EtcdMetadataStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def get(self, key: str) -> bytes | None:
        found = await self.get_with_version(key)
        return None if found is None else found[0]

    async def get_with_version(self, key: str) -> tuple[bytes, int] | None:
        raw = self._key(key)
        self._check_open()
        kv = await self._call("get", lambda c: c.get(raw), idempotent=True)
        return None if kv is None else (kv.value, kv.mod_revision)

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self._write(key, value, ttl, expected=None, conditional=False)

    async def compare_and_set(
        self, key: str, value: bytes, expected_version: int | None, *, ttl: float | None = None
    ) -> bool:
        expected = validate_version(expected_version)
        return await self._write(key, value, ttl, expected=expected, conditional=True)

    async def delete(self, key: str) -> bool:
        raw = self._key(key)
        self._check_open()
        held = await self._release(key)  # first, or a refresh could re-create what we delete
        deleted = await self._call("delete", lambda c: c.delete(raw), idempotent=True)
        if held is not None:
            await self._revoke(held.lease_id)
        return deleted is not None

    async def list(self, prefix: str) -> dict[str, bytes]:
        prefix = validate_prefix(prefix, max_bytes=self._max_key_size)
        self._check_open()
        start = prefix.encode("utf-8")
        if start:
            end = prefix_range_end(start)
        else:
            start, end = b"\0", b"\0"  # etcd spelling of "the whole keyspace"
        found = await self._call("list", lambda c: c.get_range(start, end), idempotent=True)
        result: dict[str, bytes] = {}
        for kv in found:
            try:
                result[kv.key.decode("utf-8")] = kv.value
            except UnicodeDecodeError:
                logger.debug("skipping non-UTF-8 etcd key %r", kv.key[:64])
        return result

    async def close(self) -> None:
        """Stop keep-alives, revoke their leases (their keys vanish now), close channels."""
        if self._closed:
            return
        self._closed = True
        for key in await self._keepalive.close():
            held = self._held.pop(key)
            with contextlib.suppress(MetadataError):
                await self._revoke(held.lease_id)
        clients, self._clients = self._clients, [None] * len(self.endpoints)
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()

    async def _write(
        self, key: str, value: bytes, ttl: float | None, *, expected: int | None,
        conditional: bool,
    ) -> bool:
        raw = self._key(key)
        value = validate_value(value, self._max_value_size)
        ttl_checked = validate_ttl(ttl)
        self._check_open()
        lease_ttl = None if ttl_checked is None else max(1, math.ceil(ttl_checked))
        lease_id = 0 if lease_ttl is None else await self._grant(lease_ttl)
        try:
            if conditional:
                won = await self._cas(raw, value, expected, lease_id)
            else:
                await self._call(
                    "put", lambda c: c.put(raw, value, lease=lease_id or None), idempotent=True
                )
                won = True
        except BaseException:
            if lease_id:
                with contextlib.suppress(Exception):
                    await self._revoke(lease_id)
            raise
        if not won:
            if lease_id:
                await self._revoke(lease_id)
            return False
        # The key now hangs on the new lease (or none): the old one can go without taking it along.
        old = await self._release(key)
        if old is not None:
            await self._revoke(old.lease_id)
        if lease_ttl is not None:
            state = _Held(value, lease_ttl, lease_id)
            self._held[key] = state
            await self._keepalive.hold(key, lease_ttl, lambda: self._refresh(raw, state))
        return True

    async def _cas(self, raw: bytes, value: bytes, expected: int | None, lease_id: int) -> bool:
        def txn(c: aetcd.Client) -> Awaitable[tuple[bool, list[object]]]:
            compare = (
                c.transactions.create(raw) == 0
                if expected is None
                else c.transactions.mod(raw) == expected
            )
            put = c.transactions.put(raw, value, lease=lease_id or None)
            result: Awaitable[tuple[bool, list[object]]] = c.transaction(
                compare=[compare], success=[put], failure=[]
            )
            return result

        succeeded, _ = await self._call("compare_and_set", txn, idempotent=False)
        return bool(succeeded)

    async def _refresh(self, raw: bytes, state: _Held) -> bool:
        """Keep the lease alive; re-create the key on a new lease if the old one expired."""
        reply = await self._call(
            "keep-alive", lambda c: c.refresh_lease(state.lease_id), idempotent=True
        )
        if reply is not None and reply.TTL > 0:
            return True
        lease_id = await self._grant(state.ttl)
        if await self._cas(raw, state.value, None, lease_id):
            state.lease_id = lease_id
            logger.warning("etcd lease of %r had expired; key re-published", raw.decode())
            return True
        await self._revoke(lease_id)
        return False

    async def _grant(self, ttl: int) -> int:
        lease = await self._call("lease grant", lambda c: c.lease(ttl), idempotent=True)
        return int(lease.id)

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self._call("lease revoke", lambda c: c.revoke_lease(lease_id), idempotent=True)
        except MetadataError as e:
            if "not found" not in str(e):  # already expired: nothing to do
                raise

    async def _release(self, key: str) -> _Held | None:
        await self._keepalive.release(key)
        return self._held.pop(key, None)

    async def _call(
        self, what: str, op: Callable[[aetcd.Client], Awaitable[T]], *, idempotent: bool
    ) -> T:
        last: Exception | None = None
        n = len(self.endpoints)
        for attempt in range(n):
            index = (self._current + attempt) % n
            client = self._client(index)
            try:
                result = await asyncio.wait_for(op(client), self._timeout + 1.0)
            except aetcd.ConnectionFailedError as e:
                last = e
                never_connected = "failed to connect" in str(e).lower()
                if idempotent or never_connected:
                    continue
                raise MetadataUnavailableError(
                    f"etcd {what} on {self._name(index)} failed and may or may not have been "
                    f"applied: {e}"
                ) from None
            except (aetcd.ConnectionTimeoutError, asyncio.TimeoutError):
                raise MetadataUnavailableError(
                    f"etcd {what} on {self._name(index)} timed out after {self._timeout}s"
                ) from None
            except aetcd.ClientError as e:
                raise MetadataError(f"etcd {what} on {self._name(index)} failed: {e}") from None
            self._current = index
            return result
        raise MetadataUnavailableError(
            f"no etcd endpoint reachable among {self._describe()} ({what}): {last}"
        )

    def _client(self, index: int) -> aetcd.Client:
        client = self._clients[index]
        if client is None:
            self._check_open()  # close() may use the channels it has, never open a new one
            host, port = self.endpoints[index]
            username, password = self._auth
            client = aetcd.Client(
                host=host, port=port, username=username, password=password,
                timeout=self._timeout, options=dict(self._grpc_options),
            )
            self._clients[index] = client
        return client

    def _key(self, key: str) -> bytes:
        return validate_key(key, max_bytes=self._max_key_size).encode("utf-8")

    def _check_open(self) -> None:
        if self._closed:
            raise MetadataError(f"{self!r} is closed")

    def _name(self, index: int) -> str:
        host, port = self.endpoints[index]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _describe(self) -> str:
        return ",".join(self._name(i) for i in range(len(self.endpoints)))
