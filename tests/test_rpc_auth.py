"""Shared-secret authentication and the connect handshake, against real servers and
hand-scripted impostors."""
from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from transfer.rpc import PROTOCOL_VERSION, ErrorCode, RpcAuthError, RpcClient, RpcError
from transfer.rpc.testing import (
    Echo,
    RawConnection,
    ScriptedPeer,
    build_test_server,
    raw_frame,
    scripted_server,
)
from transfer.rpc.wire import Kind

pytestmark = pytest.mark.timeout(60)

SECRET = b"correct horse battery staple"


def error_body(env) -> tuple[int, str]:
    code, message = msgspec.msgpack.decode(env.body)
    return code, message


@pytest.fixture
async def server():
    srv = build_test_server()
    await srv.start()
    yield srv
    await srv.stop()


# -- authentication -----------------------------------------------------------------------------


@pytest.fixture
async def secure_server():
    srv = build_test_server(secret=SECRET, handshake_timeout=1.0)
    await srv.start()
    yield srv
    await srv.stop()


async def test_auth_ok(secure_server):
    async with RpcClient("127.0.0.1", secure_server.port, secret=SECRET) as c:
        assert await c.call("echo", Echo(1), Echo) == Echo(1)


@pytest.mark.parametrize("secret", [b"wrong secret", None])
async def test_auth_refused_without_the_right_secret(secure_server, secret):
    async with RpcClient("127.0.0.1", secure_server.port, secret=secret) as c:
        with pytest.raises(RpcAuthError):
            await c.call("echo", Echo(1), Echo)
    stats = secure_server.stats()
    assert stats.requests == 0
    if secret is not None:
        assert stats.handshake_failures == 1


async def test_client_with_secret_refuses_server_without_auth(server):
    async with RpcClient("127.0.0.1", server.port, secret=SECRET) as c:
        with pytest.raises(RpcAuthError, match="does not authenticate"):
            await c.call("echo", Echo(1), Echo)
    assert server.stats().requests == 0


async def test_unauthenticated_raw_peer_gets_only_a_refusal(secure_server):
    port = secure_server.port

    def attempts() -> list[list]:
        out = []
        with RawConnection("127.0.0.1", port) as raw:  # straight to a request
            raw.send(raw_frame(Kind.REQUEST, 1, "echo", {"seq": 1}))
            out.append(raw.recv_until_closed(timeout=5))
        with RawConnection("127.0.0.1", port) as raw:  # hello, then skip auth
            raw.hello()
            hello = raw.recv_frame()
            assert hello is not None and hello.kind == Kind.HELLO
            assert msgspec.msgpack.decode(hello.body)[3] is True  # auth_required
            raw.send(raw_frame(Kind.REQUEST, 1, "echo", {"seq": 1}))
            out.append(raw.recv_until_closed(timeout=5))
        with RawConnection("127.0.0.1", port) as raw:  # hello, then a forged proof
            raw.hello()
            raw.recv_frame()
            raw.send(raw_frame(Kind.AUTH, 0, "", [b"\x00" * 32]))
            out.append(raw.recv_until_closed(timeout=5))
        return out

    for frames in await asyncio.to_thread(attempts):
        assert [f.kind for f in frames] == [Kind.ERROR]
        assert error_body(frames[0])[0] == ErrorCode.UNAUTHENTICATED
    assert secure_server.stats().requests == 0


async def test_silent_peer_is_closed_after_handshake_timeout(secure_server):
    def silent() -> tuple[list, float]:
        with RawConnection("127.0.0.1", secure_server.port) as raw:
            t0 = time.monotonic()
            frames = raw.recv_until_closed(timeout=5)
            return frames, time.monotonic() - t0

    frames, elapsed = await asyncio.to_thread(silent)
    assert 0.8 < elapsed < 3.0
    assert [f.kind for f in frames] == [Kind.ERROR]
    assert "handshake" in error_body(frames[0])[1]


async def test_client_rejects_server_that_cannot_prove_the_secret():
    async def impostor(peer: ScriptedPeer) -> None:
        await peer.read()  # hello
        peer.send(Kind.HELLO, 0, "", [PROTOCOL_VERSION, 1 << 20, b"n" * 32, True])
        await peer.read()  # the client's proof (the impostor cannot check it)
        peer.send(Kind.AUTH_OK, 0, "", [b"\x01" * 32])
        await peer.until_eof()

    async with scripted_server(impostor) as port:
        async with RpcClient("127.0.0.1", port, secret=SECRET) as c:
            with pytest.raises(RpcAuthError, match="failed to prove"):
                await c.call("echo", Echo(), Echo)


async def test_version_mismatch_is_reported_both_ways(server):
    def raw_old_client() -> list:
        with RawConnection("127.0.0.1", server.port) as raw:
            raw.hello(version=PROTOCOL_VERSION + 1)
            return raw.recv_until_closed(timeout=5)

    frames = await asyncio.to_thread(raw_old_client)
    assert [f.kind for f in frames] == [Kind.ERROR]
    code, message = error_body(frames[0])
    assert code == ErrorCode.VERSION_MISMATCH and str(PROTOCOL_VERSION + 1) in message

    async def future_server(peer: ScriptedPeer) -> None:
        await peer.read()
        # A later version's hello may not even decode as ours: only the version is read.
        peer.send(Kind.HELLO, 0, "", [PROTOCOL_VERSION + 1, "new", {}])
        await peer.until_eof()

    async with scripted_server(future_server) as port:
        async with RpcClient("127.0.0.1", port) as c:
            with pytest.raises(RpcError) as ei:
                await c.call("echo", Echo(), Echo)
        assert ei.value.code == ErrorCode.VERSION_MISMATCH
