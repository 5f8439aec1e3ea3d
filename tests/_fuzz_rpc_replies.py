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

The clients are the decoders under test, so they run here; the hostile server is a process of
its own (``tests/_fuzz_rpc_server.py``), so this process's memory is the clients', hypothesis's
and the lanes' only.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import strategies as st

from _fuzz import FuzzHang, FuzzViolation, Harness
from _fuzz_rpc_server import CALL_TIMEOUT, CONNECT_TIMEOUT, SLACK, Piece, Played, Script
from _fuzz_rpc_server import encode_piece as _encode
from _fuzz_rpc_server import recv_control, send_control

SERVER = Path(__file__).resolve().with_name("_fuzz_rpc_server.py")


@dataclass
class ReplyCase:
    hello: list[Piece]
    reply: list[Piece]
    end: str  # "close" | "stall"
    client: str  # "blocking" | "async"
    good_hello: bool = False
    expect_ok: bool = field(default=False)


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


# -- the clients against the hostile server process ------------------------------------------


def _prompt(played: Played | None, t0: float) -> bool:
    """Whether the server sent its hello and reply well within the client's timeouts.

    Only then is a refused valid answer the client's fault: on a loaded machine (many lanes)
    the server may answer too late, and the client is right to time out.
    """
    return (played is not None and played.hello_at is not None and played.reply_at is not None
            and played.hello_at - t0 < CONNECT_TIMEOUT / 2
            and played.reply_at - played.hello_at < CALL_TIMEOUT / 2)


class _Lane:
    """A control connection to the server process (its hostile listener's port) and an event
    loop for the async client: one case at a time."""

    PLAYED_BOUND = (CONNECT_TIMEOUT + 1) + (CONNECT_TIMEOUT + CALL_TIMEOUT + SLACK + 3) + 2
    """How long the server may take to report a script played (its accept and stall bounds)."""

    def __init__(self, control_port: int) -> None:
        self.control = socket.create_connection(("127.0.0.1", control_port), timeout=10)
        self.control.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = self.control.recv(4, socket.MSG_WAITALL)
        if len(head) != 4:
            raise RuntimeError("the hostile server closed a new lane")
        self.port = int.from_bytes(head, "big")
        self.loop = asyncio.new_event_loop()
        self._played = msgspec.msgpack.Decoder(Played).decode
        self.in_step = True
        """Whether the server has reported every script sent (else the lane must be dropped)."""

    def close(self) -> None:
        self.control.close()
        self.loop.close()

    def arm(self, case: ReplyCase) -> None:
        """Tell the server what to play on the next connection."""
        self.in_step = False
        send_control(self.control, Script(case.hello, case.reply, case.end, case.good_hello))

    def played(self) -> Played | None:
        """What the server did; None if it did not say within the bound (the lane is then out
        of step and must be dropped)."""
        self.control.settimeout(self.PLAYED_BOUND)
        try:
            raw = recv_control(self.control)
        except (OSError, ValueError):
            return None
        if raw is None:
            return None
        self.in_step = True
        return self._played(raw)

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
    """Hostile servers in a process of their own; each case is one call from a fresh client
    of this process.

    A case mostly waits (the client's timeouts against a stalled or dripping peer), so a bulk
    run checks :attr:`lanes` cases at once, each on its own listener and event loop.
    """

    lanes = 32

    def __init__(self, control_port: int, proc: subprocess.Popen[bytes]) -> None:
        self.control_port = control_port
        self.proc = proc
        self._all: list[_Lane] = []
        self._free: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for lane in self._all:
                lane.close()
            self._all.clear()

    def _drop(self, lane: _Lane) -> None:
        with self._lock:
            if lane in self._all:
                self._all.remove(lane)
        lane.close()

    def check(self, case: ReplyCase) -> None:
        try:
            lane = self._free.get_nowait()
        except queue.Empty:  # as many lanes as cases checked at once
            lane = _Lane(self.control_port)
            with self._lock:
                self._all.append(lane)
        try:
            self._check(lane, case)
        finally:
            if lane.in_step:
                self._free.put(lane)
            else:
                self._drop(lane)

    def _check(self, lane: _Lane, case: ReplyCase) -> None:
        from transfer.rpc import RpcError
        from transfer.rpc.testing import Echo

        try:
            lane.arm(case)
        except OSError:
            raise RuntimeError(f"the hostile server is gone ({self.proc.poll()=})") from None
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
        played = lane.played()  # the server is done with the connection: the case is over
        bound = CONNECT_TIMEOUT + CALL_TIMEOUT + SLACK
        if elapsed > bound:
            raise FuzzHang(f"{case.client} client took {elapsed:.2f}s (bound {bound:.1f}s) "
                           f"with {error!r:.200} for {case!r:.600}")
        if error is None and not isinstance(result, Echo):
            # Any body that decodes as the response type is an answer (a map with unknown keys
            # and defaults is, by design: forward compatibility); anything else must raise.
            raise FuzzViolation(f"{case.client} client returned {result!r} for {case!r:.600}")
        if case.expect_ok and error is not None and _prompt(played, t0):
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
    """The hostile server as its own process (``tests/_fuzz_rpc_server.py``)."""
    from transfer.testing import free_port, stop_process, wait_for_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port)],
                            cwd=SERVER.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        h = ReplyHarness(port, proc)
        try:
            yield h
        finally:
            h.close()
    finally:
        stop_process(proc, timeout=5)
