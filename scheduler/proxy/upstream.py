"""Calls from the proxy to its engines, with every wait bounded.

Why a module of its own: an engine that is cut off the network (link down, a hung host) does not
answer with an error, it just stops answering; without a bound on each wait, a request to it would
hang for as long as the client is willing to. Four bounds, all set in the proxy's config:

- ``connect``: the TCP connect (a SYN into the void is otherwise retried for minutes);
- ``first_byte``: from sending the request to the response's status line and headers (for a
  non-streamed answer that is the whole generation; for a prefill, the whole prefill);
- ``idle``: the longest gap between two pieces of the body once the headers came (a stream that
  stalls mid-way, a JSON body that never finishes);
- ``total``: the whole exchange, the last resort for a stream that trickles forever.

A bound that fires raises :class:`UpstreamTimeout` (a ``TimeoutError``) naming which one, so the
client's error message says what happened. A wait for the first byte also ends early when the
engine is taken out of the pool meanwhile (:func:`abort_waits`): once its health probes gave up
on it, nobody should wait out the rest of ``first_byte`` on it.

Pooled connections are kept shorter than an engine keeps them (uvicorn closes idle connections
after 5 s): reusing a connection the engine is closing at that moment fails the request as if the
engine were dead, and a partitioned engine's close is never seen at all.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

__all__ = ["UpstreamTimeouts", "UpstreamTimeout", "Upstream", "UPSTREAM_ERRORS", "abort_waits"]

KEEPALIVE_S = 4.0
"""Idle pooled connections are closed after this: under the 5 s uvicorn (vLLM) keeps them."""


class UpstreamTimeout(TimeoutError):
    """An engine did not connect, start answering or go on answering within its bound."""


UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)
"""What a failed upstream call raises (``UpstreamTimeout`` and aiohttp's timeouts are both
``TimeoutError``s in Python 3.11+)."""


def abort_waits(waits: set[asyncio.Timeout]) -> None:
    """End every first-byte wait in ``waits`` now (their requests fail with
    :class:`UpstreamTimeout` and may be retried elsewhere). Call from the event loop."""
    if not waits:
        return
    now = asyncio.get_running_loop().time()
    for deadline in list(waits):
        try:
            deadline.reschedule(now)
        except RuntimeError:  # already expiring or left: nothing to end
            pass


@dataclass(frozen=True)
class UpstreamTimeouts:
    """Bounds, in seconds, of one upstream call (see the module docstring)."""

    connect: float = 5.0
    first_byte: float = 600.0
    idle: float = 60.0
    total: float = 600.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "idle", "total"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"upstream {name} timeout must be a positive number of "
                                 f"seconds, got {value!r}")


class Upstream:
    """One pooled HTTP client for every engine, with :class:`UpstreamTimeouts` enforced."""

    def __init__(self, timeouts: UpstreamTimeouts) -> None:
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        t = self.timeouts
        # sock_read is left unset: first byte and idle gaps are bounded separately below.
        timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300,
                                           keepalive_timeout=KEEPALIVE_S),
            auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def post(self, url: str, data: bytes, headers: dict[str, str], *,
                   waits: set[asyncio.Timeout] | None = None,
                   ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST and yield the response once its headers arrived (within ``first_byte``).

        While waiting, the deadline sits in ``waits``: whoever learns that the engine is gone
        (its health probes) ends the wait at once with :func:`abort_waits`.
        """
        assert self._session is not None, "upstream client not started"
        t = self.timeouts
        deadline = asyncio.timeout(t.first_byte)
        give_up_at = asyncio.get_running_loop().time() + t.first_byte
        try:
            async with deadline:
                if waits is not None:
                    waits.add(deadline)
                try:
                    response = await self._session.post(url, data=data, headers=headers)
                finally:
                    if waits is not None:
                        waits.discard(deadline)
        except aiohttp.ServerTimeoutError as exc:  # aiohttp's sock_connect bound
            raise UpstreamTimeout(f"no connection within {t.connect:g} s") from exc
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            if (deadline.when() or give_up_at) < give_up_at:
                raise UpstreamTimeout("given up: the instance was taken out while this request "
                                      "waited for its answer") from exc
            raise UpstreamTimeout(f"no response within {t.first_byte:g} s") from exc
        try:
            yield response
        finally:
            response.release()

    async def read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body, each piece within ``idle`` of the previous one."""
        parts = [piece async for piece in self.pieces(response)]
        return b"".join(parts)

    async def pieces(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body as it arrives; raises :class:`UpstreamTimeout` after ``idle`` s of silence.

        The deadline runs only while waiting for the engine, never while the caller handles a
        piece (a slow client is not the engine's fault).
        """
        idle = self.timeouts.idle
        while True:
            deadline = asyncio.timeout(idle)
            try:
                async with deadline:
                    piece = await response.content.readany()
            except TimeoutError as exc:
                if deadline.expired():
                    raise UpstreamTimeout(f"no data for {idle:g} s mid-answer") from exc
                raise  # aiohttp's total bound
            if not piece:
                return
            yield piece
