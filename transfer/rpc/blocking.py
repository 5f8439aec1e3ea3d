"""A blocking-socket RPC client that runs each call entirely on the calling thread.

Why another client: :class:`~transfer.rpc.SyncRpcClient` hands every call to the background
loop and wakes the caller when the loop has the answer - two thread switches per call, tens of
microseconds each on a small machine, which is most of a small store operation. This client
speaks the same protocol (frames of :mod:`.frames`, envelopes and handshake of :mod:`.wire`,
HMAC mutual authentication of :mod:`.auth`) over a plain blocking socket, one connection per
calling thread, so a call is one ``sendall`` and one or two ``recv_into`` with the GIL released.

One call at a time per connection: a call that fails mid-way (timeout, lost connection, a frame
that breaks the protocol) closes its connection, because what is left on the stream can no longer
be trusted; the next call on that thread connects again. Like :class:`~transfer.rpc.RpcClient`,
it never resends a request on its own.
"""
from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from typing import TypeVar

import msgspec

from transfer.polling import poll_recv_into

from . import auth
from .client import check_identity
from .errors import ErrorCode, RpcAuthError, RpcConnectionError, RpcError, RpcTimeoutError
from .frames import HEADER_SIZE, encode_frame
from .wire import (
    DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    Auth,
    AuthOk,
    Envelope,
    ErrorBody,
    Hello,
    Kind,
    VersionProbe,
    check_max_frame_size,
    decoder_for,
)

__all__ = ["BlockingRpcClient"]

R = TypeVar("R")
_HEADER = struct.Struct(">I")
_ENVELOPE = msgspec.msgpack.Decoder(Envelope)
_ERROR = msgspec.msgpack.Decoder(ErrorBody)
_HELLO = msgspec.msgpack.Decoder(Hello)
_PROBE = msgspec.msgpack.Decoder(VersionProbe)
_AUTH_OK = msgspec.msgpack.Decoder(AuthOk)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)
_RECV_CHUNK = 64 << 10  # frames up to this size are read with no per-frame allocation


class _Broken(Exception):
    """The connection is unusable; the wrapped :class:`RpcError` is what the caller sees."""

    def __init__(self, error: RpcError) -> None:
        super().__init__(str(error))
        self.error = error


class _Connection:
    """One handshaken blocking socket and its receive buffer (used by one thread)."""

    def __init__(self, address: str, sock: socket.socket, max_frame_size: int) -> None:
        self.address = address
        self.sock = sock
        self.max_frame_size = HANDSHAKE_MAX_FRAME_SIZE
        self.own_max = max_frame_size
        self.send_limit = HANDSHAKE_MAX_FRAME_SIZE
        self.encoder = msgspec.msgpack.Encoder()
        self.next_id = 1
        self._buf = bytearray(_RECV_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.deadline = 0.0
        """When the current call (or the handshake) must be over; 0 for no bound. Checked before
        every receive, so a peer dripping bytes cannot stretch a call past its timeout."""
        self.poll = 0.0
        """Seconds the next receive polls before sleeping (set per call, used once)."""

    def _recv_into(self, view: memoryview) -> int:
        if self.poll:
            poll, self.poll = self.poll, 0.0
            if type(self.sock) is socket.socket:  # TLS records need the blocking read
                self.sock.settimeout(0)  # see transfer.polling
                n = poll_recv_into(self.sock, view, poll)
                if not self.deadline:  # back to blocking (with a deadline, it is set below)
                    self.sock.settimeout(None)
                if n is not None:
                    return n
        if self.deadline:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline passed")
            self.sock.settimeout(left)
        return self.sock.recv_into(view)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, frame: bytes | bytearray) -> None:
        self.sock.sendall(frame)

    def _fill(self, need: int) -> None:
        """Make ``need`` bytes available from ``_start`` (``need`` <= buffer size)."""
        if self._start + need > len(self._buf):
            held = self._end - self._start
            self._buf[:held] = self._buf[self._start:self._end]
            self._start, self._end = 0, held
        while self._end - self._start < need:
            n = self._recv_into(self._view[self._end:])
            if n == 0:
                raise ConnectionError("the server closed the connection")
            self._end += n

    def read_frame(self) -> memoryview:
        """The next frame's payload; valid until the next read."""
        self._fill(HEADER_SIZE)
        (length,) = _HEADER.unpack_from(self._buf, self._start)
        if length > self.max_frame_size:
            raise _Broken(RpcError(
                ErrorCode.FRAME_TOO_LARGE,
                f"{self.address} sent a frame of {length} bytes, over the "
                f"{self.max_frame_size}-byte limit"))
        self._start += HEADER_SIZE
        if length <= len(self._buf):
            self._fill(length)
            payload = self._view[self._start:self._start + length]
            self._start += length
            return payload
        big = bytearray(length)
        have = self._end - self._start
        big[:have] = self._buf[self._start:self._end]
        self._start = self._end = 0
        view = memoryview(big)
        while have < length:
            n = self._recv_into(view[have:])
            if n == 0:
                raise ConnectionError("the server closed the connection")
            have += n
        return view


class BlockingRpcClient:
    """Blocking RPC client, thread-safe by giving every calling thread its own connection.

    Same arguments, errors and ``timeout`` meaning as :class:`~transfer.rpc.RpcClient`.
    Connections are made lazily (bounded by ``connect_timeout``, handshake included) and
    closed by :meth:`close`. Not usable across ``fork()``.
    """

    def __init__(self, host: str, port: int, *, secret: bytes | None = None,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 connect_timeout: float = 5.0, tls: ssl.SSLContext | None = None,
                 identity: str | None = None, busy_poll: float = 0.0) -> None:
        self.host = host
        self.busy_poll = busy_poll
        """Seconds each call polls for its reply before sleeping (0: never)."""
        self.port = int(port)
        self.address = f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self._secret = auth.check_secret(secret)
        self._identity = check_identity(identity, self._secret)
        self._tls = tls
        self._max_frame_size = check_max_frame_size(max_frame_size)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[_Connection] = set()
        self._pid = os.getpid()
        self._closed = False

    @property
    def connections(self) -> int:
        """Open connections (one per thread that has called)."""
        return len(self._all)

    def call(self, method: str, request: msgspec.Struct, response_type: type[R],
             timeout: float | None = 30.0) -> R:
        """Call ``method`` and return its response decoded as ``response_type``.

        Raises :class:`RpcError` for errors the server reports (the connection stays up),
        :class:`RpcTimeoutError` or :class:`RpcConnectionError` otherwise (the connection is
        closed; the call may or may not have run on the server).
        """
        if self._closed:
            raise RpcConnectionError(f"client for {self.address} is closed")
        if self._pid != os.getpid():
            raise RuntimeError("BlockingRpcClient cannot be used across fork(); create a new "
                               "one in the child process")
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
        request_id = conn.next_id
        conn.next_id = request_id + 1
        frame = encode_frame(conn.encoder, (0, request_id, method, request))
        size = len(frame) - HEADER_SIZE
        if size > conn.send_limit:
            raise RpcError(ErrorCode.FRAME_TOO_LARGE,
                           f"request for {method!r} is {size} bytes, over the "
                           f"{conn.send_limit}-byte frame limit agreed with {self.address}")
        try:
            conn.sock.settimeout(timeout)
            conn.deadline = time.monotonic() + timeout if timeout is not None else 0.0
            conn.send(frame)
            conn.poll = self.busy_poll
            while True:
                env = _decode_envelope(conn, conn.read_frame())
                if env.request_id != request_id and env.request_id != 0:
                    continue  # cannot happen with one call at a time; tolerated, not trusted
                if env.kind == Kind.RESPONSE:
                    try:
                        return decoder_for(response_type).decode(env.body)  # type: ignore[no-any-return]
                    except _DECODE_ERRORS as e:
                        raise RpcError(ErrorCode.BAD_RESPONSE,
                                       f"response to {method!r} from {self.address} does not "
                                       f"decode as the expected type: {e}") from None
                if env.kind == Kind.ERROR:
                    body = _decode_error(conn, env)
                    if env.request_id == 0:
                        raise _Broken(RpcError(
                            body.code, f"{self.address} closed the connection: {body.message}"))
                    raise RpcError(body.code, body.message)
                raise _Broken(RpcConnectionError(
                    f"unexpected message kind {env.kind} from {self.address}",
                    ErrorCode.PROTOCOL_ERROR))
        except _Broken as e:
            self._drop(conn)
            raise e.error from None
        except socket.timeout:
            self._drop(conn)
            raise RpcTimeoutError(
                f"{method!r} on {self.address}: no response within {timeout}s") from None
        except OSError as e:  # ConnectionError included
            self._drop(conn)
            raise RpcConnectionError(
                f"connection to {self.address} lost during {method!r}: {e}") from None

    def close(self) -> None:
        """Close every thread's connection; later calls raise :class:`RpcConnectionError`."""
        self._closed = True
        with self._lock:
            conns, self._all = self._all, set()
        for conn in conns:
            conn.close()

    def __enter__(self) -> BlockingRpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connecting ---------------------------------------------------------------------------

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._all.discard(conn)

    def _connect(self) -> _Connection:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as e:
            raise RpcConnectionError(f"cannot connect to {self.address}: {e}") from None
        conn = _Connection(self.address, sock, self._max_frame_size)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:  # the handshake runs now, bounded by connect_timeout
                sock = conn.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            conn.deadline = time.monotonic() + self.connect_timeout
            self._handshake(conn)
        except _Broken as e:
            conn.close()
            raise e.error from None
        except RpcError:
            conn.close()
            raise
        except socket.timeout:
            conn.close()
            raise RpcConnectionError(f"connecting to {self.address} timed out after "
                                     f"{self.connect_timeout}s") from None
        except OSError as e:
            conn.close()
            raise RpcConnectionError(f"handshake with {self.address} failed: {e}") from None
        with self._lock:
            if self._closed:
                conn.close()
                raise RpcConnectionError(f"client for {self.address} is closed")
            self._all.add(conn)
        self._local.conn = conn
        return conn

    def _handshake(self, conn: _Connection) -> None:
        """HELLO both ways, then (with a secret) AUTH / AUTH_OK: see :mod:`transfer.rpc`."""
        nonce = auth.new_nonce()
        conn.send(encode_frame(conn.encoder, (Kind.HELLO, 0, "",
                                              Hello(PROTOCOL_VERSION, conn.own_max, nonce))))
        env = self._expect(conn, Kind.HELLO)
        try:
            version = _PROBE.decode(env.body).version
            if version != PROTOCOL_VERSION:
                raise RpcError(ErrorCode.VERSION_MISMATCH,
                               f"{self.address} speaks RPC protocol version {version}, "
                               f"this client speaks {PROTOCOL_VERSION}")
            hello = _HELLO.decode(env.body)
        except _DECODE_ERRORS as e:
            raise RpcConnectionError(f"malformed hello from {self.address}: {e}",
                                     ErrorCode.PROTOCOL_ERROR) from None
        conn.send_limit = min(hello.max_frame_size, conn.own_max)
        if hello.auth_required:
            if self._secret is None:
                raise RpcAuthError(f"{self.address} requires a shared secret and none is "
                                   "configured")
            proof = auth.client_proof(self._secret, nonce, hello.nonce, self._identity)
            conn.send(encode_frame(conn.encoder,
                                   (Kind.AUTH, 0, "", Auth(proof, self._identity))))
            env = self._expect(conn, Kind.AUTH_OK)
            try:
                ok = _AUTH_OK.decode(env.body)
            except _DECODE_ERRORS as e:
                raise RpcConnectionError(f"malformed auth reply from {self.address}: {e}",
                                         ErrorCode.PROTOCOL_ERROR) from None
            expected = auth.server_proof(self._secret, nonce, hello.nonce, self._identity)
            if not auth.proof_matches(expected, ok.proof):
                raise RpcAuthError(f"{self.address} failed to prove it knows the shared secret")
        elif self._secret is not None:
            raise RpcAuthError(f"a shared secret is configured but {self.address} does not "
                               "authenticate (it cannot prove it knows the secret)")
        conn.max_frame_size = conn.own_max

    def _expect(self, conn: _Connection, kind: Kind) -> Envelope:
        env = _decode_envelope(conn, conn.read_frame())
        if env.kind == Kind.ERROR:
            body = _decode_error(conn, env)
            if body.code == ErrorCode.UNAUTHENTICATED:
                raise RpcAuthError(f"{self.address} refused the connection: {body.message}")
            raise RpcError(body.code, f"{self.address} closed the connection: {body.message}")
        if env.kind != kind:
            raise RpcConnectionError(f"handshake with {self.address}: expected {kind.name}, "
                                     f"got kind {env.kind}", ErrorCode.PROTOCOL_ERROR)
        return env


def _decode_envelope(conn: _Connection, payload: memoryview) -> Envelope:
    try:
        return _ENVELOPE.decode(payload)  # type: ignore[no-any-return]
    except _DECODE_ERRORS as e:
        raise _Broken(RpcConnectionError(f"malformed frame from {conn.address}: {e}",
                                         ErrorCode.PROTOCOL_ERROR)) from None


def _decode_error(conn: _Connection, env: Envelope) -> ErrorBody:
    try:
        return _ERROR.decode(env.body)  # type: ignore[no-any-return]
    except _DECODE_ERRORS as e:
        raise _Broken(RpcConnectionError(f"malformed error reply from {conn.address}: {e}",
                                         ErrorCode.PROTOCOL_ERROR)) from None
