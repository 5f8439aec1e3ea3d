"""Property-based fuzzing of the proxy's HTTP front door: a live proxy in P/D mode over two real
upstream engines, attacked with raw HTTP (garbage, deep, huge, unicode and wrongly typed JSON,
missing fields, odd and repeated headers, broken framing, truncated bodies, unknown methods and
paths). Every answer is a 4xx (a JSON error from our handlers) or a normal answer, never a 5xx
or a hang, nothing broken is forwarded upstream, and the proxy still serves afterwards."""
from __future__ import annotations

import gzip
import json
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings

from _fuzz import FuzzViolation
from _fuzz_proxy import (DECODE_HOLD_KEY, MAX_IN_FLIGHT, _post, http_exchange, proxy_cases,
                         proxy_harness)

pytestmark = pytest.mark.timeout(90)
CI = settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
RSS_BOUND = 96 << 20


@pytest.fixture(scope="module", params=["estimate", "tokenizer"])
def proxy(request):
    tokenizer = request.getfixturevalue("tiny_model") if request.param == "tokenizer" else None
    with proxy_harness(tokenizer) as h:
        yield h


def test_proxy_answers_hostile_http_with_4xx(proxy):
    proxy.healthy()
    before = proxy.rss()

    @CI
    @given(case=proxy_cases)
    def attack(case):
        proxy.check(case)

    attack()
    proxy.healthy()
    assert proxy.rss() - before < RSS_BOUND


def test_in_flight_probe_sees_a_request_still_counted(proxy):
    """``healthy`` proves from outside the proxy's process that no request stays counted in
    flight; a request the proxy holds beyond the probe's own (here: one the decode engine sits
    on) is what a leaked count looks like to it."""
    decode = proxy.engines[1]
    held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        held.sendall(_post("/v1/completions", json.dumps(
            {"model": "mini", "prompt": "x", "max_tokens": 1, DECODE_HOLD_KEY: True}).encode()))
        deadline = time.monotonic() + 10
        while decode.holding != 1:
            assert time.monotonic() < deadline, "the decode engine never got the held request"
            time.sleep(0.02)
        with pytest.raises(FuzzViolation, match="held requests reached|still counts"):
            proxy._none_counted_in_flight(patience=1.0)
    finally:
        decode.release()
        held.close()
    proxy._none_counted_in_flight()


def test_withholding_a_body_takes_no_in_flight_slot(proxy):
    """Found by the fuzz run with the proxy in its own process: a client that sent headers and
    then withheld its body was counted in flight for as long as it liked, so MAX_IN_FLIGHT idle
    connections locked every other client out (503). Bodies are now read before counting."""
    held = []
    try:
        for _ in range(MAX_IN_FLIGHT + 4):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            held.append(s)
            s.sendall(_post("/v1/completions", b"", headers=[(b"Content-Length", b"100")]) + b"{")
        answer = http_exchange(proxy.port, _post(
            "/v1/completions", b'{"model":"mini","prompt":"probe","max_tokens":1}'))
        assert answer.status == 200, answer
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("header", [b"Expect: \xff\xfe", b"Expect: nope",
                                    b"Content-Encoding: deflate"])
def test_proxy_refuses_odd_expect_and_encoding_with_json(proxy, header):
    """Each used to be a 500 (aiohttp's Expect handler failing to encode its own error text, an
    undecodable body escaping the handler as RequestPayloadError)."""
    k, _, v = header.partition(b": ")
    raw = _post("/v1/completions", b'{"model":"mini","prompt":"x"}',
                headers=[(b"Content-Type", b"application/json"), (k, v)])
    answer = http_exchange(proxy.port, raw)
    assert answer.status in (400, 417)
    assert json.loads(answer.body)["error"]["code"] == answer.status


@pytest.mark.parametrize("body, length, statuses", [
    (b'{"model":"mini","prompt":"hi","max_tokens":2}', None, {200}),
    (b'{"model":"mini","prompt":5}', None, {400}),
    (b'{"model":"mini","p', 32, {0, 400}),  # short of its Content-Length: our EOF ends it
])
def test_expect_100_continue_is_judged_by_the_final_answer(proxy, body, length, statuses):
    """Found by the 100k-case run: the harness took ``100 Continue`` for the answer, so it never
    sent EOF for a short body (a 5 s "hang") and judged complete requests by status 100."""
    headers = [(b"Content-Type", b"application/json"), (b"Expect", b"100-continue"),
               (b"Content-Length", str(length or len(body)).encode())]
    assert http_exchange(proxy.port, _post("/v1/completions", body, headers=headers)).status \
        in statuses


@pytest.mark.parametrize("raw", [
    b"HEAD /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\nExpect: \r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
    b"Transfer-Encoding: gzip, chunked\r\n\r\n2147",
])
def test_an_answer_to_head_is_whole_without_a_body(proxy, raw):
    """Found by the 100k-case run with the proxy in its own process: the proxy answers a HEAD
    whose chunked body never comes at once (headers, a Content-Length, no body, as HTTP says)
    and waits for the rest of that body, and the harness waited for the body the answer
    announced: five 5 s "hangs" in 100k cases."""
    t0 = time.monotonic()
    answer = http_exchange(proxy.port, raw)
    assert answer.status in (200, 405) and answer.body == b""
    assert time.monotonic() - t0 < 2.5


def test_gzip_body_is_forwarded_decoded(proxy):
    """A compressed request body is decoded once: the engine must not see Content-Encoding."""
    body = gzip.compress(json.dumps({"model": "mini", "prompt": "zip", "max_tokens": 2}).encode())
    raw = _post("/v1/completions", body, headers=[(b"Content-Type", b"application/json"),
                                                  (b"Content-Encoding", b"gzip")])
    answer = http_exchange(proxy.port, raw)
    assert answer.status == 200, answer.body


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/completions", {"prompt": [1, 2, 1 << 40]}, "token ids"),
    ("/v1/completions", {"prompt": [-1]}, "token ids"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "'stream'"),
    ("/v1/completions", {"prompt": "x", "cache_salt": 7}, "'cache_salt'"),
    # Found by the 100k-case run: a null max_tokens let this reach the Conductor (a 500).
    ("/v1/completions", {"prompt": "x", "max_tokens": None, "max_completion_tokens": -4},
     "'max_completion_tokens'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, "'max_completion_tokens'"),
    ("/v1/chat/completions", {"messages": [{"role": 3, "content": "x"}]}, "'role'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "'content'"),
    ("/v1/chat/completions", {"messages": [{"role": "user",
                                            "content": [[[[["x"]]]]] * 3}]}, "'content'"),
])
def test_bodies_the_proxy_cannot_route_get_400(proxy, path, body, fragment):
    answer = http_exchange(proxy.port, _post(path, json.dumps({"model": "mini", **body}).encode()))
    assert answer.status == 400, answer.body
    assert fragment in json.loads(answer.body)["error"]["message"]


async def test_connect_with_non_utf8_expect_gets_json_errors() -> None:
    """Found by the long fuzz run: CONNECT's target matches no route, and aiohttp's own route
    answered a non-UTF-8 Expect header with a 500. Every request now reaches our handlers."""
    import asyncio

    from scheduler.proxy import Proxy, ProxySettings
    from scheduler.proxy.instances import InstanceSpec
    from scheduler.testing import MiniEngine

    engine = await MiniEngine().start()
    proxy = Proxy([InstanceSpec(engine.url, "mixed")], settings=ProxySettings(port=0))
    await proxy.start()
    try:
        host, port = proxy.url.split("//")[1].split(":")
        for expect, status in ((b"Expect: \xff\xfe\r\n", b"417"), (b"", b"404")):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"CONNECT /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         + expect + b"Content-Length: 2\r\n\r\n{}")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
            assert b"application/json" in answer
    finally:
        await proxy.stop()
        await engine.stop()


async def test_a_request_id_already_in_flight_gets_409() -> None:
    """Found by the 100k-case run in lanes (a serial run never has two requests in flight): a
    request carrying the X-Request-Id of one still in flight got a 500, the Conductor's
    "already in flight" error escaping the handler. It is now a JSON 409."""
    import asyncio

    import aiohttp

    from scheduler.proxy import Proxy, ProxySettings
    from scheduler.proxy.instances import InstanceSpec
    from scheduler.testing import MiniEngine

    engine = await MiniEngine().start()
    proxy = Proxy([InstanceSpec(engine.url, "mixed")], settings=ProxySettings(port=0))
    await proxy.start()
    url = proxy.url + "/v1/completions"
    same = {"X-Request-Id": "fuzz-same-id"}
    quick = {"model": "mini", "prompt": "y", "max_tokens": 1}
    slow = {"model": "mini", "prompt": "x", "max_tokens": 4, "stream": True,
            "mini_token_interval": 0.5}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            for _ in range(100):  # until the proxy has seen its engine healthy
                async with session.post(url, json=quick) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            async with session.post(url, json=slow, headers=same) as first:
                assert first.status == 200
                async with session.post(url, json=quick, headers=same) as second:
                    assert second.status == 409
                    assert "already in flight" in (await second.json())["error"]["message"]
                await first.read()
            async with session.post(url, json=quick, headers=same) as third:
                assert third.status == 200  # the id is free again once the first is done
    finally:
        await proxy.stop()
        await engine.stop()
