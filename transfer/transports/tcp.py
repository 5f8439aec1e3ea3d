"""The TCP data plane: a data listener per engine and a pool of persistent streams per peer.

Why blocking sockets on worker threads and not asyncio: bulk bytes want ``recv_into`` straight
into the target memory and ``sendmsg`` straight from it, with the GIL released for the whole
syscall; on a 2-core machine an event loop in the middle only adds copies and wake-ups. Each
path (``path % streams_per_peer``) is one connection owned by one thread at a time, so slices on
different paths move in parallel and a retry on another path uses another socket.

The wire format and the socket calls both ends share are in :mod:`transfer.transports.tcp_wire`,
the server in :mod:`transfer.transports.tcp_server`.

With TLS (``tls`` contexts from :mod:`transfer.tls`) each connection is wrapped right after
``connect``/``accept`` and the whole wire protocol runs inside it: the HMAC handshake still
happens (the two compose), a plaintext peer fails the TLS handshake and is closed before it can
send a request, and with a CA a peer without a certificate from it is refused. Only the send call
differs (``SSLSocket`` has no ``sendmsg``): it is chosen once per connection, so plain TCP keeps
its single ``sendmsg`` per slice.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transfer.memory import MemoryRegistry, memory_at
from transfer.rpc import auth
from transfer.tls import TlsContexts
from transfer.transports.base import Opcode, Slice, Transport, TransportError
from transfer.transports.tcp_server import RegionIO, TcpServer, read_file, write_file
from transfer.transports.tcp_wire import (  # noqa: F401 - re-exported for tests and tools
    _BAD_REQUEST, _HELLO, _MAGIC, _MAX_ERROR_TEXT, _OK, _REQ, _RESP, _TAG, _VERSION_MISMATCH,
    _WELCOME, MAX_SLICE, PROTOCOL_VERSION, _await_request, _kernel_timeouts, _recv_exact,
    _recv_exact_polling, _send, _send_polling, _sender, _tune,
)

__all__ = ["MAX_SLICE", "PROTOCOL_VERSION", "RegionIO", "TcpTransport", "read_file", "write_file"]

logger = logging.getLogger(__name__)

_PIPELINE = 8


class _RemoteError(Exception):
    pass


class _Stream:
    """One persistent, authenticated connection to a peer; used by one thread at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.next_tag = 1

    def drop(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpTransport(Transport):
    """Transport over TCP; see the module docstring for the protocol."""

    name = "tcp"
    gather = True  # a write's payload is sent from its pieces in turn, a read received into them

    def __init__(self, registry: MemoryRegistry, *, host: str, bind_host: str | None = None,
                 secret: bytes | None = None, streams_per_peer: int = 4,
                 io_timeout: float = 10.0, connect_timeout: float = 5.0,
                 region_io: tuple[RegionIO, RegionIO] | None = None,
                 tls: TlsContexts | None = None, busy_poll: float = 0.0,
                 serve_poll: float = 0.0) -> None:
        self._registry = registry
        self.tls = tls
        self.busy_poll = busy_poll
        """Seconds a caller-thread exchange polls for each answer before sleeping (see
        :func:`_recv_exact_polling`); the general path's worker threads never poll."""
        self.serve_poll = serve_poll
        """Seconds the data server polls for a connection's next request after answering one,
        and for each next piece of a write's payload, before it sleeps (see
        :meth:`TcpServer._receive`)."""
        self._host = host
        self._bind_host = bind_host or host
        self._secret = auth.check_secret(secret)
        self._streams = streams_per_peer
        self._io_timeout = io_timeout
        self._connect_timeout = connect_timeout
        self._region_io = region_io
        self._server: TcpServer | None = None
        self._pools: dict[tuple[str, int], list[_Stream]] = {}
        self._executor = ThreadPoolExecutor(max_workers=max(4, 2 * streams_per_peer),
                                            thread_name_prefix="mooncake-tcp")
        self.reconnects = 0

    async def start(self) -> dict[str, Any]:
        self._server = TcpServer(self._registry, self._bind_host, self._secret, self._io_timeout,
                               self._region_io, None if self.tls is None else self.tls.server,
                               poll=self.serve_poll)
        return {"host": self._host, "port": self._server.port}

    def reachable(self, peer_entry: Mapping[str, Any]) -> bool:
        return isinstance(peer_entry.get("host"), str) and isinstance(peer_entry.get("port"), int)

    def streams(self, host: str, port: int) -> list[_Stream]:
        """The streams to ``host:port`` (created lazily; exposed for fault-injection tests)."""
        key = (host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools.setdefault(key, [_Stream(host, port) for _ in range(self._streams)])
        return pool

    async def execute(self, peer_name: str, peer_entry: Mapping[str, Any],
                      peer_buffers: Sequence[Mapping[str, Any]], slices: Sequence[Slice],
                      *, path: int = 0) -> None:
        pool = self.streams(str(peer_entry["host"]), int(peer_entry["port"]))
        stream = pool[path % len(pool)]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._run, stream, slices)

    def _run(self, stream: _Stream, slices: Sequence[Slice]) -> None:
        with stream.lock:
            try:
                if stream.sock is None:
                    stream.sock = self._connect(stream.host, stream.port)
                    self.reconnects += 1
                self._pipeline(stream, slices)
            except _RemoteError as e:
                raise TransportError(str(e), retryable=False) from None
            except (OSError, ConnectionError, struct.error) as e:
                stream.drop()
                raise TransportError(
                    f"tcp stream to {stream.host}:{stream.port} failed: "
                    f"{e or type(e).__name__}") from None

    def _connect(self, host: str, port: int) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=self._connect_timeout)
        try:
            _tune(sock)
            if self.tls is not None:  # handshake now, within connect_timeout
                sock = self.tls.client.wrap_socket(sock, server_hostname=host)
            client_nonce = auth.new_nonce()
            sock.sendall(_HELLO.pack(_TAG, PROTOCOL_VERSION, client_nonce))
            welcome = bytearray(_WELCOME.size)
            try:
                _recv_exact(sock, memoryview(welcome))
            except ConnectionError:
                raise ConnectionError(
                    f"{host}:{port} closed the data connection during the handshake (not a "
                    "transfer-engine data port, or one of an older protocol version)") from None
            tag, auth_required, server_nonce = _WELCOME.unpack(welcome)
            if tag != _TAG:
                raise ConnectionError(f"{host}:{port} is not a transfer-engine data port")
            if auth_required == _VERSION_MISMATCH:
                theirs = int.from_bytes(server_nonce[:2], "big")
                raise _RemoteError(
                    f"{host}:{port} speaks data-plane protocol version {theirs}, this engine "
                    f"{PROTOCOL_VERSION}: run the same release of mooncake-connector on both")
            if self._secret is not None and not auth_required:
                raise _RemoteError(f"{host}:{port} does not authenticate; refusing to use it")
            if auth_required:
                if self._secret is None:
                    raise _RemoteError(f"{host}:{port} requires authentication (auth_secret)")
                sock.sendall(auth.client_proof(self._secret, client_nonce, server_nonce))
                answer = bytearray(33)
                _recv_exact(sock, memoryview(answer))
                expected = auth.server_proof(self._secret, client_nonce, server_nonce)
                if answer[0] != 1 or not auth.proof_matches(expected, bytes(answer[1:])):
                    raise _RemoteError(f"authentication with {host}:{port} failed")
            if self.tls is None:
                _kernel_timeouts(sock, self._io_timeout)
            else:
                sock.settimeout(self._io_timeout)
            return sock
        except BaseException:
            sock.close()
            raise

    def _pipeline(self, stream: _Stream, slices: Sequence[Slice], poll: float = 0.0) -> None:
        """Send up to ``_PIPELINE`` requests ahead of their responses (order is preserved);
        ``poll``: seconds to poll for each response and read payload before sleeping."""
        sock = stream.sock
        assert sock is not None
        send = _sender(sock)
        send_polled = poll > 0 and send is _send and sock.gettimeout() is None
        resp = bytearray(_RESP.size)
        resp_view = memoryview(resp)
        inflight: list[tuple[int, Slice]] = []
        first_error: str | None = None
        i = 0
        while i < len(slices) or inflight:
            if i < len(slices) and len(inflight) < _PIPELINE:
                s = slices[i]
                i += 1
                tag = stream.next_tag
                stream.next_tag = (tag + 1) & 0xFFFFFFFF
                head = _REQ.pack(_MAGIC, s.opcode, 0, tag, s.remote_addr, s.length)
                if s.opcode != Opcode.WRITE:
                    send(sock, head, None)
                else:
                    for address, n in s.pieces():  # one payload, gathered from the pieces
                        if send_polled:
                            _send_polling(sock, head, memory_at(address, n), poll)
                        else:
                            send(sock, head, memory_at(address, n))
                        head = b""
                inflight.append((tag, s))
                continue
            tag, s = inflight.pop(0)
            _recv_exact_polling(sock, resp_view, poll)
            magic, status, _, rtag, length = _RESP.unpack(resp)
            if magic != _MAGIC or rtag != tag:
                raise ConnectionError("response out of sync (bad magic or tag)")
            if status != _OK:
                if length > _MAX_ERROR_TEXT:
                    raise ConnectionError("oversized error reply")
                text = bytearray(length)
                _recv_exact(sock, memoryview(text))
                first_error = first_error or f"peer refused: {text.decode('utf-8', 'replace')}"
                if status == _BAD_REQUEST:
                    raise ConnectionError(first_error)
                continue
            if s.opcode == Opcode.READ:
                if length != s.length:
                    raise ConnectionError(f"peer sent {length} bytes, asked for {s.length}")
                for address, n in s.pieces():  # scattered into the pieces, in order
                    _recv_exact_polling(sock, memory_at(address, n), poll)
        if first_error is not None:
            raise _RemoteError(first_error)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for pool in self._pools.values():
            for stream in pool:
                stream.drop()
        self._pools.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
