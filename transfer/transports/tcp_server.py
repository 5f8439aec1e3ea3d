"""The TCP data plane's server: a listener per engine, a thread per connection, serving slices
against the engine's registry (the wire format is in :mod:`transfer.transports.tcp_wire`).

The server checks ``[remote_addr, remote_addr + length)`` against its registry *before* touching
memory. A WRITE to a bad range has its payload drained (bounded by ``MAX_SLICE``) and gets an
error status, so the stream stays in sync; a length above ``MAX_SLICE`` or a bad magic closes
the connection.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from transfer.errors import AddressError
from transfer.memory import MemoryRegistry, Region, memory_at
from transfer.polling import poll_recv_exact
from transfer.rpc import auth
from transfer.tls import HANDSHAKE_TIMEOUT
from transfer.transports.base import Opcode
from transfer.transports.tcp_wire import (
    _BAD_RANGE, _BAD_REQUEST, _HELLO, _IO_ERROR, _MAGIC, _MAX_ERROR_TEXT, _OK, _REQ, _RESP, _TAG,
    _VERSION_MISMATCH, _WELCOME, MAX_SLICE, PROTOCOL_VERSION, _kernel_timeouts,
    _recv_exact, _recv_rest, _Sender, _sender, _tune,
)

__all__ = ["RegionIO", "TcpServer", "read_file", "write_file"]

logger = logging.getLogger(__name__)

_HEADER_HIT_MIN = 0.5
_HEADER_PROBE_EVERY = 16
_MAX_SERVER_CONNECTIONS = 512

#: ``(region, remote address, view) -> None``: device/file access the server cannot do with a
#: plain memoryview (CUDA staging); installed by the engine.
RegionIO = Callable[[Region, int, memoryview], None]


class TcpServer:
    """Accepts data connections and serves slices against the engine's registry."""

    def __init__(self, registry: MemoryRegistry, bind_host: str, secret: bytes | None,
                 io_timeout: float, region_io: tuple[Any, ...] | None,
                 tls: ssl.SSLContext | None = None, poll: float = 0.0) -> None:
        self._registry = registry
        self._poll = poll
        # Polling is for a quiet server: one connection at a time polls, and only while no
        # other connection is inside a request (see _receive).
        self._activity = threading.Lock()
        self._active = 0  # connections between a request's header and its answer
        self.polling = False
        self.header_hits = 1.0
        """Moving share of header polls that found their request before giving up."""
        self._header_waits = 0
        self._secret = secret
        self._tls = tls
        self._io_timeout = io_timeout
        self._region_io = region_io
        self._sock = socket.create_server((bind_host, 0), backlog=128)
        self.port = int(self._sock.getsockname()[1])
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"mooncake-tcp-accept:{self.port}")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed or len(self._conns) >= _MAX_SERVER_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="mooncake-tcp-serve").start()

    def _serve(self, raw: socket.socket) -> None:
        conn = raw
        try:
            _tune(raw)
            raw.settimeout(HANDSHAKE_TIMEOUT)
            if self._tls is not None:
                try:
                    conn = self._tls.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    logger.warning("refused a data connection: TLS handshake failed: %s", e)
                    return
                with self._lock:  # close() shuts down what it finds here: the live socket
                    self._conns.discard(raw)
                    self._conns.add(conn)
            if not self._handshake(conn):
                return
            if conn is raw:
                _kernel_timeouts(conn, self._io_timeout)
            self._serve_requests(conn, _sender(conn))
        except (OSError, ConnectionError) as e:
            logger.debug("data connection closed: %s", e)
        finally:
            with self._lock:
                self._conns.discard(raw)
                self._conns.discard(conn)
            conn.close()
            raw.close()

    def _handshake(self, conn: socket.socket) -> bool:
        hello = bytearray(_HELLO.size)
        _recv_exact(conn, memoryview(hello))
        tag, version, client_nonce = _HELLO.unpack(hello)
        if tag != _TAG:
            return False
        if version != PROTOCOL_VERSION:  # say which version this is, then close
            conn.sendall(_WELCOME.pack(_TAG, _VERSION_MISMATCH,
                                       PROTOCOL_VERSION.to_bytes(2, "big") + bytes(30)))
            logger.warning("refused a data connection speaking protocol version %d (this "
                           "engine speaks %d)", version, PROTOCOL_VERSION)
            return False
        server_nonce = auth.new_nonce()
        conn.sendall(_WELCOME.pack(_TAG, 1 if self._secret else 0, server_nonce))
        if self._secret is None:
            return True
        proof = bytearray(32)
        _recv_exact(conn, memoryview(proof))
        expected = auth.client_proof(self._secret, client_nonce, server_nonce)
        if not auth.proof_matches(expected, bytes(proof)):
            conn.sendall(b"\x00" + bytes(32))
            logger.warning("refused an unauthenticated data connection")
            return False
        conn.sendall(b"\x01" + auth.server_proof(self._secret, client_nonce, server_nonce))
        return True

    def _serve_requests(self, conn: socket.socket, send: _Sender) -> None:
        head = bytearray(_REQ.size)
        head_view = memoryview(head)
        kernel = conn.gettimeout() is None  # plain TCP: kernel timeouts, see _kernel_timeouts
        poll = self._poll if kernel and type(conn) is socket.socket else 0.0
        while True:
            # Idle between requests is fine (persistent streams); stalling inside one is not:
            # once a request's first byte arrives, the rest must follow within io_timeout, or a
            # silent peer would hold this server thread forever.
            if kernel:
                self._receive(conn, head_view, poll, idle_ok=True)
            else:
                conn.settimeout(None)
                _recv_exact(conn, head_view[:1])
                conn.settimeout(self._io_timeout)
                _recv_exact(conn, head_view[1:])
            with self._activity:
                self._active += 1
            try:
                if not self._serve_one(conn, send, head, poll):
                    return
            finally:
                with self._activity:
                    self._active -= 1

    @property
    def active(self) -> int:
        """Connections now inside a request (header received, answer not yet sent)."""
        return self._active

    def _serve_one(self, conn: socket.socket, send: _Sender, head: bytearray,
                   poll: float) -> bool:
        """Serve the request whose header is in ``head``; False: close the connection."""
        magic, op, _, tag, addr, length = _REQ.unpack(head)
        if (magic != _MAGIC or op not in (Opcode.READ, Opcode.WRITE)
                or not 0 < length <= MAX_SLICE):
            self._reply_error(conn, tag, _BAD_REQUEST,
                              f"malformed request (op={op}, length={length})")
            return False
        try:
            region = self._registry.find(addr, length)
        except AddressError as e:
            if op == Opcode.WRITE:
                scratch = memoryview(bytearray(min(length, 1 << 20)))
                left = length
                while left:
                    n = min(left, len(scratch))
                    _recv_exact(conn, scratch[:n])
                    left -= n
            self._reply_error(conn, tag, _BAD_RANGE, str(e))
            return True
        if not region.direct:
            self._serve_staged(conn, send, op, tag, region, addr, length)
        elif op == Opcode.WRITE:
            self._receive(conn, memory_at(addr, length), poll)
            conn.sendall(_RESP.pack(_MAGIC, _OK, 0, tag, 0))
        else:
            send(conn, _RESP.pack(_MAGIC, _OK, 0, tag, length), memory_at(addr, length))
        return True

    def _receive(self, conn: socket.socket, view: memoryview, poll: float, *,
                 idle_ok: bool = False) -> None:
        """Receive a header (``idle_ok``) or a write's payload, polling while this server is
        otherwise quiet (see :func:`_recv_exact_polling`).

        Why only then: polling trades a core for latency. With several clients busy at once
        that core is what the other connections need (four clients putting 1 MiB values
        together measured 15-35% less throughput when every connection polled), so a thread
        polls only if no other connection is polling or inside a request, and stops as soon
        as another one starts a request. Polling for a next request is a guess that it comes
        soon; while fewer than half of those guesses pay off (:data:`_HEADER_HIT_MIN`), only
        one wait in :data:`_HEADER_PROBE_EVERY` polls, to notice when they would again.
        """
        got = 0
        if poll > 0 and idle_ok:
            self._header_waits += 1
            if (self.header_hits < _HEADER_HIT_MIN
                    and self._header_waits % _HEADER_PROBE_EVERY):
                poll = 0.0
        if poll > 0:
            others = 0 if idle_ok else 1  # a payload's own request counts as active
            with self._activity:
                mine = not self.polling and self._active <= others
                if mine:
                    self.polling = True
            if mine:
                try:
                    got = poll_recv_exact(conn, view, poll, lambda: self._active > others)
                finally:
                    self.polling = False
                if idle_ok:
                    self.header_hits += ((got > 0) - self.header_hits) / 16
        _recv_rest(conn, view, got, idle_ok)

    def _serve_staged(self, conn: socket.socket, send: _Sender, op: int, tag: int,
                      region: Region, addr: int, length: int) -> None:
        # The engine's region I/O may offer pinned buffers (CUDA) as a third element.
        buffer = self._region_io[2] if self._region_io and len(self._region_io) > 2 else None
        try:
            with (buffer(region, length) if buffer is not None
                  else contextlib.nullcontext(memoryview(bytearray(length)))) as staging:
                if op == Opcode.WRITE:
                    _recv_exact(conn, staging)
                    self._store(region, addr, staging)
                    conn.sendall(_RESP.pack(_MAGIC, _OK, 0, tag, 0))
                else:
                    self._load(region, addr, staging)
                    send(conn, _RESP.pack(_MAGIC, _OK, 0, tag, length), staging)
        except (OSError, RuntimeError, ImportError) as e:
            if isinstance(e, (ConnectionError, socket.timeout, BlockingIOError)):
                raise
            self._reply_error(conn, tag, _IO_ERROR, f"{type(e).__name__}: {e}")

    def _load(self, region: Region, addr: int, dst: memoryview) -> None:
        if region.is_file:
            read_file(region, addr, dst)
        elif self._region_io is not None:
            self._region_io[0](region, addr, dst)
        else:
            raise RuntimeError(f"no staging for {region.location} buffers")

    def _store(self, region: Region, addr: int, src: memoryview) -> None:
        if region.is_file:
            write_file(region, addr, src)
        elif self._region_io is not None:
            self._region_io[1](region, addr, src)
        else:
            raise RuntimeError(f"no staging for {region.location} buffers")

    @staticmethod
    def _reply_error(conn: socket.socket, tag: int, status: int, text: str) -> None:
        data = text.encode("utf-8", "replace")[:_MAX_ERROR_TEXT]
        conn.sendall(_RESP.pack(_MAGIC, status, 0, tag, len(data)) + data)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


def read_file(region: Region, addr: int, dst: memoryview) -> None:
    """Positional read of a file-backed region into ``dst`` (short reads are errors)."""
    assert region.file_fd is not None
    offset = region.file_offset + (addr - region.address)
    done = 0
    while done < len(dst):
        n = os.preadv(region.file_fd, [dst[done:]], offset + done)
        if n == 0:
            raise OSError(f"short read from {region.location} at offset {offset + done}")
        done += n


def write_file(region: Region, addr: int, src: memoryview) -> None:
    """Positional write of ``src`` into a file-backed region."""
    assert region.file_fd is not None
    offset = region.file_offset + (addr - region.address)
    done = 0
    while done < len(src):
        done += os.pwritev(region.file_fd, [src[done:]], offset + done)
