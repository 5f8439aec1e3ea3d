"""TCP transport end to end: in-process engines and real peer processes."""
from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
from _transfer_util import Peer, engines, pattern, sha

from transfer.batch import RequestStatus, TransferRequest
from transfer.errors import AddressError, SegmentNotFoundError, TransferFailedError
from transfer.transports.base import Opcode, Slice

pytestmark = pytest.mark.timeout(30)
NO_SHM = {"transfer.enable_shm": False}


async def test_write_then_read_between_engines() -> None:
    async with engines(2, **NO_SHM) as (a, b):
        src = pattern(3 << 20, 1)
        dst = np.zeros_like(src)
        back = np.zeros_like(src)
        sa, db, ba = await a.register(src), await b.register(dst), await a.register(back)
        res = await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)])
        assert res[0].status is RequestStatus.COMPLETED and res[0].transferred == src.nbytes
        assert np.array_equal(dst, src)
        await a.transfer([TransferRequest(Opcode.READ, ba, b.name, db, src.nbytes)])
        assert np.array_equal(back, src)
        assert a.stats()["tcp_connects"] > 0


async def test_batch_of_many_requests_with_offsets_and_status() -> None:
    async with engines(2, **NO_SHM, **{"transfer.slice_size": 4096}) as (a, b):
        src = pattern(1 << 20, 2)
        dst = np.zeros_like(src)
        sa, db = await a.register(src), await b.register(dst)
        reqs = [TransferRequest(Opcode.WRITE, sa + off, b.name, db + off, 10_000)
                for off in range(0, 1_000_000, 10_000)]
        batch = await a.submit(reqs)
        results = await batch.wait(20)
        assert all(r.status is RequestStatus.COMPLETED and r.transferred == 10_000 for r in results)
        assert np.array_equal(dst[:1_000_000], src[:1_000_000])
        assert not dst[1_000_000:].any()


async def test_bad_requests_are_rejected_before_anything_moves() -> None:
    async with engines(2, **NO_SHM) as (a, b):
        src = np.ones(4096, np.uint8)
        dst = np.zeros(4096, np.uint8)
        sa, db = await a.register(src), await b.register(dst)
        with pytest.raises(AddressError, match="remote"):
            await a.submit([TransferRequest(Opcode.WRITE, sa, b.name, db + 4000, 200)])
        with pytest.raises(AddressError, match="local"):
            await a.submit([TransferRequest(Opcode.WRITE, sa + 1, b.name, db, 4096)])
        with pytest.raises(AddressError, match="not in any"):
            await a.submit([TransferRequest(Opcode.WRITE, 12345, b.name, db, 10)])
        with pytest.raises(AddressError, match="positive"):
            await a.submit([TransferRequest(Opcode.WRITE, sa, b.name, db, 0)])
        with pytest.raises(AddressError):
            await a.submit([TransferRequest(Opcode.READ, sa, b.name, db, -5)])
        with pytest.raises(SegmentNotFoundError):
            await a.submit([TransferRequest(Opcode.WRITE, sa, "127.0.0.1:1", db, 10)])
        with pytest.raises(SegmentNotFoundError):
            await a.submit([TransferRequest(Opcode.WRITE, sa, "not-a-segment", db, 10)])
        with pytest.raises(ValueError):
            await a.submit([])
        assert not dst.any()


async def test_stale_descriptor_remote_range_gets_peer_error() -> None:
    """The server re-checks ranges itself: a peer that unregistered refuses the slice."""
    async with engines(2, **NO_SHM) as (a, b):
        src = np.ones(8192, np.uint8)
        dst = np.zeros(8192, np.uint8)
        sa, db = await a.register(src), await b.register(dst)
        await a.open_segment(b.name)  # cached descriptor still lists db
        await b.unregister(db)
        batch = await a.submit([TransferRequest(Opcode.WRITE, sa, b.name, db, 8192)])
        (r,) = await batch.wait(10)
        assert r.status is RequestStatus.FAILED and "not in any registered buffer" in r.error
        assert not dst.any()
        with pytest.raises(AddressError):  # refreshed descriptor: rejected up front now
            await a.submit([TransferRequest(Opcode.WRITE, sa, b.name, db, 8192)])


@pytest.mark.parametrize("shm", [False, True])
async def test_memory_the_peer_registered_after_we_cached_it_is_found(shm: bool) -> None:
    """A cached descriptor that lacks an address is read again once before the address is
    called bad (found by the GPU test, whose peer registers a CUDA buffer late)."""
    async with engines(2, **{"transfer.enable_shm": shm}) as (a, b):
        src = pattern(1 << 20, 4)
        first, late = np.zeros_like(src), np.zeros_like(src)
        sa, d1 = await a.register(src), await b.register(first)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, d1, src.nbytes)])
        d2 = await b.register(late)  # after a cached b's descriptor
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, d1, 4096),
                          TransferRequest(Opcode.WRITE, sa, b.name, d2, src.nbytes)])
        assert np.array_equal(late, src) and np.array_equal(first, src)
        with pytest.raises(AddressError, match="remote"):  # still bad after the re-read
            await a.submit([TransferRequest(Opcode.WRITE, sa, b.name, d2 + src.nbytes, 10)])


async def test_slice_retried_on_another_path_after_connection_killed() -> None:
    async with engines(2, **NO_SHM, **{"transfer.slice_size": 65536}) as (a, b):
        src = pattern(4 << 20, 3)
        dst = np.zeros_like(src)
        sa, db = await a.register(src), await b.register(dst)
        # Connect stream 0 only: a batch with a notification never takes the small path.
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, 4096)], notify="c")
        tcp = a._transports["tcp"]
        port = (await a.open_segment(b.name)).desc.transports["tcp"]["port"]
        streams = tcp.streams("127.0.0.1", port)
        assert streams[0].sock is not None
        streams[0].sock.shutdown(socket.SHUT_RDWR)  # path 0 is now dead
        connects = a.stats()["tcp_connects"]
        res = await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)])
        assert res[0].status is RequestStatus.COMPLETED
        assert np.array_equal(dst, src)
        assert a.stats()["tcp_connects"] > connects  # the failed path was retried elsewhere


async def test_notifications_are_delivered_after_batch() -> None:
    async with engines(2, **NO_SHM) as (a, b):
        src = np.ones(100, np.uint8)
        dst = np.zeros(100, np.uint8)
        sa, db = await a.register(src), await b.register(dst)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, 100)], notify="kv-ready:7")
        (note,) = b.notifications()
        assert note.sender == a.name and note.message == b"kv-ready:7"
        await b.notify(a.name, b"hello")
        assert [n.message for n in a.notifications()] == [b"hello"]
        assert b.notifications() == []


def test_cross_process_write_and_read() -> None:
    from _transfer_util import config

    from transfer.engine import Engine

    with Peer("--no-shm", size=8 << 20) as peer:
        engine = Engine(config(**NO_SHM)).start_in()
        try:
            src = pattern(peer.size, 5)
            sa = engine.run(engine.register(src))
            engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, peer.name, peer.addr,
                                                        peer.size)], timeout=20))
            assert peer.sha() == sha(src)
            peer.fill(9)
            dst = np.zeros(peer.size, np.uint8)
            da = engine.run(engine.register(dst))
            engine.run(engine.transfer([TransferRequest(Opcode.READ, da, peer.name, peer.addr,
                                                        peer.size)], timeout=20))
            assert np.array_equal(dst, pattern(peer.size, 9))
            engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, peer.name, peer.addr,
                                                        64)], notify="done", timeout=20))
            assert peer.notes() == [[engine.name, "done"]]
        finally:
            engine.close_in()


def test_peer_killed_mid_transfer_fails_in_bounded_time() -> None:
    from _transfer_util import config

    from transfer.engine import Engine

    size = 256 << 20
    engine = Engine(config(**NO_SHM, **{"transfer.slice_size": 1 << 20})).start_in()
    try:
        with Peer("--no-shm", size=size) as peer, Peer("--no-shm", size=1 << 20) as other:
            src = np.ones(size, np.uint8)
            sa = engine.run(engine.register(src))
            reqs = [TransferRequest(Opcode.WRITE, sa, peer.name, peer.addr, size)] * 8
            batch = engine.run(engine.submit(reqs))
            time.sleep(0.02)  # 2 GiB to move: the kill lands mid-transfer
            peer.kill()
            start = time.monotonic()
            results = engine.run(batch.wait(15))
            assert time.monotonic() - start < 15
            assert all(r.status is RequestStatus.FAILED for r in results)
            assert all(r.error for r in results)
            # The engine keeps working with other peers.
            engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, other.name, other.addr,
                                                        other.size)], timeout=10))
            assert other.sha() == sha(src[:other.size])
            with pytest.raises((SegmentNotFoundError, TransferFailedError)):
                engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, peer.name, peer.addr,
                                                            16)], timeout=10))
    finally:
        engine.close_in()


def _raw_connect(port: int) -> socket.socket:
    from transfer.rpc import auth
    from transfer.transports.tcp import _HELLO, _TAG, _WELCOME, PROTOCOL_VERSION

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(_HELLO.pack(_TAG, PROTOCOL_VERSION, auth.new_nonce()))
    welcome = s.recv(_WELCOME.size, socket.MSG_WAITALL)
    assert welcome[:4] == _TAG
    return s


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n\r\n" + b"x" * 100,      # not our protocol at all
    b"\x00" * 64,                                # bad handshake
    b"MCTD\x00\x63" + b"\x00" * 32,              # wrong protocol version
])
async def test_data_port_survives_garbage(garbage: bytes) -> None:
    async with engines(2, **NO_SHM) as (a, b):
        dst = np.zeros(4096, np.uint8)
        db = await b.register(dst)
        port = b._entries["tcp"]["port"]

        def closed_by_server() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(garbage)
                s.settimeout(8)  # the server's handshake bound is 5 s
                try:
                    while s.recv(1 << 16):
                        pass
                except ConnectionResetError:
                    pass
                return True  # socket.timeout (a hang) propagates and fails the test

        assert await asyncio.get_running_loop().run_in_executor(None, closed_by_server)
        src = np.ones(4096, np.uint8)
        sa = await a.register(src)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, 4096)])
        assert dst.all()


async def test_protocol_version_mismatch_is_named_on_both_sides() -> None:
    """A peer of another data-plane version is told which version this one speaks, and a
    client meeting one (or a server that just hangs up) says so instead of 'peer closed'."""
    import threading

    from transfer.memory import MemoryRegistry
    from transfer.rpc import auth
    from transfer.transports.base import Slice, TransportError
    from transfer.transports.tcp import _HELLO, _TAG, _WELCOME, PROTOCOL_VERSION, TcpTransport

    async with engines(1, **NO_SHM) as (b,):
        port = b._entries["tcp"]["port"]

        def old_client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(_HELLO.pack(_TAG, PROTOCOL_VERSION - 1, auth.new_nonce()))
                answer = s.recv(_WELCOME.size, socket.MSG_WAITALL)
                assert s.recv(1) == b""  # and then closed
                return answer

        tag, flag, nonce = _WELCOME.unpack(
            await asyncio.get_running_loop().run_in_executor(None, old_client))
        assert tag == _TAG and flag == 0xFF and int.from_bytes(nonce[:2], "big") == PROTOCOL_VERSION

    def fake_server(listener: socket.socket, reply: bytes | None) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(_HELLO.size, socket.MSG_WAITALL)
            if reply is not None:
                conn.sendall(reply)

    newer = _WELCOME.pack(_TAG, 0xFF, (PROTOCOL_VERSION + 1).to_bytes(2, "big") + bytes(30))
    for reply, expected in ((newer, f"protocol version {PROTOCOL_VERSION + 1}"),
                            (None, "during the handshake")):
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=fake_server, args=(listener, reply), daemon=True).start()
        t = TcpTransport(MemoryRegistry(), host="127.0.0.1")
        try:
            src = bytearray(16)
            from transfer.engine import buffer_address

            entry = {"host": "127.0.0.1", "port": listener.getsockname()[1]}
            with pytest.raises(TransportError, match=expected):
                await t.execute("peer", entry, [], [Slice(Opcode.WRITE, buffer_address(src),
                                                          0x1000, 16)])
        finally:
            await t.close()
            listener.close()


async def test_data_port_validates_every_request_before_touching_memory() -> None:
    from transfer.transports.tcp import _MAGIC, _REQ, _RESP, MAX_SLICE

    async with engines(1, **NO_SHM) as (b,):
        dst = np.zeros(4096, np.uint8)
        db = await b.register(dst)
        port = b._entries["tcp"]["port"]
        loop = asyncio.get_running_loop()

        def exchange() -> list[tuple[int, bytes]]:
            s = _raw_connect(port)
            out = []
            # WRITE past the end: payload drained, error reply, stream still usable.
            s.sendall(_REQ.pack(_MAGIC, 1, 0, 1, db + 4000, 200) + b"\xff" * 200)
            # READ of an unregistered address: error, no bytes of memory.
            s.sendall(_REQ.pack(_MAGIC, 0, 0, 2, 0x10, 16))
            # A valid WRITE on the same stream still works.
            s.sendall(_REQ.pack(_MAGIC, 1, 0, 3, db, 4) + b"\x07" * 4)
            for _ in range(3):
                head = s.recv(_RESP.size, socket.MSG_WAITALL)
                _, status, _, tag, n = _RESP.unpack(head)
                body = s.recv(n, socket.MSG_WAITALL) if n else b""
                out.append((status, body))
            # Oversized length: refused and the connection closed.
            s.sendall(_REQ.pack(_MAGIC, 1, 0, 4, db, MAX_SLICE + 1))
            head = s.recv(_RESP.size, socket.MSG_WAITALL)
            _, status, _, _, n = _RESP.unpack(head)
            s.recv(n, socket.MSG_WAITALL)
            out.append((status, s.recv(1)))
            s.close()
            return out

        (w, r, ok, big) = await loop.run_in_executor(None, exchange)
        assert w[0] != 0 and b"runs past the end" in w[1]
        assert r[0] != 0 and b"not in any registered buffer" in r[1]
        assert ok == (0, b"")
        assert big[0] != 0 and big[1] == b""
        assert dst[:4].tolist() == [7, 7, 7, 7] and not dst[4:].any()


async def test_wrong_secret_on_data_port_is_refused() -> None:
    from transfer.memory import MemoryRegistry
    from transfer.transports.base import Slice, TransportError
    from transfer.transports.tcp import TcpTransport

    async with engines(1, **NO_SHM, auth_secret="right-secret") as (b,):
        dst = np.zeros(64, np.uint8)
        db = await b.register(dst)
        entry = b._entries["tcp"]
        registry = MemoryRegistry()
        for secret in (b"wrong-secret", None):
            t = TcpTransport(registry, host="127.0.0.1", secret=secret)
            try:
                src = bytearray(b"\x01" * 64)
                from transfer.engine import buffer_address

                with pytest.raises(TransportError, match="authentication"):
                    await t.execute(b.name, entry, [], [Slice(Opcode.WRITE, buffer_address(src),
                                                              db, 64)])
            finally:
                await t.close()
        assert not dst.any()


# -- socket primitives: kernel timeouts, whole-payload receives, polling for answers ------------


def _later(seconds: float, fn) -> None:  # type: ignore[no-untyped-def]
    import threading

    t = threading.Timer(seconds, fn)
    t.daemon = True
    t.start()


def test_kernel_timeout_socket_waits_idle_but_bounds_a_started_request() -> None:
    """The server's sockets: idle before a request's first byte as long as the peer likes, but
    once a header has started the rest must come within the timeout (a stalled peer raises)."""
    from transfer.transports.tcp import _await_request, _kernel_timeouts, _recv_exact

    a, b = socket.socketpair()
    with a, b:
        _kernel_timeouts(a, 0.1)
        assert a.gettimeout() is None  # blocking: no poll per call
        head = bytearray(24)
        _later(0.35, lambda: b.sendall(bytes(range(24))))  # idle for > 3 timeouts first
        _await_request(a, memoryview(head))
        assert head == bytes(range(24))
        b.sendall(b"\x01" * 10)  # a header's first 10 bytes, then nothing
        t0 = time.monotonic()
        with pytest.raises(OSError):
            _await_request(a, memoryview(head))
        assert time.monotonic() - t0 < 2.0
        payload = bytearray(1 << 20)
        chunks = [bytes([i]) * (1 << 18) for i in range(4)]
        for i, c in enumerate(chunks):  # arriving in pieces, each within the timeout
            _later(0.02 * (i + 1), lambda c=c: b.sendall(c))
        _recv_exact(a, memoryview(payload))
        assert payload == b"".join(chunks)


def test_polling_receive_gets_prompt_and_late_answers_and_sees_a_close() -> None:
    from transfer.transports.tcp import _kernel_timeouts, _recv_exact_polling

    a, b = socket.socketpair()
    with a, b:
        _kernel_timeouts(a, 2.0)
        got = bytearray(16)
        b.sendall(b"p" * 16)
        _recv_exact_polling(a, memoryview(got), 0.01)  # already there
        assert got == b"p" * 16
        _later(0.05, lambda: b.sendall(b"q" * 16))  # after the poll window: sleeps for it
        _recv_exact_polling(a, memoryview(got), 0.001)
        assert got == b"q" * 16
        _later(0.002, lambda: b.sendall(b"r" * 8))  # half inside the window, half after it
        _later(0.05, lambda: b.sendall(b"s" * 8))
        _recv_exact_polling(a, memoryview(got), 0.01)
        assert got == b"r" * 8 + b"s" * 8
        _later(0.005, b.close)
        with pytest.raises(ConnectionError):
            _recv_exact_polling(a, memoryview(got), 0.5)
    c, d = socket.socketpair()
    with c, d:
        c.settimeout(1.0)  # a socket with Python's timeout (TLS, loop-owned) just receives
        d.sendall(b"t" * 16)
        _recv_exact_polling(c, memoryview(got), 0.01)
        assert got == b"t" * 16


def test_route_gathers_pieces_that_continue_only_remotely() -> None:
    """Requests contiguous on the remote side but not locally join one run on a gathering
    transport (one slice carries several local pieces, cut exactly at ``slice_size``), and
    start a new run on any other; owners keep each request's bytes."""
    from transfer.batch import Route

    class _T:
        gather = True

    def route(gather: bool) -> Route:
        t = _T()
        t.gather = gather
        return Route(t, "p", {}, [], lambda: None)  # type: ignore[arg-type]

    r = route(True)
    r.add(0, Opcode.WRITE, 1000, 50_000, 300)
    r.add(1, Opcode.WRITE, 1300, 50_300, 200)   # contiguous both sides: extends the piece
    r.add(2, Opcode.WRITE, 9000, 50_500, 700)   # remote only: a second local piece
    r.add(3, Opcode.WRITE, 20_000, 60_000, 100)  # remote jumps: a new run
    r.cut(600)
    assert [(s.local_addr, s.remote_addr, s.length, s.pieces()) for _, s in r.items] == [
        (1000, 50_000, 600, ((1000, 500), (9000, 100))),
        (9100, 50_600, 600, ((9100, 600),)),
        (20_000, 60_000, 100, ((20_000, 100),)),
    ]
    assert [owners for owners, _ in r.items] == [((0, 300), (1, 200), (2, 100)), ((2, 600),),
                                                 ((3, 100),)]
    plain = route(False)
    plain.add(0, Opcode.WRITE, 1000, 50_000, 300)
    plain.add(1, Opcode.WRITE, 9000, 50_300, 200)
    plain.cut(1 << 20)
    assert [s.pieces() for _, s in plain.items] == [((1000, 300),), ((9000, 200),)]


@pytest.mark.parametrize("slice_size", [4096, 1 << 20])
async def test_one_object_from_scattered_pages_both_ways(slice_size: int) -> None:
    """An object written from one page per layer (pages apart locally, back to back in the
    replica) and read back into other scattered pages: exact bytes, gaps untouched, with
    slices cut inside pages and across them."""
    page, count = 5000, 80  # odd sizes: slices end mid-page; > 64 requests: the general path
    async with engines(2, **NO_SHM, **{"transfer.slice_size": slice_size}) as (a, b):
        src = pattern(2 * page * count, 5)
        back = np.zeros_like(src)
        replica = np.zeros(page * count, np.uint8)
        sa, ba, rb = await a.register(src), await a.register(back), await b.register(replica)
        tcp = a._transports["tcp"]
        sent: list[Slice] = []
        pipeline = tcp._pipeline

        def recording(stream, slices, poll=0.0):  # the real method, its slices noted
            sent.extend(slices)
            return pipeline(stream, slices, poll)

        tcp._pipeline = recording
        await a.transfer([TransferRequest(Opcode.WRITE, sa + 2 * i * page, b.name,
                                          rb + i * page, page) for i in range(count)])
        expected = np.concatenate([src[2 * i * page:(2 * i + 1) * page] for i in range(count)])
        assert np.array_equal(replica, expected)
        await a.transfer([TransferRequest(Opcode.READ, ba + 2 * i * page, b.name,
                                          rb + i * page, page) for i in range(count)])
        for i in range(count):
            assert np.array_equal(back[2 * i * page:(2 * i + 1) * page],
                                  src[2 * i * page:(2 * i + 1) * page])
            assert not back[(2 * i + 1) * page:(2 * i + 2) * page].any()
        # each batch went as slices of up to slice_size gathered from several pages
        assert len(sent) == 2 * -(-page * count // slice_size)
        assert max(len(s.pieces()) for s in sent) > 1
