"""Fuzz target: RPC clients against a hostile server (``tests/test_fuzz_rpc_replies.py``,
``benchmarks/fuzz_all.py``).

Why: every component that calls another (store clients, the engine's control plane, the
connector) trusts :class:`~transfer.rpc.BlockingRpcClient` and :class:`~transfer.rpc.RpcClient`
to come back within their timeouts whatever the peer does. A case is a script for the server's
side of one connection: its hello (good, garbage, wrong version, oversized, an error), then its
answer to the call (garbage, wrong request ids - possibly endlessly -, a body of the wrong type,
malformed error replies, an oversized length prefix, truncated frames, a valid answer dripped
byte by byte), then close or stall. The oracle: the call returns (only when a valid answer was
sent, possibly a later protocol's answer with fields it ignores) or raises an
:class:`~transfer.rpc.RpcError` within ``connect_timeout + timeout`` (plus
slack), never another exception and never later.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import strategies as st

from _fuzz import FuzzHang, FuzzViolation, Harness

CONNECT_TIMEOUT = 0.4
CALL_TIMEOUT = 0.3
SLACK = 1.5
"""Scheduling slack on a loaded 2-core machine, on top of the two timeouts."""
DRIP_INTERVAL = 0.1


@dataclass
class Piece:
    """One thing the server sends: ``kind`` is ``raw`` (``data`` as is), ``frame`` (an envelope
    ``[kind, request_id + id_delta, method, body]``), ``prefix`` (a 4-byte length ``n`` and
    ``data``, possibly fewer bytes than announced) or ``drip`` (``data`` one byte at a time)."""

    kind: str
    data: bytes = b""
    frame_kind: int = 1
    id_delta: int = 0
    body: Any = None
    n: int = 0
    repeat: int = 1


@dataclass
class ReplyCase:
    hello: list[Piece]
    reply: list[Piece]
    end: str  # "close" | "stall"
    client: str  # "blocking" | "async"
    good_hello: bool = False
    expect_ok: bool = field(default=False)


def _encode(p: Piece, request_id: int) -> bytes:
    from transfer.rpc.testing import raw_frame

    if p.kind == "frame":
        rid = max(0, request_id + p.id_delta)
        try:
            return raw_frame(p.frame_kind, rid, "echo", p.body)
        except OverflowError:
            return raw_frame(p.frame_kind, rid, "echo", None)
    if p.kind == "prefix":
        return p.n.to_bytes(4, "big") + p.data
    return p.data


# -- cases -----------------------------------------------------------------------------------

_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10)
_good_hello = Piece("frame", frame_kind=3, body=[1, 1 << 20, b"n" * 16, False])
_hello = st.one_of(
    st.just([_good_hello]), st.just([_good_hello]), st.just([_good_hello]),
    st.lists(st.one_of(
        st.builds(Piece, st.just("raw"), st.binary(max_size=64)),
        st.builds(lambda k, body: Piece("frame", frame_kind=k, body=body),
                  st.integers(-2, 8), _msgpack_values | st.sampled_from(
                      [[2, 1 << 20, b"n" * 16, False], [1, 100, b"n" * 16, False],
                       [1, 1 << 20, b"n", False], [1, 1 << 20, b"n" * 16, True],
                       [7, "x"], [5, "no"], [1]])),
        st.builds(lambda n, d: Piece("prefix", d, n=n), st.sampled_from([0, 5, 4097, 1 << 31,
                                                                        (1 << 32) - 1]),
                  st.binary(max_size=16)),
        st.builds(lambda d: Piece("drip", d), st.just(_encode(_good_hello, 0)))),
        min_size=1, max_size=2))
_response = st.builds(
    lambda k, delta, body: Piece("frame", frame_kind=k, id_delta=delta, body=body),
    st.sampled_from([1, 1, 2, 2, 0, 3, 4, 5, 9]), st.sampled_from([0, 0, 0, 1, -1, 1000]),
    st.one_of(st.just({"seq": 1, "payload": b"ok"}), _msgpack_values,
              st.sampled_from([[3, "boom"], [1001, "app"], ["x", 1], [1 << 40, "big"], []])))
_reply_piece = st.one_of(
    _response, _response,
    st.builds(Piece, st.just("raw"), st.binary(max_size=64)),
    st.builds(lambda n, d: Piece("prefix", d, n=n),
              st.sampled_from([0, 3, 100, 70000, 1 << 20, (1 << 20) + 1, 1 << 31, (1 << 32) - 1]),
              st.binary(max_size=32)),
    st.builds(lambda p, r: Piece("frame", frame_kind=1, id_delta=1, body=None, repeat=r),
              st.none(), st.sampled_from([10, 1000])),
    _response.map(lambda p: Piece("drip", _encode(p, 1))))


def _case(hello: list[Piece], reply: list[Piece], end: str, client: str) -> ReplyCase:
    good = hello == [_good_hello]
    ok = (good and bool(reply) and reply[0].kind == "frame" and reply[0].frame_kind == 1
          and reply[0].id_delta == 0 and reply[0].body == {"seq": 1, "payload": b"ok"})
    return ReplyCase(hello, reply if good else [], end, client, good, ok)


reply_cases = st.builds(_case, _hello, st.lists(_reply_piece, max_size=3),
                        st.sampled_from(["close", "close", "stall"]),
                        st.sampled_from(["blocking", "async"]))


# -- the hostile server and the clients ------------------------------------------------------


class _Script:
    """Plays one case on one accepted connection (in its own thread)."""

    def __init__(self, sock: socket.socket, case: ReplyCase) -> None:
        self.sock = sock
        self.case = case
        self.done = threading.Event()
        self.hello_at: float | None = None  # when the hello, then the reply, had been sent
        self.reply_at: float | None = None

    def _read_frame(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        buf = b""
        try:
            while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk
        except OSError:
            return None
        return buf[4:4 + int.from_bytes(buf[:4], "big")]

    def _send(self, pieces: list[Piece], request_id: int) -> bool:
        try:
            for p in pieces:
                data = _encode(p, request_id) * p.repeat
                if p.kind == "drip":
                    for i in range(len(data)):
                        self.sock.sendall(data[i:i + 1])
                        time.sleep(DRIP_INTERVAL)
                else:
                    self.sock.sendall(data)
        except OSError:
            return False
        return True

    def run(self) -> None:
        try:
            if self._read_frame(CONNECT_TIMEOUT + 1) is None:
                return
            if not self._send(self.case.hello, 0):
                return
            self.hello_at = time.monotonic()
            request_id = 1
            if self.case.good_hello:
                req = self._read_frame(CALL_TIMEOUT + CONNECT_TIMEOUT + 1)
                if req is None:
                    return
                with contextlib.suppress(Exception):
                    request_id = int(msgspec.msgpack.decode(req)[1])
                if not self._send(self.case.reply, request_id):
                    return
                self.reply_at = time.monotonic()
            if self.case.end == "stall":
                # Hold the connection (reading) until the client gives up and closes it.
                self.sock.settimeout(CONNECT_TIMEOUT + CALL_TIMEOUT + SLACK + 2)
                with contextlib.suppress(OSError):
                    while self.sock.recv(65536):
                        pass
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.done.set()


def _prompt(script: _Script | None, t0: float) -> bool:
    """Whether the server sent its hello and reply well within the client's timeouts.

    Only then is a refused valid answer the client's fault: on a loaded machine (many lanes)
    this harness's own threads may answer too late, and the client is right to time out.
    """
    return (script is not None and script.hello_at is not None and script.reply_at is not None
            and script.hello_at - t0 < CONNECT_TIMEOUT / 2
            and script.reply_at - script.hello_at < CALL_TIMEOUT / 2)


class _Lane:
    """A hostile listener and an event loop for the async client: one case at a time."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.listener.close()
        self.loop.close()

    def serve_one(self, case: ReplyCase) -> _Script | None:
        self.listener.settimeout(CONNECT_TIMEOUT + 1)
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return None
        script = _Script(sock, case)
        threading.Thread(target=script.run, daemon=True).start()
        return script

    def call(self, case: ReplyCase) -> Any:
        from transfer.rpc import BlockingRpcClient, RpcClient
        from transfer.rpc.testing import Echo

        if case.client == "blocking":
            with BlockingRpcClient("127.0.0.1", self.port,
                                   connect_timeout=CONNECT_TIMEOUT) as c:
                return c.call("echo", Echo(1, b"x"), Echo, timeout=CALL_TIMEOUT)

        async def go() -> Any:
            async with RpcClient("127.0.0.1", self.port, connect_timeout=CONNECT_TIMEOUT) as c:
                return await c.call("echo", Echo(1, b"x"), Echo, timeout=CALL_TIMEOUT)

        return self.loop.run_until_complete(go())


class ReplyHarness(Harness):
    """Hostile servers in this process; each case is one call from a fresh client.

    A case mostly waits (the client's timeouts against a stalled or dripping peer), so a bulk
    run checks :attr:`lanes` cases at once, each on its own listener and event loop.
    """

    lanes = 32

    def __init__(self) -> None:
        self._all: list[_Lane] = []
        self._free: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def close(self) -> None:
        for lane in self._all:
            lane.close()

    def check(self, case: ReplyCase) -> None:
        try:
            lane = self._free.get_nowait()
        except queue.Empty:  # as many lanes as cases checked at once
            lane = _Lane()
            with self._lock:
                self._all.append(lane)
        try:
            self._check(lane, case)
        finally:
            self._free.put(lane)

    def _check(self, lane: _Lane, case: ReplyCase) -> None:
        from transfer.rpc import RpcError
        from transfer.rpc.testing import Echo

        accepted: list[_Script | None] = []
        server = threading.Thread(target=lambda: accepted.append(lane.serve_one(case)),
                                  daemon=True)
        server.start()
        t0 = time.monotonic()
        try:
            result = lane.call(case)
            error: BaseException | None = None
        except RpcError as e:
            result, error = None, e
        except Exception as e:  # anything else is a crash of the client's decoding
            raise FuzzViolation(f"{case.client} client raised {type(e).__name__}: {e!r} for "
                                f"{case!r:.600}") from e
        elapsed = time.monotonic() - t0
        bound = CONNECT_TIMEOUT + CALL_TIMEOUT + SLACK
        if elapsed > bound:
            raise FuzzHang(f"{case.client} client took {elapsed:.2f}s (bound {bound:.1f}s) "
                           f"with {error!r:.200} for {case!r:.600}")
        if error is None and not isinstance(result, Echo):
            # Any body that decodes as the response type is an answer (a map with unknown keys
            # and defaults is, by design: forward compatibility); anything else must raise.
            raise FuzzViolation(f"{case.client} client returned {result!r} for {case!r:.600}")
        server.join(2)
        script = accepted[0] if accepted else None
        if script is not None:
            script.done.wait(CONNECT_TIMEOUT + CALL_TIMEOUT + SLACK + 3)
        if case.expect_ok and error is not None and _prompt(script, t0):
            raise FuzzViolation(f"{case.client} client refused a valid answer: {error!r}")

    def healthy(self) -> None:
        good = ReplyCase([_good_hello], [Piece("frame", frame_kind=1,
                                               body={"seq": 1, "payload": b"ok"})],
                         "close", "blocking", True, True)
        for client in ("blocking", "async"):
            good.client = client
            self.check(good)


@contextlib.contextmanager
def reply_harness() -> Iterator[ReplyHarness]:
    h = ReplyHarness()
    try:
        yield h
    finally:
        h.close()
