"""A real RPC server in a child process, shared by tests and benchmarks.

Why a separate process: restart and crash behaviour (``kill -9`` with calls in flight), server
memory under hostile input, and latency without the client competing for the same GIL all
need the server to be a process of its own. Run directly with
``python -m transfer.rpc.testing [--host H] [--port P] [--max-frame-size N]``; the shared
secret, if any, comes hex-encoded in ``MOONCAKE_RPC_TEST_SECRET`` (never on the command line,
where ``ps`` would show it). The child prints ``PORT <n>`` once it is listening.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from transfer.testing import stop_process

from . import auth
from .errors import APPLICATION_CODE_BASE, RpcError
from .frames import HEADER_SIZE
from .loop import new_event_loop
from .server import RpcServer
from .wire import DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION, Envelope, Kind

__all__ = [
    "SECRET_ENV",
    "Echo",
    "Empty",
    "RawConnection",
    "RpcServerProcess",
    "ServerInfo",
    "Sleep",
    "build_test_server",
    "raw_frame",
]

SECRET_ENV = "MOONCAKE_RPC_TEST_SECRET"


class Echo(msgspec.Struct):
    """Request and response of ``echo`` / ``echo_async``."""

    seq: int = 0
    payload: bytes = b""


class Sleep(msgspec.Struct):
    """``sleep``: answer after ``seconds`` (an async handler)."""

    seconds: float
    seq: int = 0


class Empty(msgspec.Struct):
    pass


class ServerInfo(msgspec.Struct):
    """``info``: what a test needs to check the server process is sane."""

    pid: int
    rss_bytes: int
    peak_rss_bytes: int
    peak_receive_buffer: int
    max_frame_size: int
    connections_open: int
    requests: int
    handshake_failures: int


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: peak is the best we have
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_test_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    secret: bytes | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    handshake_timeout: float = 5.0,
) -> RpcServer:
    """An :class:`RpcServer` with the diagnostic methods: ``echo`` (sync), ``echo_async``,
    ``sleep`` (async), ``fail`` (raises ValueError), ``app_error`` (raises an application
    :class:`RpcError`), ``info`` (:class:`ServerInfo`)."""
    server = RpcServer(host, port, secret=secret, max_frame_size=max_frame_size,
                       handshake_timeout=handshake_timeout)

    def echo(req: Echo) -> Echo:
        return req

    async def echo_async(req: Echo) -> Echo:
        return req

    async def sleep(req: Sleep) -> Sleep:
        await asyncio.sleep(req.seconds)
        return req

    def fail(req: Echo) -> Echo:
        raise ValueError(f"fail called with seq={req.seq}")

    def app_error(req: Echo) -> Echo:
        raise RpcError(APPLICATION_CODE_BASE + req.seq, f"application error {req.seq}")

    def info(_: Empty) -> ServerInfo:
        stats = server.stats()
        return ServerInfo(
            pid=os.getpid(),
            rss_bytes=_rss_bytes(),
            peak_rss_bytes=_peak_rss_bytes(),
            peak_receive_buffer=stats.peak_receive_buffer,
            max_frame_size=server.max_frame_size,
            connections_open=stats.connections_open,
            requests=stats.requests,
            handshake_failures=stats.handshake_failures,
        )

    server.register("echo", Echo, Echo, echo)
    server.register("echo_async", Echo, Echo, echo_async)
    server.register("sleep", Sleep, Sleep, sleep)
    server.register("fail", Echo, Echo, fail)
    server.register("app_error", Echo, Echo, app_error)
    server.register("info", Empty, ServerInfo, info)
    return server


@dataclass
class RpcServerProcess:
    """:func:`build_test_server` running in a child process; a context manager.

    ``port=0`` lets the child pick; pass the previous ``port`` to restart on the same one.
    """

    host: str = "127.0.0.1"
    port: int = 0
    secret: bytes | None = None
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    handshake_timeout: float = 5.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> RpcServerProcess:
        env = dict(os.environ)
        env.pop(SECRET_ENV, None)
        if self.secret is not None:
            env[SECRET_ENV] = self.secret.hex()
        cmd = [sys.executable, "-m", "transfer.rpc.testing", "--host", self.host,
               "--port", str(self.port), "--max-frame-size", str(self.max_frame_size),
               "--handshake-timeout", str(self.handshake_timeout)]
        self._proc = proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"RPC test server did not report its port within {timeout}s")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 64)
                if not chunk:
                    continue
                line += chunk
        if not line.startswith(b"PORT "):
            self.stop()
            raise RuntimeError(f"unexpected output from RPC test server: {line!r}")
        self.port = int(line.split()[1])
        return self

    def kill(self) -> None:
        """SIGKILL: the server dies with no chance to close connections cleanly."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self.stop()  # reap and close the pipe

    def stop(self) -> None:
        """SIGTERM (then SIGKILL), and reap."""
        if self._proc is not None:
            stop_process(self._proc)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def __enter__(self) -> RpcServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def raw_frame(kind: int, request_id: int, method: str, body: object) -> bytes:
    """A frame built by hand, for speaking (or abusing) the protocol without the client."""
    payload = msgspec.msgpack.encode([kind, request_id, method, body])
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


class RawConnection:
    """A blocking socket speaking the wire format by hand; every read has a deadline.

    For tests that must send what :class:`~transfer.rpc.RpcClient` never would.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buf = b""
        self.closed_by_peer = False

    def send(self, data: bytes) -> bool:
        """Send raw bytes; False if the peer already closed (reset/broken pipe)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def hello(self, version: int = PROTOCOL_VERSION, max_frame_size: int = 1 << 20,
              nonce: bytes | None = None) -> None:
        self.send(raw_frame(Kind.HELLO, 0, "", [version, max_frame_size,
                                                nonce or auth.new_nonce(), False]))

    def handshake(self, secret: bytes | None) -> None:
        """Complete a proper handshake (as the real client would), or raise AssertionError."""
        nonce = auth.new_nonce()
        self.hello(nonce=nonce)
        reply = self.recv_frame()
        assert reply is not None and reply.kind == Kind.HELLO, reply
        server_nonce = msgspec.msgpack.decode(reply.body)[2]
        if secret is None:
            return
        self.send(raw_frame(Kind.AUTH, 0, "", [auth.client_proof(secret, nonce, server_nonce)]))
        ok = self.recv_frame()
        assert ok is not None and ok.kind == Kind.AUTH_OK, ok

    def _fill(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("peer sent nothing and did not close before the deadline")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            raise TimeoutError("peer sent nothing and did not close before the deadline")
        if not chunk:
            self.closed_by_peer = True
            return False
        self._buf += chunk
        return True

    def recv_frame(self, timeout: float | None = None) -> Envelope | None:
        """The next whole frame as an :class:`Envelope`, or None if the peer closed first.

        Raises TimeoutError if neither happens in time, ValueError on a malformed frame.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self._buf) >= HEADER_SIZE:
                n = int.from_bytes(self._buf[:HEADER_SIZE], "big")
                if len(self._buf) >= HEADER_SIZE + n:
                    payload = self._buf[HEADER_SIZE:HEADER_SIZE + n]
                    self._buf = self._buf[HEADER_SIZE + n:]
                    try:
                        return msgspec.msgpack.decode(payload, type=Envelope)
                    except msgspec.MsgspecError as e:
                        raise ValueError(f"malformed frame from server: {e}") from e
            if not self._fill(deadline):
                if self._buf:
                    raise ValueError(f"peer closed mid-frame ({len(self._buf)} bytes left)")
                return None

    def recv_until_closed(self, timeout: float | None = None) -> list[Envelope]:
        """All frames until the peer closes; TimeoutError if it does not close in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        frames: list[Envelope] = []
        while True:
            frame = self.recv_frame(timeout=max(0.0, deadline - time.monotonic()))
            if frame is None:
                return frames
            frames.append(frame)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScriptedPeer:
    """One connection to :func:`scripted_server`, seen from the server script's side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, timeout: float = 10.0) -> list[Any]:
        """The next frame, decoded to a plain ``[kind, request_id, method, body]`` list."""
        async def read_one() -> list[Any]:
            n = int.from_bytes(await self._reader.readexactly(HEADER_SIZE), "big")
            return list(msgspec.msgpack.decode(await self._reader.readexactly(n)))

        return await asyncio.wait_for(read_one(), timeout)

    def send(self, kind: int, request_id: int, method: str, body: object) -> None:
        self._writer.write(raw_frame(kind, request_id, method, body))

    async def until_eof(self, timeout: float = 10.0) -> None:
        """Wait for the client to hang up (reading, so the client's writes drain)."""
        await asyncio.wait_for(self._reader.read(), timeout)


@contextlib.asynccontextmanager
async def scripted_server(
    script: Callable[[ScriptedPeer], Awaitable[None]], host: str = "127.0.0.1",
) -> AsyncIterator[int]:
    """A server whose side of the protocol is a hand-written script; yields its port.

    For testing the client's own checks (an impostor's proof, a future protocol version, a
    server that stops reading), which the real server never exercises.
    """

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(ScriptedPeer(reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, host, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-frame-size", type=int, default=DEFAULT_MAX_FRAME_SIZE)
    parser.add_argument("--handshake-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    secret_hex = os.environ.get(SECRET_ENV)
    secret = bytes.fromhex(secret_hex) if secret_hex else None

    async def serve() -> None:
        server = build_test_server(args.host, args.port, secret=secret,
                                   max_frame_size=args.max_frame_size,
                                   handshake_timeout=args.handshake_timeout)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write(f"PORT {server.port}\n")
        sys.stdout.flush()
        await stop.wait()
        await server.stop()

    loop = new_event_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()


if __name__ == "__main__":
    main()
