"""The RPC layer end to end: real sockets, real servers (in-process and in a child process)."""
from __future__ import annotations

import asyncio
import os
import pickle
import time

import msgspec
import pytest

from transfer.rpc import (
    PROTOCOL_VERSION,
    ErrorCode,
    RpcAuthError,
    RpcClient,
    RpcConnectionError,
    RpcError,
    RpcServer,
    RpcTimeoutError,
)
from transfer.rpc.testing import (
    Echo,
    Empty,
    RawConnection,
    RpcServerProcess,
    ScriptedPeer,
    ServerInfo,
    Sleep,
    build_test_server,
    scripted_server,
)
from transfer.rpc.wire import Kind

pytestmark = pytest.mark.timeout(60)

SECRET = b"correct horse battery staple"


class WrongEcho(msgspec.Struct):
    seq: str


class Point(msgspec.Struct, frozen=True):
    x: float
    y: float


class Shape(msgspec.Struct):
    name: str
    points: list[Point]
    tags: dict[str, int]
    blob: bytes
    parent: Shape | None = None


def error_body(env) -> tuple[int, str]:
    code, message = msgspec.msgpack.decode(env.body)
    return code, message


@pytest.fixture
async def server():
    srv = build_test_server()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client(server):
    c = RpcClient("127.0.0.1", server.port)
    yield c
    await c.close()


# -- round trips --------------------------------------------------------------------------------


async def test_round_trip_sync_and_async_handlers(server, client):
    payload = os.urandom(1 << 20)
    assert await client.call("echo", Echo(7, payload), Echo) == Echo(7, payload)
    assert await client.call("echo_async", Echo(8, b"x"), Echo) == Echo(8, b"x")
    info = await client.call("info", Empty(), ServerInfo)
    assert info.pid == os.getpid()
    assert client.connected


async def test_nested_types_round_trip(server, client):
    shape = Shape("tri", [Point(0, 0), Point(1, 0), Point(0, 1)], {"a": 1}, b"\x00\xff",
                  parent=Shape("root", [], {}, b""))
    server.register("shape", Shape, Shape, lambda s: s)
    assert await client.call("shape", shape, Shape) == shape


async def test_hundreds_in_flight_on_one_connection_complete_out_of_order(server, client):
    n = 400
    order: list[int] = []

    async def one(i: int) -> None:
        # Later requests sleep less, so responses come back in roughly reverse order.
        resp = await client.call("sleep", Sleep(0.002 * ((n - i) % 50), seq=i), Sleep)
        assert resp.seq == i
        order.append(i)

    await asyncio.gather(*(one(i) for i in range(n)))
    assert sorted(order) == list(range(n))
    assert order != list(range(n))
    assert server.stats().connections_accepted == 1


async def test_many_clients_concurrently(server):
    clients = [RpcClient("127.0.0.1", server.port) for _ in range(20)]

    async def work(k: int, c: RpcClient) -> None:
        resps = await asyncio.gather(*(c.call("echo", Echo(k * 1000 + i), Echo) for i in range(25)))
        assert [r.seq for r in resps] == [k * 1000 + i for i in range(25)]

    try:
        await asyncio.gather(*(work(k, c) for k, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert server.stats().connections_accepted == 20


async def test_concurrent_first_calls_share_one_connection(server, client):
    resps = await asyncio.gather(*(client.call("echo", Echo(i), Echo) for i in range(50)))
    assert [r.seq for r in resps] == list(range(50))
    assert server.stats().connections_accepted == 1


async def test_per_connection_inflight_limit_applies_backpressure():
    running = 0
    peak = 0

    async def slow(req: Echo) -> Echo:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return req

    srv = RpcServer(max_inflight_per_connection=4)
    srv.register("slow", Echo, Echo, slow)
    await srv.start()
    try:
        async with RpcClient("127.0.0.1", srv.port) as c:
            resps = await asyncio.gather(*(c.call("slow", Echo(i), Echo) for i in range(60)))
        assert [r.seq for r in resps] == list(range(60))
        # Reading pauses once 4 handlers run; requests already read from the same chunk
        # still start, so allow for one socket read's worth beyond the limit.
        assert 4 <= peak < 60
    finally:
        await srv.stop()


# -- error replies ------------------------------------------------------------------------------


async def test_unknown_method_is_an_error_reply_and_connection_survives(server, client):
    with pytest.raises(RpcError) as ei:
        await client.call("no_such_method", Echo(), Echo)
    assert ei.value.code == ErrorCode.UNKNOWN_METHOD
    assert "no_such_method" in ei.value.message
    assert await client.call("echo", Echo(1), Echo) == Echo(1)
    assert server.stats().connections_accepted == 1


async def test_wrong_request_body_type_is_bad_request(server, client):
    with pytest.raises(RpcError) as ei:
        await client.call("echo", WrongEcho(seq="not an int"), Echo)
    assert ei.value.code == ErrorCode.BAD_REQUEST
    assert "$.seq" in ei.value.message and "Echo" in ei.value.message
    assert await client.call("echo", Echo(2), Echo) == Echo(2)


async def test_wrong_response_type_is_bad_response(server, client):
    with pytest.raises(RpcError) as ei:
        await client.call("echo", Echo(3), WrongEcho)
    assert ei.value.code == ErrorCode.BAD_RESPONSE
    assert await client.call("echo", Echo(4), Echo) == Echo(4)


@pytest.mark.parametrize("method", ["fail", "fail_async"])
async def test_handler_exception_becomes_internal_error(server, client, method, caplog):
    async def fail_async(req: Echo) -> Echo:
        raise ValueError(f"async fail {req.seq}")

    server.register("fail_async", Echo, Echo, fail_async)
    with pytest.raises(RpcError) as ei:
        await client.call(method, Echo(5), Echo)
    assert ei.value.code == ErrorCode.INTERNAL
    assert "ValueError" in ei.value.message and "5" in ei.value.message
    assert any("failed" in r.getMessage() for r in caplog.records)
    assert await client.call("echo", Echo(6), Echo) == Echo(6)
    assert server.stats().connections_accepted == 1


async def test_handler_rpc_error_keeps_application_code(server, client):
    with pytest.raises(RpcError) as ei:
        await client.call("app_error", Echo(42), Echo)
    assert ei.value.code == 1042
    assert ei.value.message == "application error 42"


async def test_handler_returning_wrong_type_is_internal(server, client):
    server.register("liar", Echo, Echo, lambda req: Empty())
    with pytest.raises(RpcError) as ei:
        await client.call("liar", Echo(), Echo)
    assert ei.value.code == ErrorCode.INTERNAL and "Empty" in ei.value.message


def test_register_validates_arguments():
    srv = RpcServer()
    srv.register("a", Echo, Echo, lambda r: r)
    with pytest.raises(ValueError, match="already registered"):
        srv.register("a", Echo, Echo, lambda r: r)
    with pytest.raises(ValueError):
        srv.register("", Echo, Echo, lambda r: r)
    with pytest.raises(ValueError):
        srv.register("x" * 300, Echo, Echo, lambda r: r)
    with pytest.raises(TypeError):
        srv.register("b", Echo, Echo, "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RpcServer(max_frame_size=10)
    with pytest.raises(ValueError):
        RpcServer(secret=b"")


# -- frame size limits --------------------------------------------------------------------------


async def test_oversize_request_fails_locally_and_connection_survives():
    srv = build_test_server(max_frame_size=64 << 10)
    await srv.start()
    try:
        async with RpcClient("127.0.0.1", srv.port) as c:
            assert await c.call("echo", Echo(1), Echo) == Echo(1)
            before = srv.stats().requests
            with pytest.raises(RpcError) as ei:
                await c.call("echo", Echo(2, b"x" * (100 << 10)), Echo)
            assert ei.value.code == ErrorCode.FRAME_TOO_LARGE
            assert "65536" in ei.value.message
            assert srv.stats().requests == before  # never sent
            just_fits = Echo(3, b"y" * (60 << 10))
            assert await c.call("echo", just_fits, Echo) == just_fits
    finally:
        await srv.stop()


async def test_response_over_client_limit_is_error_reply(server):
    server.register("blow_up", Echo, Echo, lambda r: Echo(r.seq, r.payload * 100))
    async with RpcClient("127.0.0.1", server.port, max_frame_size=64 << 10) as c:
        with pytest.raises(RpcError) as ei:
            await c.call("blow_up", Echo(1, b"z" * 1000), Echo)
        assert ei.value.code == ErrorCode.FRAME_TOO_LARGE
        assert await c.call("echo", Echo(2), Echo) == Echo(2)


async def test_oversize_length_prefix_gets_refusal_and_close():
    srv = build_test_server(max_frame_size=64 << 10)
    await srv.start()

    def abuse() -> tuple[list, list]:
        with RawConnection("127.0.0.1", srv.port) as raw:
            raw.handshake(None)
            raw.send(((64 << 10) + 1).to_bytes(4, "big") + b"\x00" * 100)
            after_auth = raw.recv_until_closed(timeout=5)
        with RawConnection("127.0.0.1", srv.port) as raw:  # before the handshake: 4 KiB cap
            raw.send((5000).to_bytes(4, "big"))
            before_auth = raw.recv_until_closed(timeout=5)
        return after_auth, before_auth

    try:
        after_auth, before_auth = await asyncio.to_thread(abuse)
        for frames in (after_auth, before_auth):
            assert len(frames) == 1 and frames[0].kind == Kind.ERROR
            assert error_body(frames[0])[0] == ErrorCode.FRAME_TOO_LARGE
        assert srv.stats().peak_receive_buffer <= 100
        async with RpcClient("127.0.0.1", srv.port) as c:
            assert await c.call("echo", Echo(1), Echo) == Echo(1)
    finally:
        await srv.stop()


# -- timeouts -----------------------------------------------------------------------------------


async def test_call_timeout_then_connection_still_usable(server, client):
    t0 = time.monotonic()
    with pytest.raises(RpcTimeoutError) as ei:
        await client.call("sleep", Sleep(1.0, seq=1), Sleep, timeout=0.1)
    assert time.monotonic() - t0 < 0.9
    assert isinstance(ei.value, TimeoutError) and ei.value.code == ErrorCode.TIMEOUT
    assert await client.call("echo", Echo(2), Echo) == Echo(2)
    await asyncio.sleep(1.0)  # the late response arrives and is dropped quietly
    assert await client.call("echo", Echo(3), Echo) == Echo(3)
    assert server.stats().connections_accepted == 1


async def test_mixed_timeouts_expire_exactly_the_slow_calls(server, client):
    async def one(i: int):
        slow, short = i % 2 == 1, i % 3 != 0
        try:
            resp = await client.call("sleep", Sleep(0.4 if slow else 0.0, seq=i), Sleep,
                                     timeout=0.15 if short else 5.0)
        except RpcTimeoutError:
            assert slow and short, i
        else:
            assert resp.seq == i and not (slow and short), i

    await asyncio.gather(*(one(i) for i in range(120)))
    for i in range(2000):  # finished calls' deadlines must not pile up
        await client.call("echo", Echo(i), Echo, timeout=30)
    assert len(client._conn._deadlines) < 100  # white-box: the one timer's heap stays bounded


async def test_backed_up_connection_times_out_instead_of_buffering_forever():
    async def never_reads(peer: ScriptedPeer) -> None:
        await peer.read()  # hello
        peer.send(Kind.HELLO, 0, "", [PROTOCOL_VERSION, 64 << 20, b"n" * 32, False])
        await asyncio.sleep(10)  # stop reading: the client's socket buffers fill up

    async with scripted_server(never_reads) as port:
        async with RpcClient("127.0.0.1", port) as c:
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(c.call("echo", Echo(i, b"p" * (1 << 20)), Echo, timeout=0.5) for i in range(48)),
                return_exceptions=True)
            assert all(isinstance(r, RpcTimeoutError) for r in results), results
            assert any("backed up" in str(r) for r in results)
            assert time.monotonic() - t0 < 3.0


async def test_connect_timeout_when_peer_never_answers_hello():
    # A listening socket nobody accepts on: TCP connects (backlog), the handshake never ends.
    import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    try:
        c = RpcClient("127.0.0.1", lsock.getsockname()[1], connect_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(RpcConnectionError, match="timed out"):
            await c.call("echo", Echo(), Echo)
        assert time.monotonic() - t0 < 2.0
        await c.close()
    finally:
        lsock.close()


async def test_connection_refused_is_connection_error():
    from transfer.testing import free_port

    c = RpcClient("127.0.0.1", free_port(), connect_timeout=2.0)
    with pytest.raises(RpcConnectionError, match="cannot connect"):
        await c.call("echo", Echo(), Echo)
    await c.close()


# -- restart and reconnect ----------------------------------------------------------------------


async def test_server_restart_fails_in_flight_and_client_reconnects(server):
    port = server.port
    c = RpcClient("127.0.0.1", port)
    try:
        assert await c.call("echo", Echo(1), Echo) == Echo(1)
        in_flight = asyncio.ensure_future(c.call("sleep", Sleep(30.0), Sleep, timeout=60))
        await asyncio.sleep(0.1)
        await server.stop()
        with pytest.raises(RpcConnectionError, match="lost"):
            await asyncio.wait_for(in_flight, 5)
        with pytest.raises(RpcConnectionError):
            await c.call("echo", Echo(2), Echo)
        again = build_test_server(port=port)
        await again.start()
        try:
            assert await c.call("echo", Echo(3), Echo) == Echo(3)
            assert again.stats().connections_accepted == 1
        finally:
            await again.stop()
    finally:
        await c.close()


async def test_killed_server_process_then_restart_on_same_port():
    proc = RpcServerProcess().start()
    try:
        c = RpcClient("127.0.0.1", proc.port)
        assert await c.call("echo", Echo(1), Echo) == Echo(1)
        in_flight = [asyncio.ensure_future(c.call("sleep", Sleep(30.0, seq=i), Sleep))
                     for i in range(10)]
        await asyncio.sleep(0.2)
        await asyncio.to_thread(proc.kill)
        results = await asyncio.wait_for(
            asyncio.gather(*in_flight, return_exceptions=True), 5)
        assert all(isinstance(r, RpcConnectionError) for r in results), results
        port = proc.port
        proc = await asyncio.to_thread(RpcServerProcess(port=port).start)
        assert await c.call("echo", Echo(2), Echo) == Echo(2)
        info = await c.call("info", Empty(), ServerInfo)
        assert info.pid == proc.pid
        await c.close()
    finally:
        proc.stop()


async def test_closed_client_fails_in_flight_and_refuses_new_calls(server):
    c = RpcClient("127.0.0.1", server.port)
    in_flight = asyncio.ensure_future(c.call("sleep", Sleep(30.0), Sleep))
    await asyncio.sleep(0.1)
    await c.close()
    with pytest.raises(RpcConnectionError, match="closed"):
        await asyncio.wait_for(in_flight, 5)
    with pytest.raises(RpcConnectionError, match="closed"):
        await c.call("echo", Echo(), Echo)


# -- errors -------------------------------------------------------------------------------------


def test_error_types_are_catchable_as_builtins_and_picklable():
    conn = RpcConnectionError("lost")
    assert isinstance(conn, ConnectionError) and isinstance(conn, RpcError)
    assert conn.code == ErrorCode.CONNECTION and conn.errno is None
    timeout = RpcTimeoutError("slow")
    assert isinstance(timeout, TimeoutError) and timeout.code == ErrorCode.TIMEOUT
    assert RpcAuthError("no").code == ErrorCode.UNAUTHENTICATED
    app = RpcError(1234, "custom")
    assert app.code == 1234 and str(app) == "custom [1234]"
    assert str(RpcError(ErrorCode.INTERNAL, "x")) == "x [INTERNAL]"
    for e in (conn, timeout, RpcAuthError("no"), app):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and back.code == e.code and back.message == e.message
