"""The proxy over real HTTP: P/D flow, mixed mode, streaming, errors, rejection, health, metrics."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from scheduler.policy import ConductorConfig
from scheduler.proxy import Proxy, ProxySettings
from scheduler.proxy.instances import InstanceSpec, parse_instance
from scheduler.testing import MiniEngine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def engines():
    started = [await MiniEngine().start() for _ in range(3)]
    yield started
    for e in started:
        await e.stop()


async def _proxy(specs, **kwargs) -> Proxy:
    settings = kwargs.pop("settings", ProxySettings(port=0, health_interval=0.2))
    proxy = Proxy(specs, settings=settings, **kwargs)
    await proxy.start()
    return proxy


async def test_pd_flow_sends_prefill_then_decode_with_transfer_params(engines):
    prefill, decode, _ = engines
    proxy = await _proxy([InstanceSpec(prefill.url, "prefill"), InstanceSpec(decode.url, "decode")])
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            r = await client.post("/v1/completions", headers={"X-Request-Id": "req-1"},
                                  json={"model": "mini", "prompt": "hello", "max_tokens": 5,
                                        "stream": False, "stream_options": {"include_usage": True}})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        (pre,) = prefill.requests
        assert pre["max_tokens"] == 1 and pre["stream"] is False and "stream_options" not in pre
        assert pre["kv_transfer_params"] == {"do_remote_decode": True}
        (dec,) = decode.requests
        assert dec["max_tokens"] == 5
        assert dec["kv_transfer_params"]["do_remote_prefill"] is True
        assert dec["kv_transfer_params"]["remote_engine"] == prefill.url
        assert prefill.headers[0]["x-request-id"] == decode.headers[0]["x-request-id"] == "req-1"
    finally:
        await proxy.stop()


async def test_streaming_chat_is_relayed_as_sse(engines):
    proxy = await _proxy([InstanceSpec(engines[0].url, "prefill"),
                          InstanceSpec(engines[1].url, "decode")])
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            async with client.stream("POST", "/v1/chat/completions",
                                     json={"model": "mini", "stream": True, "max_tokens": 3,
                                           "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert len(events) == 4
        assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == " tok"
        # A client hanging up at the end of a stream is not the engine's fault.
        assert len(proxy.pool.healthy("decode")) == 1
    finally:
        await proxy.stop()


async def test_mixed_mode_routes_to_one_instance(engines):
    proxy = await _proxy([parse_instance(f"mixed={e.url}") for e in engines[:2]])
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            for _ in range(4):
                r = await client.post("/v1/completions",
                                      json={"model": "mini", "prompt": "x", "max_tokens": 2})
                assert r.status_code == 200
        sent = [e.requests for e in engines[:2]]
        assert sum(len(s) for s in sent) == 4
        assert all("kv_transfer_params" not in b for s in sent for b in s)
    finally:
        await proxy.stop()


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": "x"}).encode(), 400, "'model'"),
    (json.dumps({"model": "mini"}).encode(), 400, "'prompt'"),
    (json.dumps({"model": "mini", "prompt": "x", "max_tokens": -3}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "mini", "prompt": "x", "max_tokens": True}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "not served"),
])
async def test_bad_requests_get_clear_4xx(engines, body, status, fragment):
    proxy = await _proxy([InstanceSpec(engines[0].url, "mixed")])
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            r = await client.post("/v1/completions", content=body,
                                  headers={"Content-Type": "application/json"})
            assert r.status_code == status
            assert fragment in r.json()["error"]["message"]
            ok = await client.post("/v1/completions", json={"model": "mini", "prompt": "x"})
            assert ok.status_code == 200  # the proxy is unharmed
    finally:
        await proxy.stop()


async def test_engine_error_status_is_passed_through(engines):
    engines[0].fail_status = 400
    proxy = await _proxy([InstanceSpec(engines[0].url, "mixed")])
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            r = await client.post("/v1/completions", json={"model": "mini", "prompt": "x"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "injected failure"
    finally:
        await proxy.stop()


async def test_engine_dying_mid_stream_gives_clean_error_event(engines):
    engines[1].die_after = 2
    proxy = await _proxy([InstanceSpec(engines[0].url, "prefill"),
                          InstanceSpec(engines[1].url, "decode")])
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            async with client.stream("POST", "/v1/completions",
                                     json={"model": "mini", "prompt": "x", "stream": True,
                                           "max_tokens": 6}) as r:
                events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert "error" in json.loads(events[-2][6:])
        assert not proxy.pool.get(f"decode@127.0.0.1:{engines[1].port}").healthy
    finally:
        await proxy.stop()


async def test_dead_prefill_is_retried_elsewhere_and_returns_when_healthy(engines):
    a, b, decode = engines
    proxy = await _proxy([InstanceSpec(a.url, "prefill", id="a"), InstanceSpec(b.url, "prefill", id="b"),
                          InstanceSpec(decode.url, "decode")])
    try:
        port_a = a.port
        await a.stop()  # dies after the pool saw it healthy
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            for _ in range(3):
                r = await client.post("/v1/completions",
                                      json={"model": "mini", "prompt": "x", "max_tokens": 2})
                assert r.status_code == 200, r.text
        assert len(b.requests) == 3 and not proxy.pool.get("a").healthy
        a.port = port_a
        await a.start()
        for _ in range(50):
            if proxy.pool.get("a").healthy:
                break
            await asyncio.sleep(0.1)
        assert proxy.pool.get("a").healthy
        assert "a" in proxy.conductor.instances
    finally:
        await proxy.stop()


async def test_predicted_slo_miss_is_rejected_with_429(engines):
    conductor = ConductorConfig(ttft_slo_s=1e-9, rejection="predictive")
    proxy = await _proxy([InstanceSpec(engines[0].url, "prefill"),
                          InstanceSpec(engines[1].url, "decode")], conductor=conductor)
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            r = await client.post("/v1/completions",
                                  json={"model": "mini", "prompt": "x" * 4000, "max_tokens": 2})
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rejected"
            metrics = (await client.get("/metrics")).text
        assert "mooncake_proxy_rejected_total" in metrics
        assert not engines[0].requests  # rejected before any engine work
    finally:
        await proxy.stop()


async def test_api_key_models_health(engines):
    proxy = await _proxy([InstanceSpec(engines[0].url, "mixed")],
                         settings=ProxySettings(port=0, api_key="sekret", health_interval=0.2))
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            assert (await client.get("/v1/models")).status_code == 401
            auth = {"Authorization": "Bearer sekret"}
            models = await client.get("/v1/models", headers=auth)
            assert [m["id"] for m in models.json()["data"]] == ["mini"]
            r = await client.post("/v1/completions", headers=auth,
                                  json={"model": "mini", "prompt": "x"})
            assert r.status_code == 200
            assert "authorization" not in engines[0].headers[-1]  # our key is not leaked upstream
            assert (await client.get("/health")).json()["status"] == "ok"
        await engines[0].stop()
        await proxy.pool.check_all()
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            assert (await client.get("/health")).status_code == 503
    finally:
        await proxy.stop()


async def test_overload_answers_503(engines):
    engines[0].delay = 0.5
    proxy = await _proxy([InstanceSpec(engines[0].url, "mixed")],
                         settings=ProxySettings(port=0, max_in_flight=2, health_interval=0.2))
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            results = await asyncio.gather(*(client.post(
                "/v1/completions", json={"model": "mini", "prompt": "x"}) for _ in range(5)))
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) == 2 and codes.count(503) == 3
    finally:
        await proxy.stop()


async def test_withheld_body_holds_no_slot_and_times_out(engines):
    """A client that sends headers and then withholds its body (slowloris) must not take an
    in-flight slot - 64 of them would otherwise lock everyone out with 503s - and is answered
    408 and disconnected once ``body_timeout`` passes."""
    proxy = await _proxy([InstanceSpec(engines[0].url, "mixed")],
                         settings=ProxySettings(port=0, max_in_flight=1, body_timeout=0.5,
                                                health_interval=0.2))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            r = await client.post("/v1/completions", json={"model": "mini", "prompt": "x"})
        assert r.status_code == 200, r.text  # the withheld request holds no slot
        answer = b""
        while b"}}" not in answer:  # the JSON error ends the answer
            chunk = await asyncio.wait_for(reader.read(4096), 5.0)
            assert chunk, f"closed without an answer: {answer!r}"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"Connection: close" in answer and b"not received within 0.5s" in answer
        writer.close()
    finally:
        await proxy.stop()


async def test_malformed_http_is_logged_in_one_line(engines, caplog):
    """aiohttp logs a traceback per unparsable request; the proxy keeps it to one line, so a
    client flooding it with garbage cannot flood the logs ~0.7 KB at a time."""
    import logging

    proxy = await _proxy([InstanceSpec(engines[0].url, "mixed")])
    try:
        with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5.0)
            writer.close()
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
        records = [r for r in caplog.records if r.name == "aiohttp.server"]
        assert records, "aiohttp logged nothing for the malformed request"
        for rec in records:
            assert rec.exc_info is None and rec.levelno == logging.WARNING
            assert "BadHttpMessage" in rec.getMessage() or "HTTP 400" in rec.getMessage()
    finally:
        await proxy.stop()


async def test_block_index_stays_bounded(engines):
    """Every prompt adds its blocks to the instance's index; beyond the bound the least recently
    used are forgotten, so a long-running proxy's memory does not grow without limit."""
    from scheduler.proxy.prompt import PromptHasher
    from store.keys import KeyNamespace

    ns = KeyNamespace(model="mini", kv_dtype="bf16", kv_layout="x", block_size=512)
    proxy = await _proxy([InstanceSpec(engines[0].url, "mixed", id="m")],
                         settings=ProxySettings(port=0, health_interval=0.2,
                                                index_capacity_blocks=8),
                         hasher=PromptHasher(ns))
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            for i in range(6):  # token-id prompts: 3 full 512-token blocks each, all different
                prompt = [1000 * i + j for j in range(3 * 512)]
                r = await client.post("/v1/completions",
                                      json={"model": "mini", "prompt": prompt, "max_tokens": 1})
                assert r.status_code == 200
        index = proxy.conductor.pool.index("m")
        assert len(index) == 8  # 18 blocks were served; the first ones were forgotten
        last = [1000 * 5 + j for j in range(3 * 512)]
        assert proxy.hasher.analyze({"prompt": last}, chat=False).block_keys[0] in index
    finally:
        await proxy.stop()


async def test_one_slow_health_probe_does_not_take_an_instance_out():
    """A busy engine may miss a probe deadline; only consecutive misses mark it down."""
    from aiohttp import web

    from scheduler.proxy.instances import InstancePool

    slow = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        if slow.is_set():
            await asyncio.sleep(1.0)
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    pool = InstancePool([InstanceSpec(f"http://127.0.0.1:{port}", "mixed", id="e")],
                        interval=3600, timeout=0.2, timeouts_before_down=3)
    try:
        await pool.start()
        inst = pool.get("e")
        assert inst.healthy
        slow.set()
        assert await pool.check(inst) and inst.healthy  # first miss: still in
        assert await pool.check(inst) and inst.healthy  # second miss: still in
        assert not await pool.check(inst) and not inst.healthy  # third in a row: out
        slow.clear()
        assert await pool.check(inst) and inst.healthy  # back when it answers
    finally:
        await pool.stop()
        await runner.cleanup()
