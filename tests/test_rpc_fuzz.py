"""Property-based abuse of the RPC layer: the framing state machine, and a live server process
that must survive random, truncated and oversized frames with bounded time and memory."""
from __future__ import annotations

import asyncio
import random
import socket
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transfer.rpc import RpcClient
from transfer.rpc.frames import HEADER_SIZE, FramedProtocol
from transfer.rpc.testing import (
    Echo,
    Empty,
    RawConnection,
    RpcServerProcess,
    ServerInfo,
    raw_frame,
)
from transfer.rpc.wire import Kind

pytestmark = pytest.mark.timeout(120)

SECRET = b"fuzz-secret"
MAX_FRAME = 64 << 10
CLOSE_BOUND_S = 5.0

# -- the framing state machine, in isolation ----------------------------------------------------


class _Collector(FramedProtocol):
    def __init__(self, max_frame_size: int) -> None:
        super().__init__(max_frame_size)
        self.frames: list[bytes] = []
        self.rejected: int | None = None

    def frame_received(self, payload: memoryview) -> None:
        self.frames.append(bytes(payload))

    def frame_too_large(self, length: int) -> None:
        self.rejected = length


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=300, deadline=None, database=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_frames_reassemble_under_any_chunking(payloads, cuts):
    stream = b"".join(_frame(p) for p in payloads)
    proto = _Collector(max_frame_size=300)
    for chunk in _chunked(stream, cuts):
        proto.data_received(chunk)
    assert proto.frames == payloads
    assert proto.rejected is None
    assert proto.peak_buffered <= 300 + HEADER_SIZE


@settings(max_examples=200, deadline=None, database=None)
@given(good=st.lists(st.binary(max_size=100), max_size=5),
       oversize=st.integers(min_value=101, max_value=(1 << 32) - 1),
       tail=st.binary(max_size=500),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_oversize_header_rejected_before_buffering(good, oversize, tail, cuts):
    stream = b"".join(_frame(p) for p in good) + oversize.to_bytes(4, "big") + tail
    proto = _Collector(max_frame_size=100)
    for chunk in _chunked(stream, cuts):
        proto.data_received(chunk)
    assert proto.frames == good  # everything before the bad header, nothing after
    assert proto.rejected == oversize
    assert proto.peak_buffered <= 100 + HEADER_SIZE


# -- a live server under attack -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server():
    with RpcServerProcess(secret=SECRET, max_frame_size=MAX_FRAME, handshake_timeout=2.0) as proc:
        yield proc


def _info(port: int) -> ServerInfo:
    async def ask() -> ServerInfo:
        async with RpcClient("127.0.0.1", port, secret=SECRET, connect_timeout=5) as c:
            assert await c.call("echo", Echo(1, b"ok"), Echo, timeout=5) == Echo(1, b"ok")
            return await c.call("info", Empty(), ServerInfo, timeout=5)

    return asyncio.run(ask())


def _garbage(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)

random_bytes = st.binary(max_size=2048)
prefix_with_garbage = st.builds(
    lambda n, seed: n.to_bytes(4, "big") + _garbage(seed, n),
    st.one_of(st.integers(0, 4096), st.integers(MAX_FRAME - 16, MAX_FRAME)),
    st.integers(0, 1 << 30),
)
huge_prefix = st.builds(
    lambda n, tail: n.to_bytes(4, "big") + tail,
    st.integers(MAX_FRAME + 1, (1 << 32) - 1), st.binary(max_size=64),
)
wellformed_envelope = st.builds(
    lambda kind, rid, method, body: raw_frame(kind, rid, method, body),
    st.integers(-5, 300), st.integers(0, (1 << 64) - 1),
    st.sampled_from(["echo", "echo_async", "info", "sleep", "", "nope"]) | st.text(max_size=30),
    msgpack_values,
)
truncated_valid = st.builds(
    lambda frame, cut: frame[: cut % max(1, len(frame))],
    st.builds(lambda seq, p: raw_frame(Kind.REQUEST, seq + 1, "echo", {"seq": seq, "payload": p}),
              st.integers(0, 1 << 40), st.binary(max_size=512)),
    st.integers(0, 1 << 20),
)
deeply_nested = st.builds(
    lambda depth, kind: raw_frame(kind, 1, "echo", None)[:-1] + b"\x91" * depth + b"\xc0",
    st.integers(500, 4000), st.sampled_from([Kind.REQUEST, Kind.HELLO]),
).map(lambda f: (len(f) - 4).to_bytes(4, "big") + f[4:])
attack_piece = st.one_of(random_bytes, prefix_with_garbage, huge_prefix, wellformed_envelope,
                         truncated_valid, deeply_nested)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(authenticate=st.booleans(), pieces=st.lists(attack_piece, min_size=1, max_size=3))
def test_live_server_survives_hostile_frames(live_server, authenticate, pieces):
    with RawConnection("127.0.0.1", live_server.port, timeout=CLOSE_BOUND_S) as raw:
        if authenticate:
            raw.handshake(SECRET)
        for piece in pieces:
            if not raw.send(piece):
                break  # the server already refused and closed
        try:
            raw.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already reset by the server
        t0 = time.monotonic()
        # With the peer gone (EOF) the server must close within the bound, always...
        frames = raw.recv_until_closed(timeout=CLOSE_BOUND_S)
        assert time.monotonic() - t0 < CLOSE_BOUND_S
    # ...and whatever came back is well-formed replies, never anything else.
    allowed = {Kind.ERROR, Kind.RESPONSE, Kind.HELLO} if authenticate else {Kind.ERROR, Kind.HELLO}
    assert {f.kind for f in frames} <= allowed


def test_live_server_memory_and_service_after_fuzzing(live_server):
    # Runs after the property test in file order; also meaningful on its own.
    before = _info(live_server.port)
    for seed in range(40):
        with RawConnection("127.0.0.1", live_server.port) as raw:
            raw.handshake(SECRET)
            # A maximal frame of garbage: buffered in full, rejected, connection closed.
            raw.send(MAX_FRAME.to_bytes(4, "big") + _garbage(seed, MAX_FRAME))
            frames = raw.recv_until_closed(timeout=CLOSE_BOUND_S)
            assert [f.kind for f in frames] == [Kind.ERROR]
    after = _info(live_server.port)
    assert after.pid == before.pid
    assert after.peak_receive_buffer <= MAX_FRAME + HEADER_SIZE
    assert after.rss_bytes - before.rss_bytes < 32 << 20
    assert after.peak_rss_bytes < before.peak_rss_bytes + (64 << 20)
    deadline = time.monotonic() + 5
    while after.connections_open > 1 and time.monotonic() < deadline:  # only our info client
        time.sleep(0.05)
        after = _info(live_server.port)
    assert after.connections_open == 1


def test_oversize_prefix_closes_without_waiting_for_the_peer(live_server):
    with RawConnection("127.0.0.1", live_server.port) as raw:
        raw.handshake(SECRET)
        raw.send((0xFFFFFFFF).to_bytes(4, "big"))  # no EOF from us: the server must act alone
        t0 = time.monotonic()
        frames = raw.recv_until_closed(timeout=CLOSE_BOUND_S)
        assert time.monotonic() - t0 < 1.0
        assert [f.kind for f in frames] == [Kind.ERROR]
        assert msgspec.msgpack.decode(frames[0].body)[0] == 4  # FRAME_TOO_LARGE


@pytest.mark.parametrize("authenticate", [False, True])
def test_nesting_beyond_the_decoder_limit_is_refused_cleanly(live_server, authenticate):
    frame = raw_frame(Kind.REQUEST, 1, "echo", None)[:-1] + b"\x91" * 3000 + b"\xc0"
    frame = (len(frame) - 4).to_bytes(4, "big") + frame[4:]
    with RawConnection("127.0.0.1", live_server.port) as raw:
        if authenticate:
            raw.handshake(SECRET)
        raw.send(frame)
        frames = raw.recv_until_closed(timeout=CLOSE_BOUND_S)
    assert [f.kind for f in frames] == [Kind.ERROR]
    code, message = msgspec.msgpack.decode(frames[0].body)
    assert code in (5, 7) and ("recursion" in message or "handshake" in message), message
    assert _info(live_server.port).pid == live_server.pid


def test_idle_unauthenticated_connections_are_reaped(live_server):
    socks = [socket.create_connection(("127.0.0.1", live_server.port), timeout=5)
             for _ in range(30)]
    try:
        deadline = time.monotonic() + 2.0 + CLOSE_BOUND_S
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert data[:4] and int.from_bytes(data[:4], "big") == len(data) - 4
    finally:
        for s in socks:
            s.close()


async def test_good_client_served_while_others_send_garbage(live_server):
    port = live_server.port

    async def attacker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 5)
            except OSError:
                continue
            writer.write(rng.randbytes(rng.randint(1, 3000)))
            try:
                writer.write_eof()
                await asyncio.wait_for(reader.read(), CLOSE_BOUND_S)
            except (OSError, TimeoutError):
                pass
            writer.close()

    async with RpcClient("127.0.0.1", port, secret=SECRET) as good:
        async def well_behaved() -> None:
            for i in range(300):
                assert await good.call("echo", Echo(i), Echo, timeout=5) == Echo(i)

        await asyncio.gather(well_behaved(), *(attacker(s) for s in range(8)))
    assert live_server.alive
