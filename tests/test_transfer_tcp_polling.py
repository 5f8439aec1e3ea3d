"""The TCP data server's polling (``transfer.serve_poll_us``): exact bytes whatever the timing,
idle connections still served, stalled payloads still bounded, pollers never leaked."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from _transfer_util import engines, pattern

from transfer.batch import RequestStatus, TransferRequest
from transfer.polling import poll_recv_exact, poll_send
from transfer.transports.base import Opcode

pytestmark = pytest.mark.timeout(60)
POLLING = {"transfer.enable_shm": False, "transfer.serve_poll_us": 20_000,
           "transfer.io_timeout": 1.0}


@pytest.fixture(autouse=True)
def _a_core_to_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polling here must not depend on how busy the test host is (see spare_core's test)."""
    import transfer.polling as polling

    monkeypatch.setattr(polling, "_runnable", lambda: None)
    monkeypatch.setattr(polling, "_sample", [0.0, 0.0])


def _later(seconds: float, fn) -> None:  # type: ignore[no-untyped-def]
    t = threading.Timer(seconds, fn)
    t.daemon = True
    t.start()


def test_poll_recv_exact_takes_what_keeps_coming_and_stops_at_a_gap() -> None:
    a, b = socket.socketpair()
    with a, b:
        got = bytearray(40)
        for i in range(4):  # pieces 5 ms apart, inside a 50 ms idle window
            _later(0.005 * (i + 1), lambda i=i: b.sendall(bytes([i]) * 10))
        assert poll_recv_exact(a, memoryview(got), 0.05) == 40
        assert got == b"".join(bytes([i]) * 10 for i in range(4))
        b.sendall(b"x" * 10)
        _later(0.2, lambda: b.sendall(b"y" * 30))  # a gap longer than the window
        t0 = time.monotonic()
        assert poll_recv_exact(a, memoryview(got), 0.02) == 10
        assert time.monotonic() - t0 < 0.15
        assert poll_recv_exact(a, memoryview(got)[10:], 1.0) == 30
        assert got == b"x" * 10 + b"y" * 30
        _later(0.005, b.close)
        with pytest.raises(ConnectionError):
            poll_recv_exact(a, memoryview(got), 1.0)


def test_poll_send_keeps_offering_while_the_peer_drains_and_stops_when_it_does_not() -> None:
    a, b = socket.socketpair()
    with a, b:
        data = memoryview(bytes(range(256)) * (16 << 10))  # 4 MiB: far more than the buffers
        got = bytearray()

        def drain(limit: int) -> None:
            while len(got) < limit:
                got.extend(b.recv(1 << 16))

        reader = threading.Thread(target=drain, args=(len(data),))
        reader.start()
        assert poll_send(a, data, 0.5) == len(data)  # the peer keeps reading: all of it
        reader.join(10)
        assert got == data
        got.clear()
        t0 = time.monotonic()
        sent = poll_send(a, data, 0.02)  # nobody reads: the buffers fill, then it gives up
        assert 0 < sent < len(data) and time.monotonic() - t0 < 1.0
        drain(sent)
        assert got == data[:sent]


def test_polling_gives_up_at_once_when_the_host_has_no_core_to_spare(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import transfer.polling as polling

    reads: list[int] = []
    runnable = [1]

    def fake_runnable() -> int:
        reads.append(runnable[0])
        return runnable[0]

    def reading() -> bool:
        polling._sample[0] = 0.0  # a reading is due
        return polling.spare_core()

    monkeypatch.setattr(polling, "_runnable", fake_runnable)
    monkeypatch.setattr(polling, "_CORES", 2)
    monkeypatch.setattr(polling, "_sample", [0.0, 0.0])
    assert reading()  # alone on the host
    assert polling.spare_core() and len(reads) == 1  # within 5 ms the last reading stands
    runnable[0] = 4  # one moment of three others on two cores: the average rides it out
    assert reading()
    runnable[0] = 1
    assert reading() and reading()
    runnable[0] = 6  # five others, reading after reading: nothing to spare
    while reading():
        assert len(reads) < 20
    a, b = socket.socketpair()
    with a, b:
        t0 = time.monotonic()
        assert polling.poll_recv_into(a, memoryview(bytearray(8)), 5.0) is None
        assert polling.poll_recv_exact(a, memoryview(bytearray(8)), 5.0) == 0
        assert time.monotonic() - t0 < 1.0  # gave up at once, not after 5 s each
        b.sendall(b"z" * 8)  # what is already there is still taken
        got = bytearray(8)
        assert polling.poll_recv_exact(a, memoryview(got), 5.0) == 8 and got == b"z" * 8
    monkeypatch.setattr(polling, "_runnable", lambda: None)  # no /proc: assume a spare core
    assert reading()


def test_header_after_a_long_idle_is_still_received() -> None:
    """A connection idle far past the poll window and the kernel timeout still gets its next
    request; a header that starts and then stops is bounded by the timeout."""
    from transfer.transports.tcp import _kernel_timeouts, _recv_exact_polling

    a, b = socket.socketpair()
    with a, b:
        _kernel_timeouts(a, 0.1)
        head = bytearray(32)
        _later(0.4, lambda: b.sendall(bytes(range(32))))
        _recv_exact_polling(a, memoryview(head), 0.01, idle_ok=True)
        assert head == bytes(range(32))
        b.sendall(b"\x01" * 10)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            _recv_exact_polling(a, memoryview(head), 0.01, idle_ok=True)
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("size", [4096, 1 << 20, 9 << 20])
async def test_writes_and_reads_are_exact_with_a_polling_server(size: int) -> None:
    async with engines(2, **POLLING) as (a, b):
        src = pattern(size, size % 251)
        dst = np.zeros_like(src)
        back = np.zeros_like(src)
        sa, db, ba = await a.register(src), await b.register(dst), await a.register(back)
        for _ in range(3):  # back to back: the next request lands while the server polls
            res = await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, size)])
            assert res[0].status is RequestStatus.COMPLETED
            assert np.array_equal(dst, src)
            dst[:] = 0
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, size)])
        await asyncio.sleep(0.1)  # past the poll window: the server sleeps, then wakes for it
        await a.transfer([TransferRequest(Opcode.READ, ba, b.name, db, size)])
        assert np.array_equal(back, src)
        blocking = a.transfer_blocking  # the caller-thread exchange polls the read payload
        back[:] = 0
        await asyncio.get_running_loop().run_in_executor(None, lambda: blocking(
            [TransferRequest(Opcode.READ, ba, b.name, db, size)], one_stream_bytes=size))
        assert np.array_equal(back, src)


@contextlib.asynccontextmanager
async def _polling_node() -> AsyncIterator[tuple[np.ndarray, int, int, Any]]:
    """One polling engine with 1 MiB registered: (memory, its address, data port, server)."""
    async with engines(1, **POLLING) as (b,):
        dst = np.zeros(1 << 20, np.uint8)
        db = await b.register(dst)
        server = b._transports["tcp"]._server
        assert server is not None
        yield dst, db, b._entries["tcp"]["port"], server


async def test_payload_that_pauses_mid_way_completes_and_one_that_stalls_is_dropped() -> None:
    from transfer.transports.tcp import _MAGIC, _REQ, _RESP

    async with _polling_node() as (dst, db, port, server):

        def exchange() -> tuple[int, bytes]:
            from test_transfer_tcp import _raw_connect

            s = _raw_connect(port)
            with s:
                # Half the payload, a pause past the poll window (not past io_timeout), the rest.
                s.sendall(_REQ.pack(_MAGIC, 1, 0, 1, db, 1 << 20) + b"\x05" * (1 << 19))
                time.sleep(0.3)
                s.sendall(b"\x06" * (1 << 19))
                _, status, _, tag, _ = _RESP.unpack(s.recv(_RESP.size, socket.MSG_WAITALL))
                # Then a payload that stops for good: the server gives up within io_timeout.
                s.sendall(_REQ.pack(_MAGIC, 1, 0, 2, db, 1 << 20) + b"\x07" * 1000)
                s.settimeout(5)
                t0 = time.monotonic()
                rest = s.recv(1)  # b"": the server closed the connection
                assert time.monotonic() - t0 < 4
                return status, rest

        status, rest = await asyncio.get_running_loop().run_in_executor(None, exchange)
        assert status == 0 and rest == b""
        # The paused write landed whole; the stalled one got no further than its 1000 bytes.
        assert (dst[:1000] == 7).all() and (dst[1000:1 << 19] == 5).all()
        assert (dst[1 << 19:] == 6).all()
        # Nothing left behind: no connection inside a request, none polling.
        await asyncio.sleep(0.1)
        assert server.active == 0 and not server.polling


async def test_many_connections_writing_at_once_all_land() -> None:
    """More writers than may poll at once: the ones that cannot poll sleep, none are lost."""
    async with engines(3, **POLLING, **{"transfer.streams_per_peer": 4}) as (a, c, b):
        size = 256 << 10
        dst = np.zeros(8 * size, np.uint8)
        db = await b.register(dst)
        srcs = [pattern(size, 40 + i) for i in range(8)]
        addrs = [await (a if i % 2 else c).register(s) for i, s in enumerate(srcs)]
        reqs = [((a if i % 2 else c),
                 TransferRequest(Opcode.WRITE, addrs[i], b.name, db + i * size, size))
                for i in range(8)]
        for _ in range(3):
            dst[:] = 0
            results = await asyncio.gather(*(e.transfer([r]) for e, r in reqs))
            assert all(res[0].status is RequestStatus.COMPLETED for res in results)
            for i, s in enumerate(srcs):
                assert np.array_equal(dst[i * size:(i + 1) * size], s)


async def test_polling_is_left_to_a_quiet_server() -> None:
    """Idle connections hold nothing: after their requests, however many there are, none is
    inside a request and none polls. While one connection is inside a request (its payload
    half sent), a second one's request is served without polling, and the first resumes."""
    from test_transfer_tcp import _raw_connect

    from transfer.transports.tcp import _MAGIC, _REQ, _RESP

    async with _polling_node() as (dst, db, port, server):
        n = (os.cpu_count() or 1) + 2

        def scenario() -> list[int]:
            conns = [_raw_connect(port) for _ in range(n)]
            try:
                for i, s in enumerate(conns):
                    s.sendall(_REQ.pack(_MAGIC, 1, 0, 1, db + i, 1) + bytes([i + 1]))
                    assert _RESP.unpack(s.recv(_RESP.size, socket.MSG_WAITALL))[1] == 0
                time.sleep(0.2)  # ten poll windows: every connection sleeps now
                seen = [server.active, int(server.polling)]
                slow, quick = conns[0], conns[1]
                slow.sendall(_REQ.pack(_MAGIC, 1, 0, 2, db + 4096, 8192) + b"\x09" * 4096)
                time.sleep(0.05)
                seen.append(server.active)  # the slow write is inside its request
                quick.sendall(_REQ.pack(_MAGIC, 1, 0, 2, db + 100, 4) + b"\x08" * 4)
                assert _RESP.unpack(quick.recv(_RESP.size, socket.MSG_WAITALL))[1] == 0
                slow.sendall(b"\x09" * 4096)
                assert _RESP.unpack(slow.recv(_RESP.size, socket.MSG_WAITALL))[1] == 0
                time.sleep(0.1)
                return seen + [server.active, int(server.polling)]
            finally:
                for s in conns:
                    s.close()

        seen = await asyncio.get_running_loop().run_in_executor(None, scenario)
        assert seen == [0, 0, 1, 0, 0]
        assert dst[:n].tolist() == list(range(1, n + 1))
        assert (dst[100:104] == 8).all() and (dst[4096:4096 + 8192] == 9).all()


def test_usable_cores_follow_affinity_and_a_cgroup_quota(tmp_path) -> None:
    """A container's quota (cgroup v2 ``cpu.max``) caps the cores polling and stream splitting
    count on; no quota, or no cgroup file, leaves the affinity's count."""
    import os

    from transfer.polling import usable_cores

    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(str(tmp_path)) == affinity  # no cpu.max here
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(tmp_path)) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: two cores may run
    assert usable_cores(str(tmp_path)) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("5000 100000\n")
    assert usable_cores(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert usable_cores(str(tmp_path)) == affinity
