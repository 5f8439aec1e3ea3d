"""One request forwarded to an engine and its answer relayed to the client, failures included.

Why a module of its own: what the proxy owes a client when an engine fails depends on how far
the answer got. Before the first byte went out, the request can go to another instance of the
same role (any decode instance can load the prefilled KV from the store); once a stream is
flowing the status line is gone, and the stream must end with an SSE error event instead of
hanging or stopping without a word. Every wait on the engine is bounded by
:mod:`scheduler.proxy.upstream`, and a wait for an engine that the pool takes out meanwhile
ends at once (:attr:`Instance.waits`).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from scheduler.proxy.instances import Instance, InstancePool
from scheduler.proxy.upstream import UPSTREAM_ERRORS, Upstream

__all__ = ["Forwarder", "NotStarted"]

log = logging.getLogger(__name__)
_decode = msgspec.json.Decoder().decode
MAX_ATTEMPTS = 2
"""Instances one relayed request may try: a second one covers a dead or cut-off engine, more
would only multiply the wait on a pool that is failing as a whole."""


class NotStarted(Exception):
    """An engine failed before the client got anything: the request may go elsewhere."""


def _upstream_error(message: str) -> web.Response:
    body = {"error": {"message": message, "type": "upstream_error", "code": 502}}
    return web.json_response(body, status=502)


class Forwarder:
    """Sends requests to instances of ``pool`` through ``upstream``.

    ``on_answered(request_id)`` is called when an engine answered 200 in full (the Conductor's
    decode-finished feedback); ``observe_ttft(seconds)`` when the first piece of an answer is
    relayed.
    """

    def __init__(self, upstream: Upstream, pool: InstancePool, *,
                 on_answered: Callable[[str], None],
                 observe_ttft: Callable[[float], None]) -> None:
        self.upstream = upstream
        self.pool = pool
        self.on_answered = on_answered
        self.observe_ttft = observe_ttft

    async def post_json(self, inst: Instance, path: str, data: bytes,
                        headers: dict[str, str]) -> tuple[int, Any]:
        """POST to ``inst`` and return its status and parsed JSON answer (a prefill). Raises
        one of ``UPSTREAM_ERRORS`` when the engine fails or a bound fires."""
        inst.in_flight += 1
        try:
            async with self.upstream.post(f"{inst.url}{path}", data, headers,
                                          waits=inst.waits) as r:
                payload = await self.upstream.read(r)
                try:
                    return r.status, _decode(payload)
                except (msgspec.DecodeError, UnicodeDecodeError, ValueError):
                    text = payload.decode(errors="replace")
                    return 502, {"error": {"message": f"bad response from {inst.id}: {text[:200]}",
                                           "type": "upstream_error", "code": 502}}
        finally:
            inst.in_flight -= 1

    async def relay_with_retry(self, request: web.Request, inst: Instance, path: str,
                               data: bytes, headers: dict[str, str], stream: bool,
                               request_id: str, started: float) -> web.StreamResponse:
        """:meth:`relay`, again on another healthy instance of the same role when the first
        failed before the client got a byte; at most ``MAX_ATTEMPTS`` instances."""
        tried: set[str] = set()
        while True:
            tried.add(inst.id)
            try:
                return await self.relay(request, inst, path, data, headers, stream,
                                        request_id, started)
            except NotStarted as exc:
                others = [i for i in self.pool.healthy(inst.role) if i.id not in tried]
                if len(tried) >= MAX_ATTEMPTS or not others:
                    return _upstream_error(str(exc))
                log.warning("%s; retrying request %s elsewhere", exc, request_id)
                inst = min(others, key=lambda i: i.in_flight)

    async def relay(self, request: web.Request, inst: Instance, path: str, data: bytes,
                    headers: dict[str, str], stream: bool, request_id: str,
                    started: float) -> web.StreamResponse:
        """Forward ``data`` to ``inst`` and relay its answer: an SSE stream chunk by chunk as it
        arrives, a JSON answer in one piece (one write, no chunked encoding).

        Raises :class:`NotStarted` when the engine failed before anything was sent to the
        client; a failure mid-stream ends the stream with an SSE error event.
        """
        inst.in_flight += 1
        response: web.StreamResponse | None = None
        try:
            async with self.upstream.post(f"{inst.url}{path}", data, headers,
                                          waits=inst.waits) as upstream:
                ctype = upstream.headers.get("Content-Type", "application/json")
                if not stream or not ctype.startswith("text/event-stream"):
                    payload = await self.upstream.read(upstream)
                    self.observe_ttft(time.perf_counter() - started)
                    if upstream.status == 200:
                        self.on_answered(request_id)
                    return web.Response(body=payload, status=upstream.status,
                                        headers={"Content-Type": ctype,
                                                 "X-Request-Id": request_id})
                response = web.StreamResponse(status=upstream.status)
                response.headers["Content-Type"] = ctype
                response.headers["X-Request-Id"] = request_id
                first = True
                await response.prepare(request)
                async for chunk in self.upstream.pieces(upstream):
                    if first:
                        self.observe_ttft(time.perf_counter() - started)
                        first = False
                    try:
                        await response.write(chunk)
                    except ConnectionError:  # incl. aiohttp.ClientConnectionResetError
                        # The client went away: not the engine's fault. Releasing the unread
                        # upstream response (leaving this block) closes its connection, which
                        # cancels the engine's request.
                        log.debug("client of %s disconnected mid-stream", request_id)
                        return response
                try:
                    await response.write_eof()
                except ConnectionError:  # the client hung up after the last event: fine
                    log.debug("client of %s closed before the end of the stream", request_id)
                if upstream.status == 200:
                    self.on_answered(request_id)
                return response
        except UPSTREAM_ERRORS as exc:
            log.warning("request %s on %s failed: %r", request_id, inst.id, exc)
            self.pool.mark_failed(inst)
            message = f"instance {inst.id} failed: {type(exc).__name__}: {exc}"
            if response is None or not response.prepared:
                raise NotStarted(message) from exc
            # Mid-stream: the status line is gone; end the stream with a clean error event.
            event = {"error": {"message": message, "type": "upstream_error", "code": 502}}
            try:
                await response.write(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                pass
            return response
        finally:
            inst.in_flight -= 1
