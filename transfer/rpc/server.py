"""The RPC server: typed method registry, handshake, dispatch, back-pressure.

Each connection is a :class:`_ServerConnection` protocol. Sync handlers run inline in
``data_received`` (no task per request: that is most of the latency budget); coroutine
handlers run as tasks so that many can be in flight. A bad frame, an unknown method, a body of
the wrong type or a raising handler gets an error reply; only a frame that breaks the framing
or the handshake closes that connection, and nothing one connection does affects the others.
"""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import msgspec

from . import auth
from .client import _set_nodelay
from .errors import ErrorCode, RpcError
from .frames import HEADER_SIZE, FramedProtocol, encode_frame
from .loop import BackgroundLoop, get_background_loop
from .wire import (
    DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_MAX_FRAME_SIZE,
    MAX_METHOD_LENGTH,
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

__all__ = ["RpcServer", "ServerStats", "peer_identity"]

logger = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")

_ENVELOPE = msgspec.msgpack.Decoder(Envelope)
_HELLO = msgspec.msgpack.Decoder(Hello)
_PROBE = msgspec.msgpack.Decoder(VersionProbe)
_AUTH = msgspec.msgpack.Decoder(Auth)
# RecursionError: msgspec refuses input nested deeper than its limit (even inside a Raw).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)
_REQUEST = int(Kind.REQUEST)  # plain ints on the hot path (IntEnum lookups cost)
_RESPONSE = int(Kind.RESPONSE)
_ERROR_KIND = int(Kind.ERROR)

#: Resolves a client-named identity to its secret (``None``: unknown identity).
IdentitySecrets = Callable[[str], "bytes | None"]

_IDENTITY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mooncake_rpc_identity", default=None)


def peer_identity() -> str | None:
    """The identity the calling connection authenticated as, inside a handler.

    ``None`` for connections authenticated with the server's shared secret (or none). Set for
    sync handlers and inherited by the tasks of ``async`` ones. Why a context variable and not a
    handler argument: only the few servers with identities (the multi-tenant master) need it,
    and every other handler keeps its one-argument signature.
    """
    return _IDENTITY.get()



@dataclass(frozen=True)
class _Method(Generic[Req, Resp]):
    name: str
    request_type: type[Req]
    response_type: type[Resp]
    decoder: msgspec.msgpack.Decoder[Any]
    handler: Callable[[Req], Resp | Awaitable[Resp]]
    is_coroutine: bool


@dataclass(frozen=True)
class ServerStats:
    """A snapshot of server counters, for metrics and for tests that bound memory."""

    connections_accepted: int
    connections_open: int
    requests: int
    error_replies: int
    handshake_failures: int
    peak_receive_buffer: int
    """Largest partial frame any connection has buffered (never above max_frame_size + 4)."""


class _ServerConnection(FramedProtocol):
    def __init__(self, server: RpcServer) -> None:
        super().__init__(HANDSHAKE_MAX_FRAME_SIZE)
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.ready = False
        self.send_limit = HANDSHAKE_MAX_FRAME_SIZE
        self.encoder = msgspec.msgpack.Encoder()
        self.tasks: set[asyncio.Task[None]] = set()
        self._state = Kind.HELLO
        self.identity: str | None = None
        self._client_nonce = b""
        self._server_nonce = b""
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._reading_paused = False
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        _set_nodelay(transport)
        server = self.server
        if server._server is None:  # accepted just as stop() began: refuse quietly
            self._closing = True
            self.stop_reading_frames()
            transport.close()
            return
        server._connections.add(self)
        server._accepted += 1
        self._timer = asyncio.get_running_loop().call_later(
            server.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.stop_reading_frames()
        if self._timer is not None:
            self._timer.cancel()
        server = self.server
        server._connections.discard(self)
        server._peak_closed = max(server._peak_closed, self.peak_buffered)
        for task in self.tasks:
            task.cancel()

    def eof_received(self) -> bool:
        return False  # close; replies to requests still running are dropped

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Stop reading requests while the peer is not reading replies, or while too many
        handlers of this connection are running: the server's memory stays bounded."""
        if self.transport is None or self._closing:
            return
        want_pause = (self._write_paused
                      or len(self.tasks) >= self.server.max_inflight_per_connection)
        if want_pause != self._reading_paused:
            self._reading_paused = want_pause
            if want_pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close_with_error(self, code: ErrorCode, message: str) -> None:
        """Send a connection-level error (request id 0), then close after it is flushed."""
        if self._closing:
            return
        self._closing = True
        self.stop_reading_frames()
        if not self.ready:
            self.server._handshake_failures += 1
        self._write_error(0, code, message)
        if self.transport is not None:
            self.transport.close()

    def _handshake_expired(self) -> None:
        self.close_with_error(
            ErrorCode.UNAUTHENTICATED if self.server.auth_required else ErrorCode.PROTOCOL_ERROR,
            f"handshake not completed within {self.server.handshake_timeout}s")

    # -- sending ------------------------------------------------------------------------------

    def _write_error(self, request_id: int, code: int, message: str) -> None:
        self.server._error_replies += 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = ErrorBody(int(code), message)
        transport.write(encode_frame(self.encoder, (_ERROR_KIND, request_id, "", body)))

    def _send_response(self, method: _Method[Any, Any], request_id: int, result: object) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not isinstance(result, method.response_type):
            self._write_error(request_id, ErrorCode.INTERNAL,
                              f"{method.name!r} handler returned {type(result).__name__}, "
                              f"expected {method.response_type.__name__}")
            return
        try:
            frame = encode_frame(self.encoder, (_RESPONSE, request_id, "", result))
        except (TypeError, ValueError, msgspec.EncodeError) as e:
            logger.error("%r: response from handler is not encodable: %s", method.name, e)
            self._write_error(request_id, ErrorCode.INTERNAL,
                              f"{method.name!r} response is not encodable: {e}")
            return
        size = len(frame) - HEADER_SIZE
        if size > self.send_limit:
            self._write_error(request_id, ErrorCode.FRAME_TOO_LARGE,
                              f"{method.name!r} response is {size} bytes, over the "
                              f"{self.send_limit}-byte frame limit of this connection")
            return
        transport.write(frame)

    def _send_handshake(self, kind: Kind, body: msgspec.Struct) -> None:
        assert self.transport is not None
        self.transport.write(encode_frame(self.encoder, (kind, 0, "", body)))

    # -- receiving ----------------------------------------------------------------------------

    def frame_too_large(self, length: int) -> None:
        if self.ready:
            msg = f"frame of {length} bytes exceeds max_frame_size {self.max_frame_size}"
        else:
            msg = (f"frame of {length} bytes before the handshake completed "
                   f"(limit {self.max_frame_size})")
        self.close_with_error(ErrorCode.FRAME_TOO_LARGE, msg)

    def frame_received(self, payload: memoryview) -> None:
        try:
            env = _ENVELOPE.decode(payload)
        except _DECODE_ERRORS as e:
            logger.info("closing %s: malformed frame: %s", self.peer, e)
            self.close_with_error(ErrorCode.PROTOCOL_ERROR, f"malformed frame: {e}")
            return
        if self.ready:
            if env.kind == _REQUEST:
                self._dispatch(env)
            else:
                self._write_error(env.request_id, ErrorCode.PROTOCOL_ERROR,
                                  f"unexpected message kind {env.kind} from a client")
            return
        try:
            self._handshake(env)
        except _DECODE_ERRORS as e:
            self.close_with_error(ErrorCode.PROTOCOL_ERROR, f"malformed handshake message: {e}")

    def _handshake(self, env: Envelope) -> None:
        server = self.server
        if env.kind != self._state:
            code = ErrorCode.UNAUTHENTICATED if server.auth_required else ErrorCode.PROTOCOL_ERROR
            self.close_with_error(code, f"expected a {self._state.name} message to start the "
                                        f"handshake, got kind {env.kind}")
            return
        if env.kind == Kind.HELLO:
            version = _PROBE.decode(env.body).version
            if version != PROTOCOL_VERSION:
                self.close_with_error(
                    ErrorCode.VERSION_MISMATCH,
                    f"client speaks RPC protocol version {version}, "
                    f"server speaks {PROTOCOL_VERSION}")
                return
            hello = _HELLO.decode(env.body)
            self.send_limit = min(hello.max_frame_size, server.max_frame_size)
            self._client_nonce = hello.nonce
            self._server_nonce = auth.new_nonce()
            self._send_handshake(Kind.HELLO, Hello(
                PROTOCOL_VERSION, server.max_frame_size, self._server_nonce,
                auth_required=server.auth_required))
            if not server.auth_required:
                self._handshake_done()
            else:
                self._state = Kind.AUTH
            return
        msg = _AUTH.decode(env.body)
        identity = msg.identity
        if identity:
            secret = server._identities(identity) if server._identities is not None else None
        else:
            secret = server._secret
        # An unknown identity costs the same HMAC as a known one: timing tells nothing.
        expected = auth.client_proof(secret or b"\x00", self._client_nonce, self._server_nonce,
                                     identity)
        if secret is None or not auth.proof_matches(expected, msg.proof):
            logger.warning("rejecting %s: wrong %s", self.peer,
                           "identity or secret" if identity else "shared secret")
            self.close_with_error(ErrorCode.UNAUTHENTICATED, "authentication failed")
            return
        self._send_handshake(Kind.AUTH_OK, AuthOk(
            auth.server_proof(secret, self._client_nonce, self._server_nonce, identity)))
        self.identity = identity or None
        self._handshake_done()

    def _handshake_done(self) -> None:
        self.ready = True
        self.max_frame_size = self.server.max_frame_size
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _dispatch(self, env: Envelope) -> None:
        if self.identity is None:
            self._dispatch_as(env)
            return
        token = _IDENTITY.set(self.identity)
        try:
            self._dispatch_as(env)  # async handlers' tasks copy the context here
        finally:
            _IDENTITY.reset(token)

    def _dispatch_as(self, env: Envelope) -> None:
        server = self.server
        server._requests += 1
        request_id = env.request_id
        method = server._methods.get(env.method)
        if method is None:
            self._write_error(request_id, ErrorCode.UNKNOWN_METHOD,
                              f"unknown method {env.method!r}")
            return
        try:
            request = method.decoder.decode(env.body)
        except _DECODE_ERRORS as e:
            self._write_error(request_id, ErrorCode.BAD_REQUEST,
                              f"{method.name!r} request does not decode as "
                              f"{method.request_type.__name__}: {e}")
            return
        try:
            result = method.handler(request)
        except RpcError as e:
            self._write_error(request_id, e.code, e.message)
            return
        except Exception as e:
            self._handler_failed(method, request_id, e)
            return
        # Checked in this order so the common sync case costs one isinstance.
        if not method.is_coroutine and isinstance(result, method.response_type):
            self._send_response(method, request_id, result)
        elif inspect.isawaitable(result):
            self._spawn(method, request_id, result)
        else:
            self._send_response(method, request_id, result)  # replies INTERNAL: wrong type

    def _handler_failed(self, method: _Method[Any, Any], request_id: int, e: Exception) -> None:
        logger.exception("handler for %r failed", method.name, exc_info=e)
        self._write_error(request_id, ErrorCode.INTERNAL,
                          f"{method.name!r} handler raised {type(e).__name__}: {e}")

    def _spawn(self, method: _Method[Any, Any], request_id: int, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(self._run(method, request_id, awaitable))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.tasks) >= self.server.max_inflight_per_connection:
            self._update_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._reading_paused:
            self._update_reading()

    async def _run(self, method: _Method[Any, Any], request_id: int,
                   awaitable: Awaitable[Any]) -> None:
        try:
            result = await awaitable
        except RpcError as e:
            self._write_error(request_id, e.code, e.message)
        except asyncio.CancelledError:
            raise  # the connection or the server is going away; nobody to reply to
        except Exception as e:
            self._handler_failed(method, request_id, e)
        else:
            self._send_response(method, request_id, result)


class RpcServer:
    """Serves registered methods over TCP to :class:`~transfer.rpc.RpcClient` peers.

    Register methods (before or after :meth:`start`), then ``await start()`` on an event loop,
    or call :meth:`start_in` from sync code to run it on a :class:`BackgroundLoop`. Sync
    handlers run inline on the event loop and must not block; put blocking work in an
    ``async def`` handler (e.g. with ``loop.run_in_executor``).

    ``tls`` (a server-side :class:`ssl.SSLContext`, see :mod:`transfer.tls`) wraps every
    connection in TLS before the RPC handshake; a peer that does not speak TLS is dropped after
    the TLS handshake fails and never sees a frame. ``identities`` lets clients authenticate as
    a named identity with its own secret instead of ``secret`` (see :func:`peer_identity`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: bytes | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        handshake_timeout: float = 5.0,
        max_inflight_per_connection: int = 1024,
        tls: ssl.SSLContext | None = None,
        identities: IdentitySecrets | None = None,
    ) -> None:
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        if max_inflight_per_connection < 1:
            raise ValueError("max_inflight_per_connection must be at least 1")
        self.host = host
        self._requested_port = int(port)
        self.max_frame_size = check_max_frame_size(max_frame_size)
        self.handshake_timeout = handshake_timeout
        self.max_inflight_per_connection = max_inflight_per_connection
        self._secret = auth.check_secret(secret)
        self._tls = tls
        self._identities = identities
        self.auth_required = self._secret is not None or identities is not None
        self._methods: dict[str, _Method[Any, Any]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._port: int | None = None
        self._connections: set[_ServerConnection] = set()
        self._background: BackgroundLoop | None = None
        self._accepted = 0
        self._requests = 0
        self._error_replies = 0
        self._handshake_failures = 0
        self._peak_closed = 0

    def register(
        self,
        method: str,
        request_type: type[Req],
        response_type: type[Resp],
        handler: Callable[[Req], Resp | Awaitable[Resp]],
    ) -> None:
        """Serve ``method``: decode requests as ``request_type``, pass them to ``handler``,
        and send back its result, which must be a ``response_type``.

        ``handler`` may be sync (runs inline, must not block) or ``async`` (runs as a task).
        It may raise :class:`RpcError` to reply with its own error code.
        """
        if not isinstance(method, str) or not method or len(method) > MAX_METHOD_LENGTH:
            raise ValueError(f"method name must be a non-empty str of at most "
                             f"{MAX_METHOD_LENGTH} characters, got {method!r}")
        if method in self._methods:
            raise ValueError(f"method {method!r} is already registered")
        if not callable(handler):
            raise TypeError(f"handler for {method!r} is not callable")
        for tp in (request_type, response_type):
            if not isinstance(tp, type):
                raise TypeError(f"{tp!r} is not a type")
        self._methods[method] = _Method(
            name=method,
            request_type=request_type,
            response_type=response_type,
            decoder=decoder_for(request_type),
            handler=handler,
            is_coroutine=inspect.iscoroutinefunction(handler),
        )

    @property
    def methods(self) -> tuple[str, ...]:
        """Names of the registered methods."""
        return tuple(self._methods)

    @property
    def port(self) -> int:
        """The bound port (the OS-chosen one when constructed with ``port=0``)."""
        if self._port is None:
            raise RuntimeError("server is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it."""
        return f"{self.host}:{self.port}"

    @property
    def is_serving(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    def stats(self) -> ServerStats:
        """Current counters (call from the server's loop or accept a slightly stale view)."""
        conns = list(self._connections)
        return ServerStats(
            connections_accepted=self._accepted,
            connections_open=len(conns),
            requests=self._requests,
            error_replies=self._error_replies,
            handshake_failures=self._handshake_failures,
            peak_receive_buffer=max([self._peak_closed, *(c.peak_buffered for c in conns)]),
        )

    async def start(self) -> None:
        """Bind and start accepting connections on the running loop."""
        if self._server is not None:
            raise RuntimeError("server is already started")
        loop = asyncio.get_running_loop()
        tls_options = ({} if self._tls is None else
                       {"ssl": self._tls, "ssl_handshake_timeout": self.handshake_timeout})
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), self.host, self._requested_port, reuse_address=True,
            **tls_options)
        self._port = int(self._server.sockets[0].getsockname()[1])
        logger.debug("RPC server listening on %s:%d", self.host, self._port)

    async def stop(self) -> None:
        """Stop listening and close every connection; running handlers are cancelled and
        their callers see a connection error. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        conns = list(self._connections)
        for conn in conns:
            conn._closing = True
            conn.stop_reading_frames()
            if conn.transport is not None:
                conn.transport.close()
        tasks = [t for c in conns for t in c.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await server.wait_closed()
        # Let the transports deliver connection_lost so the stats settle.
        for _ in range(10):
            if not self._connections:
                break
            await asyncio.sleep(0.01)

    def start_in(self, loop: BackgroundLoop | None = None, timeout: float = 30.0) -> int:
        """Start on a background loop from sync code (default: the process-wide one).

        Returns the bound port. Stop it with :meth:`stop_in`.
        """
        background = loop if loop is not None else get_background_loop()
        background.run(self.start(), timeout)
        self._background = background
        background.on_stop(self.stop)
        return self.port

    def stop_in(self, timeout: float = 30.0) -> None:
        """Stop a server started with :meth:`start_in`, from sync code."""
        background, self._background = self._background, None
        if background is None:
            raise RuntimeError("server was not started with start_in()")
        background.run(self.stop(), timeout)

    async def __aenter__(self) -> RpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
