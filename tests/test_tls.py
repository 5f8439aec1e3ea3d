"""Optional TLS (transfer.tls) on RPC, the engine's control plane, the TCP data port and the small
path: real sockets, real certificates from throwaway CAs."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _transfer_util import pattern

from transfer.batch import RequestStatus, TransferRequest
from transfer.config import ConfigError, MooncakeConfig, load_config
from transfer.engine import Engine, buffer_address
from transfer.errors import SegmentNotFoundError
from transfer.memory import MemoryRegistry
from transfer.rpc import BlockingRpcClient, RpcClient, RpcError, RpcServer, SyncRpcClient
from transfer.rpc.testing import Echo
from transfer.tls import TestPki, client_context, make_test_pki, server_context, tls_contexts
from transfer.transports.base import Opcode, Slice, TransportError
from transfer.transports.tcp import TcpTransport

pytestmark = pytest.mark.timeout(60)

SECRET = b"cluster secret"
NO_SHM = {"transfer.enable_shm": False}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), "node")


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """A certificate from another, unrelated CA."""
    return make_test_pki(tmp_path_factory.mktemp("rogue"), "rogue")


def tls_config(pki: TestPki | None, *, mutual: bool = True, **overrides: Any) -> MooncakeConfig:
    settings = {} if pki is None else pki.settings(mutual=mutual)
    return MooncakeConfig().replace(**{**NO_SHM, **settings, **overrides})


@contextlib.asynccontextmanager
async def started(*configs: MooncakeConfig) -> AsyncIterator[list[Engine]]:
    engines: list[Engine] = []
    try:
        for cfg in configs:
            engine = Engine(cfg)
            await engine.start()
            engines.append(engine)
        yield engines
    finally:
        for engine in engines:
            await engine.close()


def echo_server(pki: TestPki, *, secret: bytes | None = SECRET) -> RpcServer:
    server = RpcServer("127.0.0.1", 0, secret=secret, handshake_timeout=2.0,
                       tls=server_context(pki.cert_file, pki.key_file, pki.ca_file))
    calls: list[int] = []

    def echo(req: Echo) -> Echo:
        calls.append(req.seq)
        return req

    server.register("echo", Echo, Echo, echo)
    server.calls = calls  # type: ignore[attr-defined]
    return server


def tls_sockets(engine: Engine) -> list[socket.socket]:
    tcp = engine._transports["tcp"]
    return [s.sock for pool in tcp._pools.values() for s in pool if s.sock is not None]


# -- config -----------------------------------------------------------------------------------


def test_tls_is_off_by_default_and_needs_cert_and_key(pki: TestPki) -> None:
    assert tls_contexts(MooncakeConfig()) is None
    with pytest.raises(ConfigError, match="cert_file"):
        load_config(overrides={"tls.enabled": True, "tls.key_file": pki.key_file})
    cfg = load_config(env={"MOONCAKE_TLS_ENABLED": "1", "MOONCAKE_TLS_CERT_FILE": pki.cert_file,
                           "MOONCAKE_TLS_KEY_FILE": pki.key_file,
                           "MOONCAKE_TLS_CA_FILE": pki.ca_file})
    contexts = tls_contexts(cfg)
    assert contexts is not None and contexts.server.verify_mode == ssl.CERT_REQUIRED
    assert contexts.client.verify_mode == ssl.CERT_REQUIRED


def test_unreadable_certificate_is_a_clear_error(tmp_path: Path, pki: TestPki) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="bad.pem"):
        server_context(str(bad), pki.key_file)
    with pytest.raises(ValueError, match="CA file"):
        client_context(ca_file=str(tmp_path / "missing.pem"))


# -- RPC --------------------------------------------------------------------------------------


async def test_rpc_clients_over_mutual_tls(pki: TestPki) -> None:
    server = echo_server(pki)
    await server.start()
    ctx = client_context(pki.cert_file, pki.key_file, pki.ca_file)
    try:
        async with RpcClient("127.0.0.1", server.port, secret=SECRET, tls=ctx) as c:
            assert await c.call("echo", Echo(1, b"x" * 100_000), Echo) == Echo(1, b"x" * 100_000)
            assert c._conn is not None and c._conn.transport.get_extra_info("cipher")

        def from_threads() -> list[Echo]:
            with SyncRpcClient("127.0.0.1", server.port, secret=SECRET, tls=ctx) as s, \
                    BlockingRpcClient("127.0.0.1", server.port, secret=SECRET, tls=ctx) as b:
                return [s.call("echo", Echo(2), Echo), b.call("echo", Echo(3, b"y" * 200_000),
                                                             Echo)]

        assert await asyncio.to_thread(from_threads) == [Echo(2), Echo(3, b"y" * 200_000)]
        assert server.calls == [1, 2, 3]  # type: ignore[attr-defined]
    finally:
        await server.stop()


async def test_plaintext_peers_get_a_clean_error_and_nothing(pki: TestPki) -> None:
    server = echo_server(pki)
    await server.start()
    try:
        async with RpcClient("127.0.0.1", server.port, secret=SECRET, connect_timeout=3) as c:
            with pytest.raises(RpcError):
                await c.call("echo", Echo(1), Echo, timeout=3)
        blocking = BlockingRpcClient("127.0.0.1", server.port, secret=SECRET, connect_timeout=3)
        with pytest.raises(RpcError):
            await asyncio.to_thread(blocking.call, "echo", Echo(2), Echo, 3)
        blocking.close()

        def raw_hello() -> bytes:  # an RPC hello in clear: no RPC frame ever comes back
            with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
                s.sendall(b"\x00\x00\x00\x10" + bytes(16))
                got = b""
                with contextlib.suppress(OSError):
                    while chunk := s.recv(4096):
                        got += chunk
                return got

        reply = await asyncio.to_thread(raw_hello)
        assert reply == b"" or reply[0] == 0x15  # nothing, or a TLS alert record
        assert server.calls == []  # type: ignore[attr-defined]
        assert server.stats().requests == 0
    finally:
        await server.stop()


async def test_peers_with_a_certificate_from_another_ca_are_refused(pki: TestPki,
                                                                    rogue: TestPki) -> None:
    server = echo_server(pki)
    await server.start()
    try:
        # A client holding the right secret but a rogue certificate.
        bad = client_context(rogue.cert_file, rogue.key_file, pki.ca_file)
        async with RpcClient("127.0.0.1", server.port, secret=SECRET, tls=bad,
                             connect_timeout=3) as c:
            with pytest.raises(RpcError, match="cannot connect|lost|closed"):
                await c.call("echo", Echo(1), Echo, timeout=3)
        # A client with no certificate at all, against a server that requires one.
        anonymous = client_context(ca_file=pki.ca_file)
        blocking = BlockingRpcClient("127.0.0.1", server.port, secret=SECRET, tls=anonymous,
                                     connect_timeout=3)
        with pytest.raises(RpcError):
            await asyncio.to_thread(blocking.call, "echo", Echo(2), Echo, 3)
        blocking.close()
        assert server.calls == []  # type: ignore[attr-defined]
    finally:
        await server.stop()
    # The other direction: a client that trusts only its CA refuses a rogue server.
    rogue_server = echo_server(rogue)
    await rogue_server.start()
    try:
        good = client_context(pki.cert_file, pki.key_file, pki.ca_file)
        async with RpcClient("127.0.0.1", rogue_server.port, secret=SECRET, tls=good,
                             connect_timeout=3) as c:
            with pytest.raises(RpcError, match="certificate verify failed"):
                await c.call("echo", Echo(1), Echo, timeout=3)
    finally:
        await rogue_server.stop()


# -- the engine: control plane, data port, small path ------------------------------------------


async def test_engines_over_mutual_tls_move_exact_bytes(pki: TestPki) -> None:
    cfg = tls_config(pki, auth_secret=SECRET)
    async with started(cfg, cfg) as (a, b):
        big = pattern(3 << 20, 1)
        small = pattern(4096, 2)
        dst = np.zeros(4 << 20, np.uint8)
        back = np.zeros_like(big)
        sb, ss, db, ba = (await a.register(big), await a.register(small), await b.register(dst),
                          await a.register(back))
        # General path (sliced, parallel streams), then the loop's small path.
        await a.transfer([TransferRequest(Opcode.WRITE, sb, b.name, db, big.nbytes)],
                         notify=b"over tls")
        await a.transfer([TransferRequest(Opcode.WRITE, ss, b.name, db + big.nbytes, 4096)])
        assert np.array_equal(dst[:big.nbytes], big)
        assert np.array_equal(dst[big.nbytes:big.nbytes + 4096], small)
        await a.transfer([TransferRequest(Opcode.READ, ba, b.name, db, big.nbytes)])
        assert np.array_equal(back, big)
        # The caller-thread small path.
        small_back = np.zeros_like(small)
        sbk = await a.register(small_back)
        results = await asyncio.to_thread(a.transfer_blocking, [
            TransferRequest(Opcode.READ, sbk, b.name, db + big.nbytes, 4096)], timeout=10)
        assert results[0].status is RequestStatus.COMPLETED
        assert np.array_equal(small_back, small)
        # Notifications travel on the TLS control plane.
        for _ in range(50):
            if b.notifications():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("notification not delivered")
        socks = tls_sockets(a)
        assert socks and all(isinstance(s, ssl.SSLSocket) for s in socks)


async def test_tls_without_ca_encrypts_only(pki: TestPki) -> None:
    cfg = tls_config(pki, mutual=False)
    async with started(cfg, cfg) as (a, b):
        src, dst = pattern(1 << 20, 3), np.zeros(1 << 20, np.uint8)
        sa, db = await a.register(src), await b.register(dst)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)])
        assert np.array_equal(dst, src)
        assert all(isinstance(s, ssl.SSLSocket) for s in tls_sockets(a))


async def test_plaintext_and_rogue_peers_on_the_tls_data_port_get_nothing(
        pki: TestPki, rogue: TestPki) -> None:
    async with started(tls_config(pki, auth_secret=SECRET)) as (b,):
        dst = np.zeros(4096, np.uint8)
        db = await b.register(dst)
        entry = b._entries["tcp"]
        src = bytearray(b"\x07" * 4096)
        rogue_cfg = tls_config(rogue, auth_secret=SECRET, **{"tls.ca_file": pki.ca_file})
        for tls in (None, tls_contexts(rogue_cfg)):
            t = TcpTransport(MemoryRegistry(), host="127.0.0.1", secret=SECRET, tls=tls,
                             connect_timeout=3, io_timeout=3)
            try:
                with pytest.raises(TransportError):
                    await t.execute(b.name, entry, [],
                                    [Slice(Opcode.WRITE, buffer_address(src), db, 4096)])
            finally:
                await t.close()
        assert not dst.any()
        # And a raw plaintext hello is dropped without a welcome.
        def raw() -> bytes:
            with socket.create_connection(("127.0.0.1", entry["port"]), timeout=3) as s:
                s.sendall(b"MCTD\x00\x01" + bytes(32))
                got = b""
                with contextlib.suppress(OSError):
                    while chunk := s.recv(4096):
                        got += chunk
                return got

        reply = await asyncio.to_thread(raw)
        assert b"MCTD" not in reply


async def test_tls_engine_and_plaintext_engine_do_not_talk(pki: TestPki) -> None:
    async with started(tls_config(pki), tls_config(None)) as (a, b):
        src, dst = pattern(65536, 4), np.zeros(65536, np.uint8)
        back = np.zeros_like(src)
        sa, db = await a.register(src), await b.register(dst)
        bb, da = await b.register(back), await a.register(np.zeros_like(src))
        # The descriptor fetch itself fails, both ways: TLS client vs plain RPC and back.
        with pytest.raises(SegmentNotFoundError, match="SSL"):
            await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)],
                             timeout=10)
        with pytest.raises(SegmentNotFoundError):
            await b.transfer([TransferRequest(Opcode.READ, bb, a.name, da, src.nbytes)],
                             timeout=10)
        assert not dst.any() and not back.any()


async def test_closing_an_engine_shuts_its_live_tls_data_connections_down(pki: TestPki) -> None:
    """The data server tracks the TLS socket, not the detached raw one, so closing the engine
    ends its serving threads even while the peer keeps its streams open."""
    cfg = tls_config(pki)

    def serving() -> int:
        return sum(t.name == "mooncake-tcp-serve" for t in threading.enumerate())

    async with started(cfg) as (a,):
        b = Engine(cfg)
        await b.start()
        try:
            src, dst = pattern(65536, 5), np.zeros(65536, np.uint8)
            sa, db = await a.register(src), await b.register(dst)
            await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)])
            assert serving() > 0
        finally:
            await b.close()
        for _ in range(100):
            if serving() == 0:
                break
            await asyncio.sleep(0.05)
        assert serving() == 0


# -- the store: master RPC, the caller-thread path and the data plane, all over TLS -------------


def test_store_put_get_over_mutual_tls(pki: TestPki, rogue: TestPki,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from _store_util import MIB, master_process, new_client

    from store.client.errors import StoreError

    env = {"MOONCAKE_AUTH_SECRET": "store-secret", "MOONCAKE_TLS_ENABLED": "true",
           "MOONCAKE_TLS_CERT_FILE": pki.cert_file, "MOONCAKE_TLS_KEY_FILE": pki.key_file,
           "MOONCAKE_TLS_CA_FILE": pki.ca_file}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the master process inherits them
    tls = {**pki.settings(), **NO_SHM, "auth_secret": "store-secret"}
    with master_process() as master:
        with new_client(master, **tls) as lender, \
                new_client(master, global_segment_size=0, **tls) as reader:
            value = bytes(pattern(3 * MIB + 5, 6))
            lender.put("over-tls", value)
            reader.put("small", b"s" * 1000)  # lands in the lender's segment, over TLS
            assert reader.get("over-tls") == value
            assert lender.get("small") == b"s" * 1000
            socks = tls_sockets(reader.engine)
            assert socks and all(isinstance(s, ssl.SSLSocket) for s in socks)
        # A client whose certificate comes from another CA gets nothing from the master.
        rogue_tls = {**tls, "tls.cert_file": rogue.cert_file, "tls.key_file": rogue.key_file}
        with new_client(master, global_segment_size=0, **rogue_tls,
                        rpc={"retry_timeout": 1.0}) as intruder:
            with pytest.raises(StoreError):
                intruder.get("over-tls")
