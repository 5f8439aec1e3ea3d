"""The hostile RPC server of the ``rpc_client_replies`` fuzz target, as a process of its own.

Why a process: that target fuzzes the RPC *clients*, so the clients stay in the fuzzing process
and everything else leaves it; the memory measured there is then hypothesis, the lanes and the
clients, not the server's threads and buffers too. Run as
``python tests/_fuzz_rpc_server.py --port P``.

Each control connection to ``P`` is one lane: the server opens a hostile listener for it and
sends its port, then, for every script the lane sends, accepts one connection on that listener,
plays the script on it (hello, reply, then close or stall) and answers when it sent what.
Control frames are a 4-byte length and a msgpack body of a fixed type (never pickle), at most
:data:`MAX_CONTROL_FRAME` bytes; anything else ends the lane.
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec

CONNECT_TIMEOUT = 0.4
CALL_TIMEOUT = 0.3
SLACK = 1.5
"""Scheduling slack on a loaded 2-core machine, on top of the two timeouts."""
DRIP_INTERVAL = 0.1
MAX_CONTROL_FRAME = 1 << 20
"""A script is a few pieces of at most 64 bytes each; anything near this is not one."""


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


class Script(msgspec.Struct):
    """What the server does on the next connection of a lane."""

    hello: list[Piece]
    reply: list[Piece]
    end: str  # "close" | "stall"
    good_hello: bool


class Played(msgspec.Struct):
    """What happened: whether a client connected, and when (``time.monotonic()``, which is
    the system-wide CLOCK_MONOTONIC on Linux, so comparable with the fuzzing process's clock)
    the hello, then the reply, had been sent."""

    accepted: bool
    hello_at: float | None = None
    reply_at: float | None = None


def encode_piece(p: Piece, request_id: int) -> bytes:
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


def send_control(sock: socket.socket, msg: msgspec.Struct) -> None:
    data = msgspec.msgpack.encode(msg)
    sock.sendall(len(data).to_bytes(4, "big") + data)


def recv_control(sock: socket.socket) -> bytes | None:
    """One control frame's body; None at EOF. A frame over the bound raises ValueError."""
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if n > MAX_CONTROL_FRAME:
        raise ValueError(f"control frame of {n} bytes (bound {MAX_CONTROL_FRAME})")
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _Player:
    """Plays one script on one accepted connection."""

    def __init__(self, sock: socket.socket, script: Script) -> None:
        self.sock = sock
        self.script = script
        self.played = Played(accepted=True)

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
                data = encode_piece(p, request_id) * p.repeat
                if p.kind == "drip":
                    for i in range(len(data)):
                        self.sock.sendall(data[i:i + 1])
                        time.sleep(DRIP_INTERVAL)
                else:
                    self.sock.sendall(data)
        except OSError:
            return False
        return True

    def run(self) -> Played:
        try:
            self._play()
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
        return self.played

    def _play(self) -> None:
        if self._read_frame(CONNECT_TIMEOUT + 1) is None:
            return
        if not self._send(self.script.hello, 0):
            return
        self.played.hello_at = time.monotonic()
        request_id = 1
        if self.script.good_hello:
            req = self._read_frame(CALL_TIMEOUT + CONNECT_TIMEOUT + 1)
            if req is None:
                return
            with contextlib.suppress(Exception):
                request_id = int(msgspec.msgpack.decode(req)[1])
            if not self._send(self.script.reply, request_id):
                return
            self.played.reply_at = time.monotonic()
        if self.script.end == "stall":
            # Hold the connection (reading) until the client gives up and closes it.
            self.sock.settimeout(CONNECT_TIMEOUT + CALL_TIMEOUT + SLACK + 2)
            with contextlib.suppress(OSError):
                while self.sock.recv(65536):
                    pass


def serve_lane(control: socket.socket) -> None:
    """One lane: a hostile listener, then one script per control frame until EOF."""
    decode = msgspec.msgpack.Decoder(Script).decode
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(CONNECT_TIMEOUT + 1)
        control.sendall(listener.getsockname()[1].to_bytes(4, "big"))
        while True:
            raw = recv_control(control)
            if raw is None:
                return
            script = decode(raw)
            try:
                sock, _ = listener.accept()
            except OSError:
                send_control(control, Played(accepted=False))
                continue
            send_control(control, _Player(sock, script).run())
    except (OSError, ValueError, msgspec.DecodeError) as e:
        print(f"lane ended: {e!r}", file=sys.stderr, flush=True)
    finally:
        listener.close()
        control.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    server = socket.create_server(("127.0.0.1", args.port), backlog=64)
    while True:
        control, _ = server.accept()
        control.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve_lane, args=(control,), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
