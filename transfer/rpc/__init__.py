"""Typed RPC over asyncio TCP: the control plane of the store master, the transfer engine
and the P2P store.

Usage::

    class Put(msgspec.Struct):
        key: str
        value: bytes

    class PutOk(msgspec.Struct):
        version: int

    server = RpcServer("127.0.0.1", 0, secret=b"s3cret")
    server.register("put", Put, PutOk, handle_put)     # sync or async handler
    await server.start()                               # or server.start_in() from sync code

    client = RpcClient("127.0.0.1", server.port, secret=b"s3cret")
    ok = await client.call("put", Put("k", b"v"), PutOk, timeout=5.0)

    sync = SyncRpcClient("127.0.0.1", server.port, secret=b"s3cret")   # any thread
    ok = sync.call("put", Put("k", b"v"), PutOk)

From sync code, ``port = server.start_in()`` runs the server on the process-wide
:func:`get_background_loop` (or a given :class:`BackgroundLoop`) and ``server.stop_in()``
stops it; ``get_background_loop().run(coro, timeout)`` runs any coroutine from a thread.

Wire format (protocol version :data:`PROTOCOL_VERSION`)
-------------------------------------------------------
Frame
    4-byte big-endian unsigned payload length, then the payload. A receiver rejects a
    length above its ``max_frame_size`` (default 64 MiB) as soon as the 4 bytes arrive,
    replies ``FRAME_TOO_LARGE`` and closes. Before the handshake completes the limit is
    4 KiB. Senders check the agreed limit first and fail the call locally instead.
Payload
    A msgpack array ``[kind, request_id, method, body]``:

    ========  ====  ======================  ==========================================
    kind      code  sent by                 body
    ========  ====  ======================  ==========================================
    REQUEST   0     client                  the method's request struct
    RESPONSE  1     server                  the method's response struct
    ERROR     2     server                  ``[code, message]``
    HELLO     3     both, first             ``[version, max_frame_size, nonce, auth_required]``
    AUTH      4     client                  ``[proof]``
    AUTH_OK   5     server                  ``[proof]``
    ========  ====  ======================  ==========================================

    ``request_id`` is chosen by the client (unique per connection, from 1) and echoed in the
    response or error, so any number of calls may be in flight on one connection and may
    complete in any order. ``request_id`` 0 and ``method`` "" mark connection-level messages.
    Bodies are msgspec structs encoded as msgpack (``bytes`` fields travel as msgpack bin);
    each body is decoded straight into the registered type, never unpickled.
Handshake
    The client sends HELLO (its version, its ``max_frame_size``, a 32-byte nonce). The server
    answers ERROR ``VERSION_MISMATCH`` and closes if the versions differ; otherwise HELLO with
    its own limit and nonce and ``auth_required``. Without a secret the connection is now
    ready. With one, the client sends AUTH with ``HMAC-SHA256(secret, "mooncake-rpc/1
    client\\0" + client_nonce + server_nonce)``; the server checks it (constant time) and
    either replies ERROR ``UNAUTHENTICATED`` and closes, or sends AUTH_OK with the same HMAC
    under the ``server`` label, which the client checks in turn (mutual authentication). A
    client configured with a secret refuses a server that does not authenticate. The server
    closes a connection whose handshake is not done within ``handshake_timeout`` (5 s).
    AUTH may name an ``identity`` (``[proof, identity]``): the proof then uses that identity's
    own secret and covers the identity; handlers see it through :func:`peer_identity`.
TLS
    Optional (``tls=`` contexts from :mod:`transfer.tls`): the whole exchange above runs inside
    a TLS connection; it composes with the HMAC handshake.
Errors
    Unknown method, a body that does not decode as the method's type, or a raising handler
    get an ERROR reply with that request's id and the connection stays up. Frames that break
    framing or the envelope, or any message before the handshake, get an ERROR with id 0 and
    the connection is closed. Nothing one connection sends affects any other connection.
"""
from __future__ import annotations

from .blocking import BlockingRpcClient
from .client import RpcClient
from .errors import (
    APPLICATION_CODE_BASE,
    ErrorCode,
    RpcAuthError,
    RpcConnectionError,
    RpcError,
    RpcTimeoutError,
)
from .loop import BackgroundLoop, get_background_loop, new_event_loop
from .server import RpcServer, ServerStats, peer_identity
from .sync_client import SyncRpcClient
from .wire import DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION

__all__ = [
    "APPLICATION_CODE_BASE",
    "DEFAULT_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "BackgroundLoop",
    "BlockingRpcClient",
    "ErrorCode",
    "RpcAuthError",
    "RpcClient",
    "RpcConnectionError",
    "RpcError",
    "RpcServer",
    "RpcTimeoutError",
    "ServerStats",
    "SyncRpcClient",
    "get_background_loop",
    "new_event_loop",
    "peer_identity",
]
