"""The OpenAI-compatible proxy: one HTTP front door, the Conductor deciding where each request runs.

Flow for a P/D request (the ``kv_transfer_params`` protocol of the connector):

1. Tokenize and hash the prompt into block keys; ask the store which exist (one batch call).
2. The Conductor picks a prefill and a decode instance, or rejects at once (HTTP 429).
3. Prefill: the request with ``max_tokens=1``, ``stream=false``, no ``stream_options`` and
   ``kv_transfer_params={"do_remote_decode": true}``. A connection failure or a timeout (every
   upstream wait is bounded, see :mod:`scheduler.proxy.upstream`) marks the instance down and
   retries on another prefill instance.
4. Decode: the original request plus the ``kv_transfer_params`` the prefill answered, with the
   same ``X-Request-Id``; its answer (SSE or JSON) is relayed to the client as it arrives. A
   decode instance failing before the client got a byte is replaced by another one (once); one
   failing mid-stream ends the stream with an SSE error event.

Mixed mode (no P/D split) sends the whole request to the one instance the Conductor picked.

Per-request cost is kept small on purpose (the proxy must add under 2 ms): the client's body is
parsed once (msgspec) and forwarded as the raw bytes it came in, the decode side's
``kv_transfer_params`` spliced in without re-encoding; upstream connections are kept alive and
pooled; JSON answers are relayed in one write; metrics children are bound once; no per-request
logging. Hot-spot replication (``Decision.replicate_blocks``) runs as a bounded background task.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_urldispatcher import (AbstractMatchInfo, AbstractRoute, MatchInfoError,
                                      UrlMappingMatchInfo)

from scheduler.policy import (
    Conductor,
    ConductorConfig,
    ConductorError,
    InstanceInfo,
    RequestInfo,
    Role,
)
from scheduler.proxy.discovery import EtcdDiscovery
from scheduler.proxy.forward import Forwarder
from scheduler.proxy.instances import Instance, InstancePool, InstanceSpec
from scheduler.proxy.metrics import ProxyMetrics
from scheduler.proxy.prompt import BadRequest, PromptHasher
from scheduler.proxy.upstream import UPSTREAM_ERRORS, Upstream, UpstreamTimeouts
from store.keys import KeyNamespace

__all__ = ["ProxySettings", "Proxy", "StoreLookup", "Replicator"]

log = logging.getLogger(__name__)


class _MalformedRequestLog(logging.Filter):
    """aiohttp logs every request it cannot parse with a full traceback (~0.7 KB): anyone who
    can reach the port could fill the disk. Those client errors become one line; server-side
    errors keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            record.args = (record.getMessage(), type(exc).__name__, exc.code)
            record.msg = "%s: %s (HTTP %s)"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_AIOHTTP_SERVER_LOG = logging.getLogger("aiohttp.server")
if not any(isinstance(f, _MalformedRequestLog) for f in _AIOHTTP_SERVER_LOG.filters):
    _AIOHTTP_SERVER_LOG.addFilter(_MalformedRequestLog())
StoreLookup = Callable[[Sequence[str]], Awaitable[Sequence[bool]]]
Replicator = Callable[[Sequence[str], Instance], Awaitable[None]]
"""Make a replica of each key on the store node next to the instance (hot-spot replication)."""
STORE_ID = "store"
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
              "upgrade", "te", "trailer", "proxy-authorization", "proxy-authenticate",
              "accept-encoding", "content-encoding"}
"""Not forwarded; Content-Encoding because the body is forwarded as aiohttp decoded it."""


@dataclass(frozen=True)
class ProxySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_in_flight: int = 1024
    max_body_bytes: int = 16 << 20
    body_timeout: float = 30.0
    """Longest a client may take to send its request body (408 after it). A request counts
    towards ``max_in_flight`` only once its body is in, so clients that send headers and then
    withhold the body cannot fill the proxy's slots; this bounds how long they hold a socket."""
    request_timeout: float = 600.0
    """Bound of one whole upstream exchange (a stream included)."""
    connect_timeout: float = 5.0
    """Bound of the TCP connect to an engine."""
    first_byte_timeout: float = 600.0
    """Bound from sending a request to an engine to its response headers (a prefill, or the
    whole generation of a non-streamed answer: hence as long as the total by default). A dead
    or cut-off engine ends these waits sooner: once its health probes take it out."""
    idle_timeout: float = 60.0
    """Longest silence of an engine mid-answer (between two pieces of a stream or a body)."""
    health_interval: float = 2.0
    health_timeout: float = 2.0
    """Bound of one health probe; three missed in a row (or one refused) take an engine out."""
    etcd_endpoints: str | None = None
    """Discover instances under ``mooncake/instances/`` in this etcd (comma-separated)."""
    discovery_interval: float = 1.0
    max_replications: int = 4
    """Hot-spot replications in flight at once; more are dropped (they are an optimisation)."""
    index_capacity_blocks: int = 1_000_000
    """Bound of each instance's (and the store's) block index: the least recently used blocks
    are forgotten beyond it, so the proxy's memory stays bounded however long it runs."""


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _with_field(raw: bytes, body: dict[str, Any], name: str, value: Any) -> bytes:
    """``raw`` with one more top-level field, without re-serialising the client's body.

    Only when the field is absent (so no key is duplicated) and ``raw`` is the object ``body``
    was parsed from; otherwise the body is encoded afresh.
    """
    end = raw.rstrip()
    if body and name not in body and end.endswith(b"}"):
        return b"".join((end[:-1], b',"', name.encode(), b'":', _encode(value), b"}"))
    return _encode(dict(body, **{name: value}))


def _error(status: int, message: str, kind: str = "invalid_request_error",
           **extra: Any) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    return web.json_response(body, status=status)


async def _expect(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` as aiohttp does it, anything else a JSON 417.

    Why not aiohttp's default handler: it echoes the header into its error text, and a value
    that is not UTF-8 then fails to encode, which aiohttp answers with a 500.
    """
    if request.version != (1, 1):
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the answer's size
        return None
    return _error(417, "only 'Expect: 100-continue' is supported", "expectation_failed")


class _Router(web.UrlDispatcher):
    """A router under which every request reaches our catch-all route (and so our Expect check).

    Why: a ``CONNECT`` request's authority-form target matches no path, so aiohttp answers it on
    a system route with its default Expect handler, which fails with a 500 on a header value that
    is not UTF-8 (found by fuzzing). Anything that matches nothing goes to ``fallback`` instead.
    """

    fallback: AbstractRoute | None = None

    async def resolve(self, request: web.Request) -> AbstractMatchInfo:
        match = await super().resolve(request)
        if isinstance(match, MatchInfoError) and self.fallback is not None:
            return UrlMappingMatchInfo({"tail": ""}, self.fallback)
        return match


class Proxy:
    """Owns the HTTP server, the instance pool and the Conductor (see the module docstring)."""

    def __init__(self, instances: Sequence[InstanceSpec], *, settings: ProxySettings | None = None,
                 conductor: ConductorConfig | None = None, hasher: PromptHasher | None = None,
                 store_lookup: StoreLookup | None = None,
                 replicator: Replicator | None = None) -> None:
        self.settings = settings or ProxySettings()
        self.hasher = hasher or PromptHasher(None)
        base = conductor or ConductorConfig()
        if base.block_tokens != self.hasher.block_tokens:
            base = replace(base, block_tokens=self.hasher.block_tokens)
        self.conductor = Conductor(base)
        self.conductor.add_instance(InstanceInfo(
            STORE_ID, Role.STORE, cache_capacity_blocks=self.settings.index_capacity_blocks))
        self.store_lookup = store_lookup
        self.replicator = replicator
        self.metrics = ProxyMetrics()
        # Bound once: a labelled child looked up per request costs more than the observation.
        self._ttft_observe = self.metrics.ttft.observe
        self._decide_observe = self.metrics.stage.labels(stage="decide").observe
        self._counters: dict[tuple[str, int], Callable[[], None]] = {}
        self.pool = InstancePool(instances, interval=self.settings.health_interval,
                                 timeout=self.settings.health_timeout,
                                 on_change=self._instance_changed)
        for spec in instances:
            if spec.namespace:
                self.learn_namespace(spec.namespace, spec.id)
        self.pd = any(s.role != "mixed" for s in instances)
        self.discovery: EtcdDiscovery | None = None
        if self.settings.etcd_endpoints:
            self.discovery = EtcdDiscovery(self.settings.etcd_endpoints, on_add=self.add_instance,
                                           on_remove=self.remove_instance,
                                           interval=self.settings.discovery_interval)
        self._in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._replicating: set[asyncio.Task[None]] = set()
        s = self.settings
        self.upstream = Upstream(UpstreamTimeouts(
            connect=s.connect_timeout, first_byte=s.first_byte_timeout, idle=s.idle_timeout,
            total=s.request_timeout))
        self.forward = Forwarder(
            self.upstream, self.pool, observe_ttft=self._ttft_observe,
            on_answered=lambda rid: self._feedback(self.conductor.on_decode_finished, rid))
        self._runner: web.AppRunner | None = None
        self.port = self.settings.port

    # ---- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        # The auth middleware only when a key is set: every middleware costs every request.
        router = _Router()
        app = web.Application(router=router, client_max_size=self.settings.max_body_bytes,
                              middlewares=[self._auth_middleware] if self.settings.api_key else [])
        app.router.add_post("/v1/completions", self._completions, expect_handler=_expect)
        app.router.add_post("/v1/chat/completions", self._chat, expect_handler=_expect)
        app.router.add_get("/v1/models", self._models, expect_handler=_expect)
        app.router.add_get("/health", self._health, expect_handler=_expect)
        app.router.add_get("/metrics", self._metrics, expect_handler=_expect)
        # Last: every other method and path gets a JSON error, through the same Expect check.
        router.fallback = app.router.add_route("*", "/{tail:.*}", self._no_route,
                                               expect_handler=_expect)
        return app

    async def start(self) -> None:
        # The tokenizer loads lazily; loaded by the first request, its import (transformers,
        # seconds) stalled the event loop - every request and health probe - right then.
        await asyncio.to_thread(self.hasher.token_ids, {"prompt": "warm-up"}, False)
        await self.upstream.start()
        await self.pool.start()
        if self.discovery is not None:
            await self.discovery.start()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        server = site._server  # aiohttp exposes the bound socket only here
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.discovery is not None:
            await self.discovery.stop()
        for task in [*self._replicating, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._replicating, *self._tasks, return_exceptions=True)
        await self.pool.stop()
        await self.upstream.close()

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def add_instance(self, spec: InstanceSpec) -> None:
        """Add (or update) an instance at run time; it gets traffic once a probe passes."""
        inst = self.pool.add(spec)
        if spec.namespace:
            self.learn_namespace(spec.namespace, spec.id)
        self.pd = any(i.role != "mixed" for i in self.pool)
        if self.pool.started:
            task = asyncio.create_task(self.pool.check(inst), name=f"probe-{spec.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def remove_instance(self, instance_id: str) -> None:
        """Drop an instance (its etcd record vanished); in-flight requests finish or fail."""
        self.pool.remove(instance_id)
        self.pd = any(i.role != "mixed" for i in self.pool)

    def learn_namespace(self, namespace: Any, instance_id: str) -> None:
        """Adopt the key namespace an instance's connector uses (config, etcd or its answer).

        The proxy hashes prompts before it picks an instance, so it hashes with one namespace:
        the first it learns (or ``--namespace``). An instance announcing another one is served,
        but without cache awareness, and that is logged once.
        """
        inst = self.pool.get(instance_id)
        if inst is None or not isinstance(namespace, dict) or inst.namespace == namespace:
            return
        try:
            ns = KeyNamespace.from_dict(namespace)
        except (TypeError, ValueError) as exc:
            log.warning("instance %s announced a bad key namespace: %s", instance_id, exc)
            return
        inst.namespace = dict(namespace)
        if self.hasher.namespace is None:
            self.hasher.namespace = ns
            self.conductor.config = replace(self.conductor.config, block_tokens=ns.block_size)
            log.info("hashing prompts in namespace %s (learned from %s)", ns.namespace_id,
                     instance_id)
        elif self.hasher.namespace != ns:
            log.warning("instance %s uses key namespace %s, the proxy hashes in %s: its cache "
                        "is invisible to routing", instance_id, ns.namespace_id,
                        self.hasher.namespace.namespace_id)

    def _instance_changed(self, inst: Instance) -> None:
        role = {"prefill": Role.PREFILL, "decode": Role.DECODE, "mixed": Role.MIXED}[inst.role]
        if inst.healthy:
            if inst.id not in self.conductor.instances:
                self.conductor.add_instance(InstanceInfo(
                    inst.id, role, cache_capacity_blocks=self.settings.index_capacity_blocks))
        elif inst.id in self.conductor.instances:
            for request_id in self.conductor.remove_instance(inst.id):
                log.info("request %s lost its instance %s", request_id, inst.id)
        self.metrics.healthy.labels(role=inst.role).set(len(self.pool.healthy(inst.role)))

    # ---- middleware and simple endpoints -----------------------------------------------------

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        key = self.settings.api_key
        if key and request.path.startswith("/v1/"):
            import hmac

            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return _error(401, "missing or wrong API key", "authentication_error")
        return await handler(request)

    async def _no_route(self, request: web.Request) -> web.Response:
        if request.path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                            "/metrics"):
            return _error(405, f"method {request.method} not allowed on {request.path}")
        return _error(404, f"no endpoint {request.path[:200]}", "not_found")

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "mooncake"} for m in self.pool.models()]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        roles = ("prefill", "decode") if self.pd else ("mixed",)
        ready = all(self.pool.healthy(r) for r in roles)
        body = {"status": "ok" if ready else "degraded",
                "instances": {i.id: i.healthy for i in self.pool}}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "/v1/completions", chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "/v1/chat/completions", chat=True)

    # ---- the request path --------------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        """The parsed body (validated) and its raw bytes, which are forwarded as they came."""
        try:
            raw = await request.read()
        except RequestPayloadError as exc:  # e.g. a body that is not the Content-Encoding
            raise BadRequest(f"cannot read the body: {exc}") from exc
        try:
            body = _decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required")
        models = self.pool.models()
        if models and model not in models:
            raise LookupError(f"model {model!r} is not served here; available: {models}")
        # Both spellings: routing reads whichever is set (a null max_tokens used to let a
        # negative max_completion_tokens through to the Conductor, a 500).
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None and (type(value) is not int or value < 1):
                raise BadRequest(f"'{name}' must be a positive integer")
        return body, raw

    async def _serve(self, request: web.Request, path: str, chat: bool) -> web.StreamResponse:
        started = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                body, raw = await self._read_body(request)
        except TimeoutError:
            response = _error(408, f"request body not received within "
                                   f"{self.settings.body_timeout:g}s", "timeout")
            response.force_close()  # the rest of the body may still come: drop the connection
            return self._count(endpoint, response)
        except web.HTTPRequestEntityTooLarge:
            return self._count(endpoint, _error(413, "request body too large"))
        except BadRequest as exc:
            return self._count(endpoint, _error(400, str(exc)))
        except LookupError as exc:
            return self._count(endpoint, _error(404, str(exc), "model_not_found"))
        if self._in_flight >= self.settings.max_in_flight:
            self.metrics.requests.labels(endpoint=endpoint, status="503").inc()
            return _error(503, "proxy overloaded: too many requests in flight", "overloaded")
        self._in_flight += 1
        request_id = request.headers.get("X-Request-Id") or f"mc-{uuid.uuid4().hex}"
        try:
            try:
                prompt = self.hasher.analyze(body, chat)
            except BadRequest as exc:
                return self._count(endpoint, _error(400, str(exc)))
            response = await self._route_and_forward(request, path, body, raw, prompt,
                                                     request_id, started)
            return self._count(endpoint, response)
        finally:
            self._in_flight -= 1

    def _count(self, endpoint: str, response: web.StreamResponse) -> web.StreamResponse:
        inc = self._counters.get((endpoint, response.status))
        if inc is None:
            inc = self.metrics.requests.labels(endpoint=endpoint, status=str(response.status)).inc
            self._counters[(endpoint, response.status)] = inc
        inc()
        return response

    async def _route_and_forward(self, request: web.Request, path: str, body: dict[str, Any],
                                 raw: bytes, prompt: Any, request_id: str,
                                 started: float) -> web.StreamResponse:
        keys = list(prompt.block_keys)
        if keys and self.store_lookup is not None:
            t0 = time.perf_counter()
            try:
                hits = await asyncio.wait_for(self.store_lookup(keys), timeout=1.0)
                held = [k for k, hit in zip(keys, hits) if hit]
                self.conductor.on_blocks_evicted(STORE_ID, [k for k, hit in zip(keys, hits)
                                                            if not hit])
                self.conductor.on_blocks_cached(STORE_ID, held)
            except Exception as exc:  # the store is an optimisation: route without it
                log.warning("store lookup failed (%s); routing without it", exc)
            self.metrics.stage.labels(stage="store_lookup").observe(time.perf_counter() - t0)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        t0 = time.perf_counter()
        if not self.pool.healthy("prefill", "mixed") or (self.pd and not self.pool.healthy("decode")):
            return _error(503, "no healthy instance to serve this request", "unavailable")
        try:
            decision = self.conductor.decide(RequestInfo(
                request_id, keys, prompt.token_count,
                max_tokens if isinstance(max_tokens, int) else None))
        except ConductorError as exc:  # e.g. the client's X-Request-Id is already in flight
            return _error(409, str(exc), "conflict")
        self._decide_observe(time.perf_counter() - t0)
        if not decision.accepted:
            self.metrics.rejected.labels(reason=decision.reason.split(":")[0][:40]).inc()
            return _error(429, f"rejected: {decision.reason}", "rejected",
                          predicted_ttft_s=round(decision.predicted_ttft, 3))
        if decision.replicate_blocks:
            self._replicate(decision.replicate_blocks, decision.prefill_id or "")
        try:
            if self.pd:
                return await self._pd(request, path, body, raw, keys, request_id, decision,
                                      started)
            inst = self.pool.get(decision.prefill_id or "")
            if inst is None:
                return _error(503, "chosen instance vanished", "unavailable")
            self._feedback(self.conductor.on_prefill_started, request_id)
            resp = await self.forward.relay_with_retry(
                request, inst, path, raw, self._headers(request, request_id),
                bool(body.get("stream")), request_id, started)
            self.conductor.on_blocks_cached(inst.id, keys)
            return resp
        finally:
            self.conductor.on_request_dropped(request_id)

    async def _pd(self, request: web.Request, path: str, body: dict[str, Any], raw: bytes,
                  keys: list[str], request_id: str, decision: Any,
                  started: float) -> web.StreamResponse:
        prefill_body = dict(body, max_tokens=1, stream=False,
                            kv_transfer_params={"do_remote_decode": True})
        if "max_completion_tokens" in body:
            prefill_body["max_completion_tokens"] = 1
        prefill_body.pop("stream_options", None)
        prefill_raw = _encode(prefill_body)
        tried: set[str] = set()
        prefill_id = decision.prefill_id
        params: dict[str, Any] | None = None
        while prefill_id is not None and prefill_id not in tried:
            tried.add(prefill_id)
            inst = self.pool.get(prefill_id)
            if inst is None:
                break
            self._feedback(self.conductor.on_prefill_started, request_id)
            t0 = time.perf_counter()
            try:
                status, answer = await self.forward.post_json(
                    inst, path, prefill_raw, self._headers(request, request_id))
            except UPSTREAM_ERRORS as exc:
                log.warning("prefill on %s failed (%r); retrying elsewhere", inst.id, exc)
                self.pool.mark_failed(inst)
                others = [i for i in self.pool.healthy("prefill") if i.id not in tried]
                prefill_id = min(others, key=lambda i: i.in_flight).id if others else None
                continue
            if status != 200:
                return web.json_response(answer, status=status)
            self._feedback(self.conductor.on_prefill_finished, request_id, time.perf_counter() - t0)
            self.conductor.on_blocks_cached(inst.id, keys)
            self.metrics.stage.labels(stage="prefill").observe(time.perf_counter() - t0)
            params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
            if isinstance(params, dict) and "kv_namespace" in params:
                self.learn_namespace(params["kv_namespace"], inst.id)
            break
        if params is None and prefill_id is None:
            return _error(502, "every prefill instance failed", "upstream_error")
        decode = self.pool.get(decision.decode_id or "")
        if decode is None or not decode.healthy:
            healthy = self.pool.healthy("decode")
            if not healthy:
                return _error(503, "no healthy decode instance", "unavailable")
            decode = min(healthy, key=lambda i: i.in_flight)
        decode_raw = raw if params is None else _with_field(raw, body, "kv_transfer_params", params)
        self._feedback(self.conductor.on_decode_started, request_id)
        # Any decode instance can load the prefilled KV (it is in the store): one that fails
        # before answering is replaced by another.
        return await self.forward.relay_with_retry(
            request, decode, path, decode_raw, self._headers(request, request_id),
            bool(body.get("stream")), request_id, started)

    def _replicate(self, keys: Sequence[str], instance_id: str) -> None:
        """Hot-spot replication, off the request's path: a background task, at most
        ``max_replications`` at once (beyond that it is dropped: routing still works, the
        blocks are then read from their current holder)."""
        inst = self.pool.get(instance_id)
        if self.replicator is None or inst is None:
            self.metrics.replications.labels(outcome="skipped").inc()
            return
        if len(self._replicating) >= self.settings.max_replications:
            self.metrics.replications.labels(outcome="dropped").inc()
            return

        async def run() -> None:
            try:
                await asyncio.wait_for(self.replicator(list(keys), inst),  # type: ignore[misc]
                                       timeout=self.settings.request_timeout)
                self.metrics.replications.labels(outcome="done").inc()
            except Exception as exc:  # an optimisation that failed: log, count, carry on
                log.warning("replicating %d blocks next to %s failed: %s", len(keys), inst.id, exc)
                self.metrics.replications.labels(outcome="failed").inc()

        task = asyncio.create_task(run(), name=f"replicate-{instance_id}")
        self._replicating.add(task)
        task.add_done_callback(self._replicating.discard)

    def _feedback(self, fn: Callable[..., Any], *args: Any) -> None:
        """Tell the Conductor what happened. A request it no longer tracks (its instance left
        the pool meanwhile) is not an error for the client: the proxy carries on."""
        try:
            fn(*args)
        except ConductorError as exc:
            log.debug("conductor feedback skipped: %s", exc)

    def _headers(self, request: web.Request, request_id: str) -> dict[str, str]:
        drop = HOP_BY_HOP | {"x-request-id"} | ({"authorization"} if self.settings.api_key else set())
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        headers["X-Request-Id"] = request_id
        return headers
