"""The messages inside frames: the envelope, its kinds, and the handshake bodies.

Every frame payload is a msgpack array ``[kind, request_id, method, body]`` (:class:`Envelope`).
The envelope is decoded with ``body`` left as :class:`msgspec.Raw` (a zero-copy slice), so the
body is decoded exactly once, straight into the type registered for the method: validation
is msgspec's typed decode, and nothing is ever unpickled.

Why array-like structs: the envelope and handshake messages are positional on the wire, which
keeps a small request's overhead to a handful of bytes and makes trailing fields added by a
later protocol version ignorable by this one.
"""
from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HANDSHAKE_MAX_FRAME_SIZE",
    "MAX_METHOD_LENGTH",
    "MIN_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "Auth",
    "AuthOk",
    "Envelope",
    "ErrorBody",
    "Hello",
    "Kind",
    "VersionProbe",
    "check_max_frame_size",
    "decoder_for",
]

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change to the frame, envelope or handshake format."""

DEFAULT_MAX_FRAME_SIZE = 64 << 20
MIN_MAX_FRAME_SIZE = 4096
HANDSHAKE_MAX_FRAME_SIZE = 4096
"""Frames from a peer that has not finished the handshake are limited to this size, so an
unauthenticated peer can never make us buffer more than a few KiB."""
MAX_METHOD_LENGTH = 256
_NONCE_MIN, _NONCE_MAX = 16, 64


class Kind(enum.IntEnum):
    """The first element of every envelope."""

    REQUEST = 0
    RESPONSE = 1
    ERROR = 2
    HELLO = 3
    AUTH = 4
    AUTH_OK = 5


class Envelope(msgspec.Struct, array_like=True, gc=False):
    """``[kind, request_id, method, body]``; ``body`` is decoded later by the method's type.

    ``request_id`` 0 is reserved for connection-level messages (handshake, fatal errors).
    """

    kind: int
    request_id: Annotated[int, msgspec.Meta(ge=0)]
    method: Annotated[str, msgspec.Meta(max_length=MAX_METHOD_LENGTH)]
    body: msgspec.Raw


class ErrorBody(msgspec.Struct, array_like=True, gc=False):
    """Body of an ``ERROR`` envelope."""

    code: int
    message: str


class VersionProbe(msgspec.Struct, array_like=True, gc=False):
    """The first field of :class:`Hello` alone, so a version mismatch is reported as such even
    when the rest of a future version's hello would not decode."""

    version: int


class Hello(msgspec.Struct, array_like=True, gc=False):
    """Sent by each side at connect: version, receive limit, a fresh nonce for the HMAC
    challenge, and (server only) whether the client must authenticate."""

    version: int
    max_frame_size: Annotated[int, msgspec.Meta(ge=MIN_MAX_FRAME_SIZE, le=(1 << 32) - 1)]
    nonce: Annotated[bytes, msgspec.Meta(min_length=_NONCE_MIN, max_length=_NONCE_MAX)]
    auth_required: bool = False


MAX_IDENTITY_LENGTH = 128


class Auth(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    """Client to server: proof that the client knows the shared secret - or, with an
    ``identity``, that identity's own secret (tenants of the store master)."""

    proof: Annotated[bytes, msgspec.Meta(max_length=64)]
    identity: Annotated[str, msgspec.Meta(max_length=MAX_IDENTITY_LENGTH)] = ""


class AuthOk(msgspec.Struct, array_like=True, gc=False):
    """Server to client: the server's own proof, so authentication is mutual."""

    proof: Annotated[bytes, msgspec.Meta(max_length=64)]


_DECODERS: dict[object, msgspec.msgpack.Decoder[Any]] = {}


def decoder_for(tp: object) -> msgspec.msgpack.Decoder[Any]:
    """Return a cached typed msgpack decoder for ``tp`` (building one costs microseconds)."""
    dec = _DECODERS.get(tp)
    if dec is None:
        dec = _DECODERS[tp] = msgspec.msgpack.Decoder(tp)
    return dec


def check_max_frame_size(value: int) -> int:
    """Validate a configured ``max_frame_size`` (it must fit the 4-byte length prefix)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"max_frame_size must be an int, got {type(value).__name__}")
    if not MIN_MAX_FRAME_SIZE <= value <= (1 << 32) - 1:
        raise ValueError(
            f"max_frame_size must be between {MIN_MAX_FRAME_SIZE} and {(1 << 32) - 1}, got {value}"
        )
    return value
