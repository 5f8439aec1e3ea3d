"""Per-peer upload caps on loopback, for tests and benchmarks: throttling TCP relays.

On one host every transfer runs at memcpy or loopback speed, so fetching from many peers shows
no gain over fetching from one. Real clusters are limited by each node's NIC; this module puts
that limit back without touching the transfer engine:

* :class:`ThrottledMetadataProxy` sits in front of an HTTP metadata server and passes every
  request through, except that segment descriptors it returns are rewritten: the ``tcp``
  endpoint points at a :class:`ThrottlingRelay` for that peer, and the ``shm``/``file``
  transports are removed so peers cannot bypass it.
* Each relay (a :class:`transfer.relay.Relay`) forwards bytes to the real peer; everything the
  peer *sends* (its upload - reads are served that way) passes one token bucket shared by all
  connections, so the cap is per peer, like a NIC, not per connection.

Start nodes with the proxy's :attr:`~ThrottledMetadataProxy.url` as their ``metadata_server``.
"""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from transfer.metadata import SEGMENT_PREFIX
from transfer.relay import Relay, TokenBucket

__all__ = ["ThrottledMetadataProxy", "ThrottlingRelay", "TokenBucket"]

_HOP_HEADERS = {"etag", "content-type"}
_FORWARD_HEADERS = {"if-match", "if-none-match", "authorization", "content-type"}


class ThrottlingRelay(Relay):
    """A TCP relay to ``target`` whose target-to-client direction is capped at ``rate``."""

    def __init__(self, target: tuple[str, int], rate: float, host: str = "127.0.0.1") -> None:
        super().__init__(target, listen=(host, 0), rate_to_client=rate, burst=1 << 20)
        self.host = host
        self.port = 0

    async def start(self) -> ThrottlingRelay:
        await super().start()
        self.port = self.address[1]
        return self

    @property
    def bytes_up(self) -> int:
        """Bytes the peer uploaded through this relay."""
        return self.stats.bytes_to_client


class ThrottledMetadataProxy:
    """HTTP metadata proxy that routes every peer's TCP data through a capped relay."""

    def __init__(self, upstream: str, rate: float, host: str = "127.0.0.1") -> None:
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.host = host
        self.port = 0
        self.relays: dict[tuple[str, int], ThrottlingRelay] = {}
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        path = self.upstream.split("/", 3)[3] if self.upstream.count("/") >= 3 else ""
        return f"http://{self.host}:{self.port}/{path}"

    def uploads(self) -> dict[str, int]:
        """Bytes each peer (``host:data_port``) uploaded through its relay."""
        return {f"{h}:{p}": r.bytes_up for (h, p), r in self.relays.items()}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        for relay in self.relays.values():
            await relay.close()

    async def __aenter__(self) -> ThrottledMetadataProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        base = self.upstream.split("/", 3)
        url = f"{base[0]}//{base[2]}{request.rel_url}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}
        body = await request.read()
        async with self._session.request(request.method, url, data=body or None,
                                         headers=headers) as reply:
            data = await reply.read()
            out_headers = {k: v for k, v in reply.headers.items() if k.lower() in _HOP_HEADERS}
        key = request.query.get("key", "")
        if request.method == "GET" and reply.status == 200 and key.startswith(SEGMENT_PREFIX):
            data = await self._rewrite(data)
        return web.Response(status=reply.status, body=data, headers=out_headers)

    async def _rewrite(self, data: bytes) -> bytes:
        try:
            desc: dict[str, Any] = msgspec.json.decode(data)
            tcp = desc["transports"]["tcp"]
            target = (str(tcp["host"]), int(tcp["port"]))
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            return data  # not a descriptor we understand: the engine will judge it
        async with self._lock:
            relay = self.relays.get(target)
            if relay is None:
                relay = ThrottlingRelay(target, self.rate, self.host)
                await relay.start()
                self.relays[target] = relay
        desc["transports"] = {"tcp": {**tcp, "host": relay.host, "port": relay.port}}
        return msgspec.json.encode(desc)
