"""Per-peer upload caps on loopback, for tests and benchmarks: throttling TCP relays.

On one host every transfer runs at memcpy or loopback speed, so fetching from many peers shows
no gain over fetching from one. Real clusters are limited by each node's NIC; this module puts
that limit back without touching the transfer engine:

* :class:`ThrottledMetadataProxy` sits in front of an HTTP metadata server and passes every
  request through, except that segment descriptors it returns are rewritten: the ``tcp``
  endpoint points at a :class:`ThrottlingRelay` for that peer, and the ``shm``/``file``
  transports are removed so peers cannot bypass it.
* Each relay forwards bytes to the real peer; everything the peer *sends* (its upload - reads
  are served that way) passes one token bucket shared by all connections, so the cap is per
  peer, like a NIC, not per connection.

Start nodes with the proxy's :attr:`~ThrottledMetadataProxy.url` as their ``metadata_server``.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from transfer.metadata import SEGMENT_PREFIX

__all__ = ["ThrottledMetadataProxy", "ThrottlingRelay", "TokenBucket"]

_READ = 256 << 10
_HOP_HEADERS = {"etag", "content-type"}
_FORWARD_HEADERS = {"if-match", "if-none-match", "authorization", "content-type"}


class TokenBucket:
    """Paces a byte stream to ``rate`` bytes/s with bursts of at most ``burst`` bytes."""

    def __init__(self, rate: float, burst: int = 1 << 20) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._burst = burst / rate
        self._free_at = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        start = max(self._free_at, now - self._burst)
        self._free_at = start + n / self.rate
        delay = self._free_at - self._burst - now
        if delay > 0:
            await asyncio.sleep(delay)


class ThrottlingRelay:
    """A TCP relay to ``target`` whose target-to-client direction is capped at ``rate``."""

    def __init__(self, target: tuple[str, int], rate: float, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0
        self.bucket = TokenBucket(rate)
        self.bytes_up = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
            except (OSError, TimeoutError):
                return  # the peer is gone: the client sees its connection closed
            try:
                await asyncio.gather(self._pump(reader, up_w, None),
                                     self._pump(up_r, writer, self.bucket))
            finally:
                up_w.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    bucket: TokenBucket | None) -> None:
        try:
            while data := await src.read(_READ):
                if bucket is not None:
                    await bucket.take(len(data))
                    self.bytes_up += len(data)
                dst.write(data)
                await dst.drain()
        finally:
            # Closing both ends on EOF or error makes the other pump end too.
            dst.close()


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
