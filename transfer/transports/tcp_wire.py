"""The TCP data plane's wire format and the socket calls both of its ends share.

Wire format (all integers big-endian)::

    handshake   client -> HELLO   "MCTD" u16 version, 32-byte client nonce
                server -> WELCOME "MCTD" u8 auth_required, 32-byte server nonce
                          (another version: auth byte 0xFF, the server's u16 version, close)
                if auth_required: client -> 32-byte HMAC proof;
                                  server -> u8 ok + 32-byte server proof (or u8 0 and close)
    request     u16 magic, u8 opcode, u8 0, u32 tag, u64 remote_addr, u64 length,
                8 zero bytes [+ payload]
    response    u16 magic, u8 status, u8 0, u32 tag, u64 length [+ payload or error text]

The request header is padded to 32 bytes on purpose: the payload's offset in the stream decides
how the receiver's kernel copy lines up, and after a 24-byte header four parallel 16 MiB writes
took 1.3-1.4x as long as after a 32- or 64-byte one (bare sockets, same sender, this machine).

Plain TCP sockets are blocking with kernel-side timeouts (:func:`_kernel_timeouts`); receives and
sends may poll before they sleep (:mod:`transfer.polling`).
"""
from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable

from transfer.polling import poll_recv_exact, poll_send

__all__ = ["MAX_SLICE", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 2  # 2: 32-byte request header
MAX_SLICE = 256 << 20
_MAGIC = 0x4D43
_HELLO = struct.Struct("!4sH32s")
_WELCOME = struct.Struct("!4sB32s")
_REQ = struct.Struct("!HBBIQQ8x")
_RESP = struct.Struct("!HBBIQ")
_TAG = b"MCTD"
_OK, _BAD_RANGE, _IO_ERROR, _BAD_REQUEST = 0, 1, 2, 3
_VERSION_MISMATCH = 0xFF  # in WELCOME's auth byte: the nonce's first two bytes are our version
_MAX_ERROR_TEXT = 4096
_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


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
