"""Client for the HTTP metadata server (ours, or Mooncake's for the plain get/put/delete subset).

Every request has a connect timeout and a total timeout, and every response body is read with a
size bound, so a dead, slow or hostile server costs a bounded wait and bounded memory, and is
reported as :class:`MetadataUnavailableError` rather than as "key not found".
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
import msgspec
import yarl

from transfer.metadata.auth import bearer_header, normalize_secret
from transfer.metadata.base import (
    DEFAULT_MAX_VALUE_SIZE,
    MetadataAuthError,
    MetadataError,
    MetadataUnavailableError,
    validate_ttl,
    validate_value,
    validate_version,
)
from transfer.metadata.http_server import ListResponse
from transfer.metadata.keepalive import KeepAlive
from transfer.metadata.keys import MAX_KEY_BYTES, validate_key, validate_prefix

__all__ = ["HttpMetadataClient"]

logger = logging.getLogger(__name__)

_list_decoder = msgspec.json.Decoder(ListResponse)


@dataclass(slots=True)
class _Held:
    """A TTL key this client keeps alive: what to refresh, and what to re-create if it expired."""

    value: bytes
    ttl: float
    version: int


@dataclass(slots=True)
class _Reply:
    status: int
    body: bytes
    etag: str | None


class HttpMetadataClient:
    """:class:`~transfer.metadata.base.MetadataStore` over ``http(s)://host:port/path``."""

    def __init__(
        self,
        url: str,
        *,
        secret: str | bytes | None = None,
        timeout: float = 3.0,
        connect_timeout: float = 1.5,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        max_list_size: int = 256 * 1024 * 1024,
        max_key_size: int = MAX_KEY_BYTES,
    ) -> None:
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"metadata server URL must be http(s)://host[:port]/path, got {url!r}")
        if parsed.query_string or parsed.fragment:
            raise ValueError(f"metadata server URL must not carry a query or fragment: {url!r}")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.url = str(parsed)
        self._url = parsed
        self._secret = normalize_secret(secret)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._timeout_s = timeout
        self._max_value_size = max_value_size
        self._max_list_size = max_list_size
        self._max_key_size = max_key_size
        self._session: aiohttp.ClientSession | None = None
        self._held: dict[str, _Held] = {}
        self._keepalive = KeepAlive(f"metadata client {self.url}")
        self._closed = False

    def __repr__(self) -> str:
        return f"HttpMetadataClient({self.url!r})"

    async def __aenter__(self) -> HttpMetadataClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def get(self, key: str) -> bytes | None:
        reply = await self._get(key)
        return None if reply is None else reply.body

    async def get_with_version(self, key: str) -> tuple[bytes, int] | None:
        reply = await self._get(key)
        return None if reply is None else (reply.body, _parse_etag(reply.etag))

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self._write(key, value, ttl, headers={}, conditional=False)

    async def compare_and_set(
        self, key: str, value: bytes, expected_version: int | None, *, ttl: float | None = None
    ) -> bool:
        expected = validate_version(expected_version)
        headers = {"If-None-Match": "*"} if expected is None else {"If-Match": f'"{expected}"'}
        return await self._write(key, value, ttl, headers=headers, conditional=True)

    async def delete(self, key: str) -> bool:
        key = validate_key(key, max_bytes=self._max_key_size)
        self._check_open()
        await self._release(key)  # first, or a refresh could re-create what we delete
        reply = await self._request("DELETE", {"key": key}, limit=4096)
        if reply.status == 404:
            return False
        self._expect(reply, "DELETE", key, 200)
        return True

    async def list(self, prefix: str) -> dict[str, bytes]:
        prefix = validate_prefix(prefix, max_bytes=self._max_key_size)
        self._check_open()
        reply = await self._request("GET", {"prefix": prefix}, limit=self._max_list_size)
        self._expect(reply, "GET", f"prefix {prefix!r}", 200)
        try:
            listing = _list_decoder.decode(reply.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise MetadataError(
                f"metadata server {self.url} sent a malformed listing (does it support "
                f"prefix listing?): {e}"
            ) from None
        return {entry.key: entry.value for entry in listing.entries}

    async def close(self) -> None:
        """Stop keep-alives, delete the TTL keys this client still owns, close the session."""
        if self._closed:
            return
        self._closed = True
        held = await self._keepalive.close()
        for key in held:
            state = self._held.pop(key)
            try:
                await self._request(
                    "DELETE", {"key": key}, headers={"If-Match": f'"{state.version}"'}, limit=4096
                )
            except MetadataError as e:
                logger.warning("could not release TTL key %r on close (it will expire): %s", key, e)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _write(
        self, key: str, value: bytes, ttl: float | None, *, headers: dict[str, str],
        conditional: bool,
    ) -> bool:
        key = validate_key(key, max_bytes=self._max_key_size)
        value = validate_value(value, self._max_value_size)
        ttl = validate_ttl(ttl)
        self._check_open()
        # The old keep-alive (if any) runs on until this write lands: racing it is harmless
        # (its PATCH and re-create are conditional and fail against the new version), and a
        # failed compare-and-set must leave it running.
        params = {"key": key} if ttl is None else {"key": key, "ttl": repr(ttl)}
        reply = await self._request("PUT", params, data=value, headers=headers, limit=4096)
        if conditional and reply.status == 412:
            return False
        self._expect(reply, "PUT", key, 200)
        await self._release(key)
        if ttl is not None:
            state = _Held(value, ttl, _parse_etag(reply.etag))
            self._held[key] = state
            await self._keepalive.hold(key, ttl, lambda: self._refresh(key, state))
        return True

    async def _get(self, key: str) -> _Reply | None:
        key = validate_key(key, max_bytes=self._max_key_size)
        self._check_open()
        reply = await self._request("GET", {"key": key}, limit=self._max_value_size)
        if reply.status == 404:
            return None
        self._expect(reply, "GET", key, 200)
        return reply

    async def _release(self, key: str) -> None:
        await self._keepalive.release(key)
        self._held.pop(key, None)

    async def _refresh(self, key: str, state: _Held) -> bool:
        """Keep ``key`` alive; re-create it if it expired; ``False`` once someone else owns it.

        ``state`` belongs to this keep-alive alone, so a refresh that loses a race with a newer
        write of the same key cannot disturb the newer write's bookkeeping.
        """
        ttl = repr(state.ttl)
        reply = await self._request(
            "PATCH", {"key": key, "ttl": ttl}, headers={"If-Match": f'"{state.version}"'},
            limit=4096,
        )
        if reply.status == 200:
            return True
        if reply.status == 412:
            return False
        if reply.status != 404:
            self._expect(reply, "PATCH", key, 200)
        # Expired (we were cut off for longer than ttl): re-create it unless someone else did.
        reply = await self._request(
            "PUT", {"key": key, "ttl": ttl}, data=state.value, headers={"If-None-Match": "*"},
            limit=4096,
        )
        if reply.status == 412:
            return False
        self._expect(reply, "PUT", key, 200)
        state.version = _parse_etag(reply.etag)
        logger.warning("TTL key %r had expired on %s and was re-published", key, self.url)
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise MetadataError(f"{self!r} is closed")

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._check_open()  # close() may still use the session it has, never a new one
            headers = {} if self._secret is None else {"Authorization": bearer_header(self._secret)}
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers=headers, raise_for_status=False
            )
        return self._session

    async def _request(
        self,
        method: str,
        params: dict[str, str],
        *,
        limit: int,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Reply:
        session = self._get_session()
        try:
            async with session.request(
                method, self._url, params=params, data=data, headers=headers
            ) as resp:
                body = await _read_bounded(resp, limit, method, self.url)
                reply = _Reply(resp.status, body, resp.headers.get("ETag"))
        except asyncio.TimeoutError:
            raise MetadataUnavailableError(
                f"metadata server {self.url} did not answer {method} within {self._timeout_s}s"
            ) from None
        except aiohttp.ClientError as e:
            raise MetadataUnavailableError(
                f"metadata server {self.url} unreachable ({method}): {e}"
            ) from None
        if reply.status == 401:
            raise MetadataAuthError(
                f"metadata server {self.url} rejected our credentials"
                + (" (no secret configured)" if self._secret is None else ""),
                status=401,
            )
        return reply

    def _expect(self, reply: _Reply, method: str, what: str, status: int) -> None:
        if reply.status == status:
            return
        text = reply.body[:200].decode("utf-8", "replace")
        message = f"{method} {what!r} on {self.url}: HTTP {reply.status}: {text}"
        if reply.status >= 500 and reply.status != 507:
            raise MetadataUnavailableError(message, status=reply.status)
        raise MetadataError(message, status=reply.status)


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int, method: str, url: str) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise MetadataError(
            f"{method} {url}: response of {resp.content_length} bytes exceeds the {limit} limit"
        )
    body = bytearray()
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise MetadataError(f"{method} {url}: response exceeds the {limit} byte limit")


def _parse_etag(etag: str | None) -> int:
    raw = (etag or "").strip()
    if raw.startswith("W/"):
        raw = raw[2:]
    digits = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        raise MetadataError(
            f"metadata server sent no usable version (ETag {etag!r}); versions, TTLs and "
            "compare-and-set need our server, not Mooncake's"
        )
    return int(digits)
