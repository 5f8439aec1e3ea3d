"""Error codes and exceptions of the RPC layer.

Why one hierarchy rooted at :class:`RpcError`: a caller that only cares "did the call work"
catches ``RpcError``; a caller that retries distinguishes "never reached the server / lost the
connection" (:class:`RpcConnectionError`, also a builtin ``ConnectionError``) from "the server
took too long" (:class:`RpcTimeoutError`, also a builtin ``TimeoutError``) from "the server said
no" (plain ``RpcError`` with a :class:`ErrorCode`). Handlers raise ``RpcError`` themselves to
return an application error code; codes ``>= 1000`` are reserved for applications.
"""
from __future__ import annotations

import enum

__all__ = [
    "APPLICATION_CODE_BASE",
    "ErrorCode",
    "RpcAuthError",
    "RpcConnectionError",
    "RpcError",
    "RpcTimeoutError",
]

APPLICATION_CODE_BASE = 1000
"""Error codes from this value up are free for applications; the RPC layer never uses them."""


class ErrorCode(enum.IntEnum):
    """Error codes carried in error replies (and used for client-side failures).

    Codes 1-99 travel on the wire; 100-199 only ever arise on the client side.
    """

    BAD_REQUEST = 1
    """The request body did not decode as the method's request type."""
    UNKNOWN_METHOD = 2
    """No handler is registered under the requested method name."""
    INTERNAL = 3
    """The handler raised an unexpected exception or returned the wrong type."""
    FRAME_TOO_LARGE = 4
    """A request or response frame is larger than the receiver accepts."""
    UNAUTHENTICATED = 5
    """The peer has not (or could not) prove it knows the shared secret."""
    VERSION_MISMATCH = 6
    """Client and server speak different protocol versions."""
    PROTOCOL_ERROR = 7
    """A frame was malformed (not a valid envelope, unexpected message kind)."""
    SHUTTING_DOWN = 8
    """The server is stopping and will not run the request."""

    BAD_RESPONSE = 100
    """Client side: the response did not decode as the expected response type."""
    TIMEOUT = 101
    """Client side: no response within the call's timeout."""
    CONNECTION = 102
    """Client side: could not connect, or the connection was lost."""


def _code(code: int) -> ErrorCode | int:
    try:
        return ErrorCode(code)
    except ValueError:
        return int(code)


class RpcError(Exception):
    """An RPC failed; ``code`` says why (an :class:`ErrorCode`, or an application code).

    Raised client-side for errors the server reported, and by handlers to report an
    application error with their own code.
    """

    code: ErrorCode | int
    message: str

    def __new__(cls, code: int, message: str) -> RpcError:
        # Pass only the message up: OSError-derived subclasses would otherwise read
        # (code, message) as (errno, strerror).
        return super().__new__(cls, message)

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = _code(code)
        self.message = message

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, ErrorCode) else str(self.code)
        return f"{self.message} [{name}]"

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        return (type(self), (int(self.code), self.message))


class RpcConnectionError(RpcError, ConnectionError):
    """Could not connect, the handshake failed on the transport, or the connection was lost.

    A call that fails with this may or may not have run on the server (if it was in flight).
    """

    def __new__(cls, message: str, code: int = ErrorCode.CONNECTION) -> RpcConnectionError:
        return super().__new__(cls, code, message)  # type: ignore[return-value]

    def __init__(self, message: str, code: int = ErrorCode.CONNECTION) -> None:
        super().__init__(code, message)

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # type: ignore[override]
        return (type(self), (self.message, int(self.code)))


class RpcTimeoutError(RpcError, TimeoutError):
    """No response arrived within the call's timeout; the call may still run on the server."""

    def __new__(cls, message: str) -> RpcTimeoutError:
        return super().__new__(cls, ErrorCode.TIMEOUT, message)  # type: ignore[return-value]

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TIMEOUT, message)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # type: ignore[override]
        return (type(self), (self.message,))


class RpcAuthError(RpcError):
    """Shared-secret authentication failed, in either direction."""

    def __new__(cls, message: str) -> RpcAuthError:
        return super().__new__(cls, ErrorCode.UNAUTHENTICATED, message)  # type: ignore[return-value]

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAUTHENTICATED, message)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # type: ignore[override]
        return (type(self), (self.message,))
