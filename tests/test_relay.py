"""The fault-injecting TCP relay (:mod:`transfer.relay`) on loopback: exact bytes, a delay line
that delays without capping throughput, a rate cap, RSTs, bounded buffers and its CLI."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from transfer.relay import Relay, parse_hostport

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


class Echo:
    """A real TCP echo server (upper bound on nothing: it echoes until EOF, then half-closes)."""

    def __init__(self, *, read: bool = True) -> None:
        self.read = read
        self.resets = 0
        self.server: asyncio.Server | None = None
        self.closing = asyncio.Event()

    async def __aenter__(self) -> Echo:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.closing.set()
        self.server.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            if not self.read:
                await self.closing.wait()
                return
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
            w.write_eof()
        except ConnectionResetError:
            self.resets += 1
        finally:
            w.close()


async def _roundtrip(address: tuple[str, int], payload: bytes) -> bytes:
    r, w = await asyncio.open_connection(*address)

    async def send() -> None:
        w.write(payload)
        await w.drain()
        w.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        got = await asyncio.wait_for(r.read(-1), 30)
        await sender
    finally:
        # A reset also fails the sender: retrieve that, or its finalizer logs it at some
        # random later point (CPython 3.11 then trips over it inside an ast.parse).
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        w.close()
    return got


async def test_bytes_cross_intact_both_ways_and_half_close_propagates() -> None:
    payload = os.urandom(8 * MiB + 123)
    async with Echo() as echo, Relay(echo.address) as relay:
        assert await _roundtrip(relay.address, payload) == payload
        assert await _roundtrip(relay.address, b"") == b""
    assert relay.stats.connections == 2 and relay.stats.resets == 0
    assert relay.stats.bytes_to_target == relay.stats.bytes_to_client == len(payload)


async def test_delay_line_delays_each_direction_but_does_not_cap_throughput() -> None:
    delay = 0.1
    async with Echo() as echo, Relay(echo.address, delay=delay) as relay:
        t0 = time.monotonic()
        assert await _roundtrip(relay.address, b"ping") == b"ping"
        rtt = time.monotonic() - t0
        assert rtt >= 2 * delay * 0.95, rtt
        # 16 MiB is 256+ reads each way: a sleep per read would take 2 * 256 * 0.1 s.
        payload = os.urandom(16 * MiB)
        t0 = time.monotonic()
        assert await _roundtrip(relay.address, payload) == payload
        assert time.monotonic() - t0 < 10.0


async def test_rate_caps_the_direction_it_is_set_on() -> None:
    payload = os.urandom(2 * MiB)
    async with Echo() as echo, Relay(echo.address, rate=4 * MiB) as relay:
        t0 = time.monotonic()
        assert await _roundtrip(relay.address, payload) == payload
        # Both directions pay (2 MiB - 256 KiB burst) / 4 MiB/s; they overlap, so >= ~0.43 s.
        assert time.monotonic() - t0 >= 0.4


async def test_doomed_connections_are_reset_with_rst_on_both_sides() -> None:
    async with Echo() as echo, Relay(echo.address, reset_fraction=1.0,
                                     reset_window=256 << 10, seed=3) as relay:
        r, w = await asyncio.open_connection(*relay.address)
        with pytest.raises(ConnectionResetError):
            for _ in range(64):  # 4 MiB, far past any reset point
                w.write(os.urandom(64 << 10))
                await w.drain()
                await asyncio.sleep(0)
            await asyncio.wait_for(r.read(-1), 10)
        w.close()
        for _ in range(100):
            if echo.resets:
                break
            await asyncio.sleep(0.05)
        assert echo.resets == 1  # the target saw an RST too, not a clean FIN
        assert relay.stats.resets == 1 and relay.stats.active == 0


async def test_reset_draws_follow_the_seed_and_fraction() -> None:
    async def pattern(seed: int) -> list[bool]:
        async with Echo() as echo, Relay(echo.address, reset_fraction=0.5, reset_window=1,
                                         seed=seed) as relay:
            out = []
            for _ in range(20):
                try:
                    out.append(await _roundtrip(relay.address, b"x" * 100) != b"x" * 100)
                except ConnectionResetError:
                    out.append(True)
            assert relay.stats.resets == sum(out)
            return out

    a, b = await pattern(11), await pattern(11)
    assert a == b and 0 < sum(a) < 20
    async with Echo() as echo, Relay(echo.address) as relay:
        for _ in range(20):
            assert await _roundtrip(relay.address, b"y" * 100) == b"y" * 100
        assert relay.stats.resets == 0


async def test_reset_per_mib_reaches_one_long_connection() -> None:
    async with Echo() as echo, Relay(echo.address, reset_per_mib=4.0, seed=1) as relay:
        with pytest.raises(ConnectionResetError):
            await _roundtrip(relay.address, os.urandom(32 * MiB))
        assert relay.stats.resets == 1


async def test_buffers_are_bounded_when_the_target_does_not_read() -> None:
    async with Echo(read=False) as echo, Relay(echo.address, max_buffer=1 * MiB) as relay:
        host, port = relay.address
        sock = socket.create_connection((host, port))
        sock.setblocking(False)
        sent, deadline = 0, time.monotonic() + 2.0
        chunk = b"z" * (256 << 10)
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
        sock.close()
        del loop
        # Unbounded, loopback would take gigabytes in 2 s; bounded, only socket buffers + 1 MiB.
        assert sent < 48 * MiB, sent / MiB


async def test_unreachable_target_and_connection_limit_close_clients() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    target = dead.getsockname()[:2]
    dead.close()
    async with Relay(target) as relay:
        r, w = await asyncio.open_connection(*relay.address)
        assert await asyncio.wait_for(r.read(-1), 10) == b""
        w.close()
        assert relay.stats.refused == 1
    async with Echo(read=False) as echo, Relay(echo.address, max_connections=1) as relay:
        _, w1 = await asyncio.open_connection(*relay.address)
        for _ in range(100):
            if relay.stats.active == 1:
                break
            await asyncio.sleep(0.02)
        r2, w2 = await asyncio.open_connection(*relay.address)
        try:
            assert await asyncio.wait_for(r2.read(-1), 10) == b""
        except ConnectionResetError:
            pass  # closed at once either way
        assert relay.stats.refused == 1
        w1.close()
        w2.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Relay(("127.0.0.1", 1), delay=-1)
    with pytest.raises(ValueError):
        Relay(("127.0.0.1", 1), reset_fraction=1.5)
    with pytest.raises(ValueError):
        parse_hostport("nohost")
    assert parse_hostport("[::1]:80") == ("::1", 80)


def test_cli_relays_and_reports_counters_on_sigusr1_and_sigterm() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "transfer.relay", "--listen", "127.0.0.1:0",
                             "--target", f"127.0.0.1:{port}", "--delay-ms", "20", "--seed", "1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("relay listening on "), line
        host, rport = parse_hostport(line.rsplit(" ", 1)[1].strip())
        with socket.create_connection((host, rport), timeout=10) as c:
            peer, _ = srv.accept()
            c.sendall(b"hello")
            peer.settimeout(10)
            assert peer.recv(5) == b"hello"
            peer.sendall(b"world!")
            c.settimeout(10)
            assert c.recv(6) == b"world!"
            peer.close()
        proc.send_signal(signal.SIGUSR1)
        stats = json.loads(proc.stdout.readline())
        assert stats["connections"] == 1 and stats["bytes_to_target"] == 5
        proc.send_signal(signal.SIGTERM)
        final = json.loads(proc.stdout.readline())
        assert final["bytes_to_client"] == 6
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.close()
