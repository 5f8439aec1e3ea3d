"""HTTP metadata server, wire-compatible with Mooncake's ``http_metadata_server``.

Mooncake's protocol (what its C++ ``HTTPStoragePlugin`` speaks), all on one path, ``/metadata``:

* ``GET    /metadata?key=K`` -> 200 with the raw value, 404 if absent.
* ``PUT    /metadata?key=K`` (raw body) -> 200, stores the body as is.
* ``DELETE /metadata?key=K`` -> 200, 404 if absent.
* no ``key`` -> 400; ``Authorization: Bearer <token>`` when the server has a token, else 401.

Our extensions, used by the store's P2P layer and by our own client:

* Versions: every write answers ``ETag: "<version>"`` (so does ``GET``). ``PUT`` and ``DELETE``
  accept ``If-Match: "<version>"`` (or ``*``: must exist) and ``PUT`` accepts ``If-None-Match: *``
  (must not exist); a failed precondition answers 412. That is compare-and-set.
* ``GET /metadata?prefix=P`` -> 200 JSON ``{"revision": n, "entries": [{"key", "value"
  (base64), "version"}]}``, sorted by key; ``prefix=`` lists everything.
* ``PUT /metadata?key=K&ttl=S``: the key expires ``S`` seconds later unless refreshed by
  ``PATCH /metadata?key=K&ttl=S`` with ``If-Match: "<version>"`` (200, 404 gone, 412 rewritten by
  someone else). A refresh never changes the version.
* Limits: body > ``max_value_size`` -> 413; bad key, ttl, header or unknown parameter -> 400;
  entry or byte budget exhausted -> 507.

Divergence from Mooncake: Mooncake refuses (400) to overwrite an existing ``rpc_meta`` key with a
different value; here ``PUT`` always overwrites, and callers that want "first writer wins" use
``If-None-Match: *``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from aiohttp import web

from transfer.metadata.auth import is_authorized, normalize_secret
from transfer.metadata.base import DEFAULT_MAX_VALUE_SIZE, validate_ttl
from transfer.metadata.keys import MAX_KEY_BYTES, validate_key, validate_prefix
from transfer.metadata.table import Outcome, TableFullError, VersionedTable

__all__ = ["HttpMetadataServer", "ListEntry", "ListResponse", "DEFAULT_PATH"]

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/metadata"

_ALLOWED_PARAMS = {
    "GET": frozenset({"key", "prefix"}),
    "PUT": frozenset({"key", "ttl"}),
    "DELETE": frozenset({"key"}),
    "PATCH": frozenset({"key", "ttl"}),
}


class ListEntry(msgspec.Struct, forbid_unknown_fields=True):
    """One row of a prefix listing; ``value`` travels base64-encoded."""

    key: str
    value: bytes
    version: int


class ListResponse(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``GET /metadata?prefix=...``."""

    revision: int
    entries: list[ListEntry]


_list_encoder = msgspec.json.Encoder()


class _BadRequest(Exception):
    """Raised inside handlers; becomes a 400 with the message as body."""


class _Precondition:
    """A parsed ``If-Match`` / ``If-None-Match`` pair."""

    __slots__ = ("kind", "version")

    def __init__(self, kind: str, version: int | None = None) -> None:
        self.kind = kind  # "none" | "absent" | "exists" | "version"
        self.version = version  # None for "absent": compare_and_set's "must not exist"


class HttpMetadataServer:
    """The metadata server: a :class:`VersionedTable` behind aiohttp routes.

    Standalone: ``await server.start()`` / ``await server.stop()`` (or ``async with``).
    Embedded (the store master hosts it): ``server.add_routes(app)`` before ``app`` starts;
    the TTL sweeper then follows the app's startup and cleanup.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        path: str = DEFAULT_PATH,
        secret: str | bytes | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        max_key_size: int = MAX_KEY_BYTES,
        max_entries: int = 1_000_000,
        max_total_bytes: int = 1 << 30,
        sweep_interval: float = 1.0,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if max_value_size <= 0 or max_key_size <= 0:
            raise ValueError("max_value_size and max_key_size must be positive")
        if sweep_interval <= 0:
            raise ValueError("sweep_interval must be positive")
        self.host = host
        self._port = port
        self.path = path
        self.max_value_size = max_value_size
        self.max_key_size = max_key_size
        self.table = VersionedTable(max_entries=max_entries, max_total_bytes=max_total_bytes)
        self._secret = normalize_secret(secret)
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port (the OS's pick when constructed with ``port=0`` and started)."""
        return self._port

    @property
    def url(self) -> str:
        """What to pass as ``metadata_server`` to reach this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}{self.path}"

    def add_routes(self, app: web.Application) -> None:
        """Serve the metadata protocol on ``app`` at :attr:`path`."""
        app.router.add_route("*", self.path, self._handle)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)

    async def start(self) -> None:
        """Bind and serve on ``host:port`` in the running event loop."""
        if self._runner is not None:
            raise RuntimeError("HttpMetadataServer already started")
        app = web.Application()
        self.add_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self._port = int(address[1])
                break
        logger.info("metadata server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop serving (idempotent). :attr:`table` is kept: a restart serves it again."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> HttpMetadataServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_startup(self, app: web.Application) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="metadata-ttl-sweeper")

    async def _on_cleanup(self, app: web.Application) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            dropped = self.table.sweep()
            if dropped:
                logger.debug("metadata server expired %d keys", dropped)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._secret is not None and not is_authorized(
            request.headers.get("Authorization"), self._secret
        ):
            return web.Response(
                status=401, text="unauthorized", headers={"WWW-Authenticate": "Bearer"}
            )
        allowed = _ALLOWED_PARAMS.get(request.method)
        if allowed is None:
            return web.Response(
                status=405, text="method not allowed", headers={"Allow": "GET, PUT, DELETE, PATCH"}
            )
        try:
            params = self._parse_query(request, allowed)
            if request.method == "GET":
                if "prefix" in params:
                    if "key" in params:
                        raise _BadRequest("give either key or prefix, not both")
                    return self._list(self._prefix(params["prefix"]))
                return self._get(self._key(params))
            key = self._key(params)
            if request.method == "PUT":
                return await self._put(request, key, params)
            if request.method == "DELETE":
                return self._delete(request, key)
            return self._touch(request, key, params)
        except _BadRequest as e:
            return web.Response(status=400, text=str(e))
        except TableFullError as e:
            return web.Response(status=507, text=str(e))

    @staticmethod
    def _parse_query(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
        params: dict[str, str] = {}
        for name, value in request.query.items():
            if name not in allowed:
                raise _BadRequest(f"unknown query parameter {name!r} for {request.method}")
            if name in params:
                raise _BadRequest(f"query parameter {name!r} given twice")
            params[name] = value
        return params

    def _key(self, params: dict[str, str]) -> str:
        if "key" not in params or not params["key"]:
            raise _BadRequest("metadata key is required")
        try:
            return validate_key(params["key"], max_bytes=self.max_key_size)
        except ValueError as e:
            raise _BadRequest(str(e)) from None

    def _prefix(self, raw: str) -> str:
        try:
            return validate_prefix(raw, max_bytes=self.max_key_size)
        except ValueError as e:  # a control character or an oversized prefix is the client's
            raise _BadRequest(str(e)) from None

    @staticmethod
    def _ttl(params: dict[str, str], *, required: bool) -> float | None:
        raw = params.get("ttl")
        if raw is None:
            if required:
                raise _BadRequest("ttl is required")
            return None
        try:
            return validate_ttl(float(raw))
        except ValueError as e:
            raise _BadRequest(f"bad ttl {raw[:32]!r}: {e}") from None

    def _get(self, key: str) -> web.Response:
        entry = self.table.get(key)
        if entry is None:
            return web.Response(status=404, text="metadata not found")
        return web.Response(
            body=entry.value,
            content_type="application/octet-stream",
            headers={"ETag": _etag(entry.version)},
        )

    def _list(self, prefix: str) -> web.Response:
        body = ListResponse(
            revision=self.table.revision,
            entries=[ListEntry(k, e.value, e.version) for k, e in self.table.items(prefix)],
        )
        return web.Response(body=_list_encoder.encode(body), content_type="application/json")

    async def _put(self, request: web.Request, key: str, params: dict[str, str]) -> web.Response:
        ttl = self._ttl(params, required=False)
        precondition = _parse_preconditions(request, allow_none_match=True)
        value = await self._read_body(request)
        if value is None:
            return web.Response(
                status=413, text=f"metadata value larger than {self.max_value_size} bytes"
            )
        # No awaits from here on: check-and-set is atomic on the event loop.
        version: int | None
        if precondition.kind == "none":
            version = self.table.put(key, value, ttl=ttl)
        elif precondition.kind == "exists":
            entry = self.table.get(key)
            version = None if entry is None else self.table.put(key, value, ttl=ttl)
        else:
            version = self.table.compare_and_set(key, value, precondition.version, ttl=ttl)
        if version is None:
            return web.Response(status=412, text="version conflict")
        return web.Response(text="metadata updated", headers={"ETag": _etag(version)})

    def _delete(self, request: web.Request, key: str) -> web.Response:
        precondition = _parse_preconditions(request, allow_none_match=False)
        expected = None
        if precondition.kind == "version":
            expected = precondition.version
        outcome = self.table.delete(key, expected)
        if outcome is Outcome.MISSING:
            return web.Response(status=404, text="metadata not found")
        if outcome is Outcome.CONFLICT:
            return web.Response(status=412, text="version conflict")
        return web.Response(text="metadata deleted")

    def _touch(self, request: web.Request, key: str, params: dict[str, str]) -> web.Response:
        ttl = self._ttl(params, required=True)
        precondition = _parse_preconditions(request, allow_none_match=False)
        if precondition.kind != "version":
            raise _BadRequest('PATCH needs If-Match: "<version>"')
        assert ttl is not None and precondition.version is not None
        outcome = self.table.touch(key, ttl, precondition.version)
        if outcome is Outcome.MISSING:
            return web.Response(status=404, text="metadata not found")
        if outcome is Outcome.CONFLICT:
            return web.Response(status=412, text="version conflict")
        return web.Response(
            text="metadata refreshed", headers={"ETag": _etag(precondition.version)}
        )

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The request body, or ``None`` if it is larger than ``max_value_size``.

        Read from the stream ourselves: the app's ``client_max_size`` is not ours to rely on
        when we are embedded in someone else's app.
        """
        limit = self.max_value_size
        if request.content_length is not None and request.content_length > limit:
            return None
        body = bytearray()
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                return None



def _etag(version: int) -> str:
    return f'"{version}"'


def _parse_preconditions(request: web.Request, *, allow_none_match: bool) -> _Precondition:
    if_match = request.headers.getall("If-Match", [])
    if_none_match = request.headers.getall("If-None-Match", [])
    if len(if_match) > 1 or len(if_none_match) > 1:
        raise _BadRequest("repeated If-Match / If-None-Match header")
    if if_match and if_none_match:
        raise _BadRequest("give either If-Match or If-None-Match, not both")
    if if_none_match:
        if not allow_none_match:
            raise _BadRequest(f"If-None-Match is not supported for {request.method}")
        if if_none_match[0].strip() != "*":
            raise _BadRequest("only If-None-Match: * is supported")
        return _Precondition("absent")
    if not if_match:
        return _Precondition("none")
    raw = if_match[0].strip()
    if raw == "*":
        return _Precondition("exists")
    digits = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        raise _BadRequest(f"If-Match must be a version number, got {raw[:32]!r}")
    return _Precondition("version", int(digits))
