"""The TCP data plane: a data listener per engine and a pool of persistent streams per peer.

Why blocking sockets on worker threads and not asyncio: bulk bytes want ``recv_into`` straight
into the target memory and ``sendmsg`` straight from it, with the GIL released for the whole
syscall; on a 2-core machine an event loop in the middle only adds copies and wake-ups. Each
path (``path % streams_per_peer``) is one connection owned by one thread at a time, so slices on
different paths move in parallel and a retry on another path uses another socket.

Wire format (all integers big-endian)::

    handshake   client -> HELLO   "MCTD" u16 version, 32-byte client nonce
                server -> WELCOME "MCTD" u8 auth_required, 32-byte server nonce
                if auth_required: client -> 32-byte HMAC proof;
                                  server -> u8 ok + 32-byte server proof (or u8 0 and close)
    request     u16 magic, u8 opcode, u8 0, u32 tag, u64 remote_addr, u64 length,
                8 zero bytes [+ payload]
    response    u16 magic, u8 status, u8 0, u32 tag, u64 length [+ payload or error text]

The request header is padded to 32 bytes on purpose: the payload's offset in the stream decides
how the receiver's kernel copy lines up, and after a 24-byte header four parallel 16 MiB writes
took 1.3-1.4x as long as after a 32- or 64-byte one (bare sockets, same sender, this machine).

The server checks ``[remote_addr, remote_addr + length)`` against its registry *before* touching
memory. A WRITE to a bad range has its payload drained (bounded by ``MAX_SLICE``) and gets an
error status, so the stream stays in sync; a length above ``MAX_SLICE`` or a bad magic closes
the connection.

With TLS (``tls`` contexts from :mod:`transfer.tls`) each connection is wrapped right after
``connect``/``accept`` and everything above runs inside it: the HMAC handshake still happens (the
two compose), a plaintext peer fails the TLS handshake and is closed before it can send a
request, and with a CA a peer without a certificate from it is refused. Only the send call
differs (``SSLSocket`` has no ``sendmsg``): it is chosen once per connection, so plain TCP keeps
its single ``sendmsg`` per slice.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transfer.errors import AddressError
from transfer.memory import MemoryRegistry, Region, memory_at
from transfer.polling import poll_recv_exact, poll_send
from transfer.rpc import auth
from transfer.tls import HANDSHAKE_TIMEOUT, TlsContexts
from transfer.transports.base import Opcode, Slice, Transport, TransportError

__all__ = ["MAX_SLICE", "PROTOCOL_VERSION", "TcpTransport"]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 2  # 2: 32-byte request header
MAX_SLICE = 256 << 20
_MAGIC = 0x4D43
_HELLO = struct.Struct("!4sH32s")
_WELCOME = struct.Struct("!4sB32s")
_REQ = struct.Struct("!HBBIQQ8x")
_RESP = struct.Struct("!HBBIQ")
_TAG = b"MCTD"
_OK, _BAD_RANGE, _IO_ERROR, _BAD_REQUEST = 0, 1, 2, 3
_MAX_ERROR_TEXT = 4096
_PIPELINE = 8
_HEADER_HIT_MIN = 0.5
_HEADER_PROBE_EVERY = 16
_MAX_SERVER_CONNECTIONS = 512
_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)

#: ``(region, remote address, view) -> None``: device/file access the server cannot do with a
#: plain memoryview (CUDA staging); installed by the engine.
RegionIO = Callable[[Region, int, memoryview], None]


class _RemoteError(Exception):
    pass


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view``. On a plain blocking socket (see :func:`_kernel_timeouts`) one
    ``MSG_WAITALL`` call takes the whole payload: one syscall and one GIL release instead of a
    poll and a partial read per segment."""
    flags = _WAITALL if sock.gettimeout() is None and type(sock) is socket.socket else 0
    while view:
        n = sock.recv_into(view, len(view), flags)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]


def _recv_exact_polling(sock: socket.socket, view: memoryview, poll_s: float, *,
                        idle_ok: bool = False) -> None:
    """:func:`_recv_exact`, polling (see :func:`transfer.polling.poll_recv_exact`) for as long
    as bytes keep coming within ``poll_s`` seconds, then the blocking way. Only plain blocking
    sockets poll (see :func:`_kernel_timeouts`); anything else just receives.

    ``idle_ok``: ``view`` is a request header, which the peer may take as long as it likes to
    start (see :func:`_await_request`); anything else must keep coming within the socket's
    timeout once asked for.
    """
    got = 0
    if poll_s > 0 and view and sock.gettimeout() is None and type(sock) is socket.socket:
        got = poll_recv_exact(sock, view, poll_s)
    _recv_rest(sock, view, got, idle_ok)


def _recv_rest(sock: socket.socket, view: memoryview, got: int, idle_ok: bool) -> None:
    """Receive what polling left of ``view`` (``got`` bytes are in) the blocking way."""
    if got == len(view):
        return
    if got == 0 and idle_ok:
        _await_request(sock, view)
    else:
        _recv_exact(sock, view[got:])


def _await_request(sock: socket.socket, head: memoryview) -> None:
    """Receive a request header on a kernel-timeout socket, idle as long as the peer likes
    before its first byte (a receive timing out with nothing read is just idleness)."""
    while True:
        try:
            n = sock.recv_into(head, len(head), _WAITALL)
        except (BlockingIOError, TimeoutError):
            continue
        if n == 0:
            raise ConnectionError("peer closed the connection")
        if n < len(head):
            _recv_exact(sock, head[n:])
        return


def _kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking with kernel-side send/receive timeouts (``SO_RCVTIMEO``,
    ``SO_SNDTIMEO``).

    Why not ``settimeout``: Python implements it with a non-blocking socket and a ``poll``
    before every call, so each request costs extra syscalls and a bulk receive comes back one
    segment at a time. A blocking socket with kernel timeouts still never waits longer than
    ``seconds`` per call (a stalled peer raises ``BlockingIOError``, an ``OSError``) and can take
    a whole payload in one ``MSG_WAITALL`` receive.
    """
    sock.settimeout(None)
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _send(sock: socket.socket, head: bytes, payload: memoryview | None = None) -> None:
    if payload is None or len(payload) == 0:
        sock.sendall(head)
        return
    sent = sock.sendmsg([head, payload])
    if sent < len(head):
        sock.sendall(head[sent:])
        sock.sendall(payload)
    elif sent < len(head) + len(payload):
        sock.sendall(payload[sent - len(head):])


def _send_polling(sock: socket.socket, head: bytes, payload: memoryview, poll_s: float) -> None:
    """:func:`_send` on a plain blocking socket, polling while its buffer is full for as long
    as it keeps draining within ``poll_s`` (see :func:`transfer.polling.poll_send`), then the
    blocking way (bounded by the kernel send timeout)."""
    try:
        sent = sock.sendmsg([head, payload], (), _DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent < len(head):
        sock.sendall(head[sent:])
        sent = len(head)
    rest = payload[sent - len(head):]
    done = poll_send(sock, rest, poll_s)
    if done < len(rest):
        sock.sendall(rest[done:])


def _send_tls(sock: socket.socket, head: bytes, payload: memoryview | None = None) -> None:
    """:func:`_send` for TLS sockets: two writes (TLS records), still no copy of the payload."""
    sock.sendall(head)
    if payload is not None and len(payload):
        sock.sendall(payload)


_Sender = Callable[[socket.socket, bytes, "memoryview | None"], None]


def _sender(sock: socket.socket) -> _Sender:
    return _send_tls if isinstance(sock, ssl.SSLSocket) else _send


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished peer frees threads
    # No SO_SNDBUF/SO_RCVBUF: setting them turns off the kernel's buffer autotuning, which grows
    # a busy stream's window up to tcp_rmem's maximum (32 MiB here). A fixed 4 MiB measured
    # 16 MiB puts at 1.8-2.1 GB/s against 3.1-3.5 GB/s autotuned (benchmarks/store_bench.py).


class _Server:
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
        if tag != _TAG or version != PROTOCOL_VERSION:
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
        :meth:`_Server._receive`)."""
        self._host = host
        self._bind_host = bind_host or host
        self._secret = auth.check_secret(secret)
        self._streams = streams_per_peer
        self._io_timeout = io_timeout
        self._connect_timeout = connect_timeout
        self._region_io = region_io
        self._server: _Server | None = None
        self._pools: dict[tuple[str, int], list[_Stream]] = {}
        self._executor = ThreadPoolExecutor(max_workers=max(4, 2 * streams_per_peer),
                                            thread_name_prefix="mooncake-tcp")
        self.reconnects = 0

    async def start(self) -> dict[str, Any]:
        self._server = _Server(self._registry, self._bind_host, self._secret, self._io_timeout,
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
            _recv_exact(sock, memoryview(welcome))
            tag, auth_required, server_nonce = _WELCOME.unpack(welcome)
            if tag != _TAG:
                raise ConnectionError(f"{host}:{port} is not a transfer-engine data port")
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
                elif send_polled:
                    _send_polling(sock, head, memory_at(s.local_addr, s.length), poll)
                else:
                    send(sock, head, memory_at(s.local_addr, s.length))
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
                _recv_exact_polling(sock, memory_at(s.local_addr, s.length), poll)
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
