"""HTTP metadata server and client, over real sockets (and a real subprocess for the CLI)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from transfer.metadata import (
    HttpMetadataClient,
    HttpMetadataServer,
    MetadataAuthError,
    MetadataError,
    MetadataStore,
    MetadataUnavailableError,
    segment_key,
)
from transfer.testing import free_port, stop_process

pytestmark = pytest.mark.timeout(60)

KEY = segment_key("10.0.0.1:12345")


@pytest.fixture
async def server() -> AsyncIterator[HttpMetadataServer]:
    srv = HttpMetadataServer("127.0.0.1", 0, max_value_size=1024, sweep_interval=0.05)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client(server: HttpMetadataServer) -> AsyncIterator[HttpMetadataClient]:
    c = HttpMetadataClient(server.url, max_value_size=1024)
    yield c
    await c.close()


@pytest.fixture
async def raw() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def test_client_satisfies_protocol(client: HttpMetadataClient) -> None:
    assert isinstance(client, MetadataStore)


async def test_get_put_delete_roundtrip(client: HttpMetadataClient) -> None:
    assert await client.get(KEY) is None
    await client.put(KEY, b'{"name": "seg"}')
    assert await client.get(KEY) == b'{"name": "seg"}'
    await client.put(KEY, b"\x00\xffbinary")
    assert await client.get(KEY) == b"\x00\xffbinary"
    assert await client.delete(KEY) is True
    assert await client.delete(KEY) is False
    assert await client.get(KEY) is None


async def test_versions_increase_and_are_never_reused(client: HttpMetadataClient) -> None:
    await client.put("k", b"1")
    _, v1 = await client.get_with_version("k")  # type: ignore[misc]
    await client.put("k", b"2")
    _, v2 = await client.get_with_version("k")  # type: ignore[misc]
    assert v2 > v1
    await client.delete("k")
    await client.put("k", b"1")
    _, v3 = await client.get_with_version("k")  # type: ignore[misc]
    assert v3 > v2, "a re-created key must not get an old version back (ABA)"


async def test_list_by_prefix(client: HttpMetadataClient) -> None:
    await client.put("mooncake/ram/a:1", b"A")
    await client.put("mooncake/ram/b:2", b"B")
    await client.put("mooncake/rpc_meta/a:1", b"R")
    await client.put("other", b"O")
    assert await client.list("mooncake/ram/") == {
        "mooncake/ram/a:1": b"A", "mooncake/ram/b:2": b"B",
    }
    assert await client.list("nothing/") == {}
    assert set(await client.list("")) == {
        "mooncake/ram/a:1", "mooncake/ram/b:2", "mooncake/rpc_meta/a:1", "other",
    }


async def test_keys_with_url_special_characters(client: HttpMetadataClient) -> None:
    odd = ["a+b", "a&b=c", "100%", "sp ace", "ü/ñ", "q?x#y", "mooncake/nvmeof/x;y"]
    for i, key in enumerate(odd):
        await client.put(key, str(i).encode())
    for i, key in enumerate(odd):
        assert await client.get(key) == str(i).encode(), key
    assert set(await client.list("")) == set(odd)


async def test_compare_and_set(client: HttpMetadataClient) -> None:
    assert await client.compare_and_set("cas", b"first", None) is True
    assert await client.compare_and_set("cas", b"again", None) is False
    value, version = await client.get_with_version("cas")  # type: ignore[misc]
    assert value == b"first"
    assert await client.compare_and_set("cas", b"second", version + 100) is False
    assert await client.compare_and_set("cas", b"second", version) is True
    assert await client.compare_and_set("cas", b"third", version) is False
    assert await client.get("cas") == b"second"
    with pytest.raises(ValueError):
        await client.compare_and_set("cas", b"x", 0)


async def test_concurrent_cas_has_exactly_one_winner(server: HttpMetadataServer) -> None:
    clients = [HttpMetadataClient(server.url) for _ in range(8)]
    try:
        await clients[0].put("leader", b"nobody")
        _, version = await clients[0].get_with_version("leader")  # type: ignore[misc]
        results = await asyncio.gather(
            *(c.compare_and_set("leader", f"c{i}".encode(), version) for i, c in enumerate(clients))
        )
        assert sum(results) == 1
        winner = results.index(True)
        assert await clients[1].get("leader") == f"c{winner}".encode()
        # Same for create-if-absent.
        created = await asyncio.gather(
            *(c.compare_and_set("fresh", f"c{i}".encode(), None) for i, c in enumerate(clients))
        )
        assert sum(created) == 1
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_wire_compatible_with_mooncake(
    server: HttpMetadataServer, raw: aiohttp.ClientSession
) -> None:
    """What Mooncake's C++ HTTPStoragePlugin does: plain GET/PUT/DELETE ?key=, 200/404."""
    url = server.url
    async with raw.get(url, params={"key": "mooncake/ram/h:1"}) as r:
        assert r.status == 404
    body = b'{"name":"h:1","protocol":"tcp","buffers":[]}'
    async with raw.put(url, params={"key": "mooncake/ram/h:1"}, data=body,
                       headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
        assert r.headers["ETag"].strip('"').isdigit()
    async with raw.get(url, params={"key": "mooncake/ram/h:1"}) as r:
        assert r.status == 200
        assert await r.read() == body
    async with raw.delete(url, params={"key": "mooncake/ram/h:1"}) as r:
        assert r.status == 200
    async with raw.delete(url, params={"key": "mooncake/ram/h:1"}) as r:
        assert r.status == 404
    async with raw.get(url) as r:
        assert r.status == 400
        assert "key is required" in await r.text()


async def test_list_wire_format(client: HttpMetadataClient, raw: aiohttp.ClientSession,
                                server: HttpMetadataServer) -> None:
    await client.put("p/b", b"\x01\x02")
    await client.put("p/a", b"x")
    async with raw.get(server.url, params={"prefix": "p/"}) as r:
        assert r.status == 200
        doc = json.loads(await r.read())
    assert [e["key"] for e in doc["entries"]] == ["p/a", "p/b"]
    assert base64.b64decode(doc["entries"][1]["value"]) == b"\x01\x02"
    assert all(isinstance(e["version"], int) and e["version"] > 0 for e in doc["entries"])


@pytest.mark.parametrize(
    ("params", "headers", "why"),
    [
        ({"key": ""}, {}, "key is required"),
        ({"key": "a\nb"}, {}, "control character"),
        ({"key": "x" * 1025}, {}, "limit is 1024"),
        ({"key": "k", "prefix": "p"}, {}, "either key or prefix"),
        ({"key": "k", "bogus": "1"}, {}, "unknown query parameter"),
    ],
)
async def test_bad_get_requests_are_400(server: HttpMetadataServer, raw: aiohttp.ClientSession,
                                        params: dict[str, str], headers: dict[str, str],
                                        why: str) -> None:
    async with raw.get(server.url, params=params, headers=headers) as r:
        assert r.status == 400
        assert why in await r.text()


@pytest.mark.parametrize(
    ("params", "headers", "why"),
    [
        ({"key": "k", "ttl": "-1"}, {}, "bad ttl"),
        ({"key": "k", "ttl": "nan"}, {}, "bad ttl"),
        ({"key": "k", "ttl": "soon"}, {}, "bad ttl"),
        ({"key": "k"}, {"If-Match": "abc"}, "version number"),
        ({"key": "k"}, {"If-None-Match": '"3"'}, "only If-None-Match: *"),
        ({"key": "k"}, {"If-Match": '"1"', "If-None-Match": "*"}, "not both"),
    ],
)
async def test_bad_put_requests_are_400(server: HttpMetadataServer, raw: aiohttp.ClientSession,
                                        params: dict[str, str], headers: dict[str, str],
                                        why: str) -> None:
    async with raw.put(server.url, params=params, headers=headers, data=b"v") as r:
        assert r.status == 400
        assert why in await r.text()
    assert server.table.get("k") is None


async def test_unsupported_method_is_405(
    server: HttpMetadataServer, raw: aiohttp.ClientSession
) -> None:
    async with raw.post(server.url, params={"key": "k"}, data=b"v") as r:
        assert r.status == 405


async def test_oversize_body_is_413_and_nothing_is_stored(
    server: HttpMetadataServer, raw: aiohttp.ClientSession, client: HttpMetadataClient
) -> None:
    async with raw.put(server.url, params={"key": "big"}, data=b"x" * 1025) as r:
        assert r.status == 413

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the stream is cut off
        for _ in range(4):
            yield b"y" * 512

    async with raw.put(server.url, params={"key": "big"}, data=chunked()) as r:
        assert r.status == 413
    assert await client.get("big") is None
    async with raw.put(server.url, params={"key": "big"}, data=b"x" * 1024) as r:
        assert r.status == 200  # exactly at the limit is fine


async def test_client_rejects_bad_input_before_sending(client: HttpMetadataClient) -> None:
    with pytest.raises(ValueError, match="limit is 1024"):
        await client.put("k", b"x" * 1025)
    with pytest.raises(ValueError, match="empty"):
        await client.get("")
    with pytest.raises(ValueError, match="bytes"):
        await client.put("k", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        await client.put("k", b"v", ttl=0)


async def test_server_limit_reported_by_client(server: HttpMetadataServer) -> None:
    async with HttpMetadataClient(server.url, max_value_size=4096) as c:
        with pytest.raises(MetadataError) as info:
            await c.put("k", b"x" * 2000)
        assert info.value.status == 413
        assert not isinstance(info.value, MetadataUnavailableError)


async def test_memory_budget_is_507() -> None:
    server = HttpMetadataServer("127.0.0.1", 0, max_total_bytes=100)
    async with server, HttpMetadataClient(server.url) as c:
        await c.put("a", b"x" * 50)
        with pytest.raises(MetadataError) as info:
            await c.put("b", b"x" * 60)
        assert info.value.status == 507
        await c.put("a", b"x" * 90)  # overwriting within budget still works


async def test_auth_required_when_secret_set(raw: aiohttp.ClientSession) -> None:
    async with HttpMetadataServer("127.0.0.1", 0, secret="s3cret-token") as srv:
        async with raw.get(srv.url, params={"key": "k"}) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == "Bearer"
        async with raw.get(srv.url, params={"key": "k"},
                           headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with raw.get(srv.url, params={"key": "k"},
                           headers={"Authorization": "Basic s3cret-token"}) as r:
            assert r.status == 401
        async with raw.get(srv.url, params={"key": "k"},
                           headers={"Authorization": "Bearer s3cret-token"}) as r:
            assert r.status == 404  # authenticated, key simply absent
        async with HttpMetadataClient(srv.url) as anonymous:
            with pytest.raises(MetadataAuthError, match="no secret configured"):
                await anonymous.put("k", b"v")
        async with HttpMetadataClient(srv.url, secret="nope") as wrong:
            with pytest.raises(MetadataAuthError):
                await wrong.get("k")
        async with HttpMetadataClient(srv.url, secret=b"s3cret-token") as good:
            await good.put("k", b"v")
            assert await good.get("k") == b"v"
        assert srv.table.get("k") is not None


def test_secret_must_be_header_safe() -> None:
    with pytest.raises(ValueError, match="visible ASCII"):
        HttpMetadataServer(secret="has space")
    with pytest.raises(ValueError, match="ASCII"):
        HttpMetadataClient("http://127.0.0.1:1/metadata", secret="clé")


async def test_unreachable_server_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/metadata"
    async with HttpMetadataClient(url, timeout=2.0) as c:
        started = time.monotonic()
        with pytest.raises(MetadataUnavailableError, match="unreachable"):
            await c.get("k")
        assert time.monotonic() - started < 2.5


async def test_silent_server_times_out() -> None:
    """A server that accepts but never answers costs at most the timeout."""
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.sleep(30)

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with HttpMetadataClient(f"http://127.0.0.1:{port}/metadata", timeout=0.5) as c:
            with pytest.raises(MetadataUnavailableError, match="did not answer"):
                await c.get("k")
    finally:
        silent.close()


async def test_oversize_response_is_refused() -> None:
    """A server sending more than the client's bound does not make it buffer everything."""
    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"z" * 5000)

    app = web.Application()
    app.router.add_get("/metadata", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with HttpMetadataClient(f"http://127.0.0.1:{port}/metadata",
                                      max_value_size=1000) as c:
            with pytest.raises(MetadataError, match="exceeds"):
                await c.get("k")
    finally:
        await runner.cleanup()


async def test_get_with_version_against_versionless_server() -> None:
    """Mooncake's own server sends no ETag: plain get works, versioned calls say why not."""
    store: dict[str, bytes] = {}

    async def mooncake_like(request: web.Request) -> web.Response:
        key = request.query.get("key", "")
        if request.method == "PUT":
            store[key] = await request.read()
            return web.Response(text="metadata updated")
        if key not in store:
            return web.Response(status=404, text="metadata not found")
        return web.Response(body=store[key])

    app = web.Application()
    app.router.add_route("*", "/metadata", mooncake_like)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with HttpMetadataClient(f"http://127.0.0.1:{port}/metadata") as c:
            await c.put("k", b"v")
            assert await c.get("k") == b"v"
            with pytest.raises(MetadataError, match="no usable version"):
                await c.get_with_version("k")
    finally:
        await runner.cleanup()


async def test_embedded_in_existing_app(raw: aiohttp.ClientSession) -> None:
    """The store master hosts the metadata API on its own aiohttp app."""
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    metadata = HttpMetadataServer(path="/metadata", sweep_interval=0.05)
    metadata.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with HttpMetadataClient(f"http://127.0.0.1:{port}/metadata") as c:
            await c.put("k", b"v")
            assert await c.get("k") == b"v"
            await c.put("short", b"v", ttl=0.2)
        # The client closed: its TTL key was released, and the sweeper runs under the app.
        assert metadata.table.get("short") is None
        async with raw.get(f"http://127.0.0.1:{port}/health") as r:
            assert await r.text() == "ok"
    finally:
        await runner.cleanup()


async def test_ttl_key_kept_alive_then_released_on_close(server: HttpMetadataServer) -> None:
    async with HttpMetadataClient(server.url) as owner:
        await owner.put("ephemeral", b"v", ttl=0.3)
        await asyncio.sleep(1.0)  # > 3 TTLs: only the keep-alive keeps it there
        assert server.table.get("ephemeral") is not None
        version_before = server.table.get("ephemeral").version  # type: ignore[union-attr]
    assert server.table.get("ephemeral") is None, "close() must release TTL keys"
    assert version_before > 0


async def test_ttl_key_expires_without_keepalive(server: HttpMetadataServer,
                                                 raw: aiohttp.ClientSession) -> None:
    async with raw.put(server.url, params={"key": "orphan", "ttl": "0.2"}, data=b"v") as r:
        assert r.status == 200
        version = r.headers["ETag"]
    async with raw.patch(server.url, params={"key": "orphan", "ttl": "0.2"},
                         headers={"If-Match": version}) as r:
        assert r.status == 200
    async with raw.patch(server.url, params={"key": "orphan", "ttl": "0.2"},
                         headers={"If-Match": '"999999"'}) as r:
        assert r.status == 412
    await asyncio.sleep(0.5)
    async with raw.get(server.url, params={"key": "orphan"}) as r:
        assert r.status == 404
    assert len(server.table) == 0, "the sweeper must purge expired keys"


async def test_rewriting_ttl_key_without_ttl_makes_it_permanent(
    server: HttpMetadataServer, client: HttpMetadataClient
) -> None:
    await client.put("k", b"v1", ttl=0.2)
    await client.put("k", b"v2")
    await asyncio.sleep(0.5)
    assert await client.get("k") == b"v2"


async def test_failed_cas_keeps_the_existing_keepalive(
    server: HttpMetadataServer, client: HttpMetadataClient
) -> None:
    await client.put("mine", b"v", ttl=0.3)
    assert await client.compare_and_set("mine", b"other", None, ttl=0.3) is False
    await asyncio.sleep(1.0)
    assert await client.get("mine") == b"v"


async def test_ttl_key_taken_over_is_not_clobbered(server: HttpMetadataServer) -> None:
    async with HttpMetadataClient(server.url) as a, HttpMetadataClient(server.url) as b:
        await a.put("claim", b"a", ttl=0.3)
        await b.put("claim", b"b")  # someone else rewrites it for good
        await asyncio.sleep(0.6)
        assert await b.get("claim") == b"b"
    assert await _get_direct(server, "claim") == b"b", "a's close must not delete b's value"


async def test_expired_ttl_key_is_republished_by_live_owner(server: HttpMetadataServer) -> None:
    """An owner cut off for longer than the TTL re-creates its key when it can again."""
    async with HttpMetadataClient(server.url) as owner:
        await owner.put("seg", b"desc", ttl=0.3)
        server.table.delete("seg")  # what expiry during a partition looks like to the owner
        await asyncio.sleep(0.5)
        assert await owner.get("seg") == b"desc"


async def test_standalone_server_subprocess(tmp_path: os.PathLike[str]) -> None:
    secret_file = os.path.join(tmp_path, "token")
    with open(secret_file, "w") as f:
        f.write("cli-token\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transfer.metadata", "--host", "127.0.0.1", "--port", "0",
         "--secret-file", secret_file, "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        url = _read_url(proc, timeout=20)
        assert url.endswith("/metadata")
        async with HttpMetadataClient(url, secret="cli-token") as c:
            await c.put(KEY, b"from-cli")
            assert await c.get(KEY) == b"from-cli"
            assert await c.compare_and_set(KEY, b"x", None) is False
        async with HttpMetadataClient(url) as anonymous:
            with pytest.raises(MetadataAuthError):
                await anonymous.get(KEY)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        stop_process(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_standalone_server_reports_port_in_use() -> None:
    port = free_port()
    blocker = subprocess.Popen(
        [sys.executable, "-m", "transfer.metadata", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _read_url(blocker, timeout=20)
        second = subprocess.run(
            [sys.executable, "-m", "transfer.metadata", "--port", str(port)],
            capture_output=True, timeout=20, text=True,
        )
        assert second.returncode == 1
        assert "cannot serve" in second.stderr
    finally:
        stop_process(blocker)
        if blocker.stdout:
            blocker.stdout.close()


async def test_dead_owner_ttl_key_disappears(server: HttpMetadataServer) -> None:
    """The point of TTLs: an engine killed with SIGKILL cannot clean up, its key still goes."""
    script = textwrap.dedent(f"""
        import asyncio
        from transfer.metadata import HttpMetadataClient
        async def main():
            c = HttpMetadataClient({server.url!r})
            await c.put("engine-desc", b"alive", ttl=0.5)
            print("published", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)  # type: ignore[union-attr]
        assert line.strip() == b"published"
        await asyncio.sleep(1.2)  # > 2 TTLs: alive thanks to the child's keep-alive
        assert await _get_direct(server, "engine-desc") == b"alive"
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while await _get_direct(server, "engine-desc") is not None:
            assert time.monotonic() < deadline, "dead owner's key did not expire"
            await asyncio.sleep(0.05)
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


async def test_closed_client_refuses_work(server: HttpMetadataServer) -> None:
    c = HttpMetadataClient(server.url)
    await c.put("k", b"v")
    await c.close()
    await c.close()  # idempotent
    with pytest.raises(MetadataError, match="closed"):
        await c.get("k")


@pytest.mark.parametrize("url", ["ftp://h/metadata", "http:///metadata", "http://h:1/m?x=1"])
def test_client_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        HttpMetadataClient(url)


async def _get_direct(server: HttpMetadataServer, key: str) -> bytes | None:
    entry = server.table.get(key)
    return None if entry is None else entry.value


def _read_url(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """First stdout line of ``python -m transfer.metadata``: the URL it serves."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("metadata server did not report its URL")
    line = proc.stdout.readline().decode().strip()
    assert line.startswith("metadata server listening on "), line
    return line.rsplit(" ", 1)[1]
