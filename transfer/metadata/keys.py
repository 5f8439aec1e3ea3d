"""The metadata key scheme, in one place, and the rules every key must obey.

Keys follow Mooncake's ``transfer_metadata.cpp`` so a Python engine and a C++ engine can share one
metadata server: a segment named ``host:port`` (no ``/``) is a RAM segment stored under
``mooncake/ram/host:port``; a name that already contains ``/`` (``nvmeof/disk0``) is stored under
``mooncake/<name>``; RPC endpoints live under ``mooncake/rpc_meta/<name>``.

Key validation lives here too because server and clients must agree on it: a client rejects a bad
key before it touches the network, and the server rejects it again (never trust the client).
"""
from __future__ import annotations

import unicodedata

__all__ = [
    "KEY_PREFIX",
    "SEGMENT_PREFIX",
    "RPC_META_PREFIX",
    "MAX_KEY_BYTES",
    "segment_key",
    "rpc_meta_key",
    "parse_segment_key",
    "validate_key",
    "validate_prefix",
    "prefix_range_end",
]

#: Root of every key Mooncake writes.
KEY_PREFIX = "mooncake/"
#: Where descriptors of RAM segments (names without ``/``) live.
SEGMENT_PREFIX = KEY_PREFIX + "ram/"
#: Where engines publish the ``host:port`` of their RPC endpoint.
RPC_META_PREFIX = KEY_PREFIX + "rpc_meta/"

#: Longest key, in UTF-8 bytes, any backend accepts. Segment keys are ~50 bytes; the store's keys
#: embed object keys (hashes), so leave room, but not so much that a key is a payload channel.
MAX_KEY_BYTES = 1024


def segment_key(segment_name: str) -> str:
    """Key of the descriptor of ``segment_name``, exactly as Mooncake spells it."""
    _check_name(segment_name, "segment name")
    if "/" in segment_name:
        return KEY_PREFIX + segment_name
    return SEGMENT_PREFIX + segment_name


def rpc_meta_key(server_name: str) -> str:
    """Key under which the engine ``server_name`` publishes its RPC address."""
    _check_name(server_name, "server name")
    return RPC_META_PREFIX + server_name


def parse_segment_key(key: str) -> str | None:
    """Inverse of :func:`segment_key`; ``None`` for keys that are not segment descriptors.

    The P2P backend needs it to turn a key back into the peer to ask.
    """
    if key.startswith(RPC_META_PREFIX) or not key.startswith(KEY_PREFIX):
        return None
    if key.startswith(SEGMENT_PREFIX):
        name = key[len(SEGMENT_PREFIX):]
        return name if name and "/" not in name else None
    name = key[len(KEY_PREFIX):]
    # A name with "/" (nvmeof/x) maps to mooncake/<name>; "ram/..." was handled above.
    return name if "/" in name and not name.startswith("/") and not name.endswith("/") else None


def validate_key(key: object, *, max_bytes: int = MAX_KEY_BYTES) -> str:
    """Return ``key`` if it is a usable key, else raise ``ValueError`` saying why.

    A key is a non-empty ``str`` of at most ``max_bytes`` UTF-8 bytes with no control or
    surrogate characters: they would be mangled by URLs, logs and etcd tooling alike.
    """
    if not isinstance(key, str):
        raise ValueError(f"metadata key must be str, not {type(key).__name__}")
    if not key:
        raise ValueError("metadata key must not be empty")
    return _check_text(key, "metadata key", max_bytes)


def validate_prefix(prefix: object, *, max_bytes: int = MAX_KEY_BYTES) -> str:
    """Like :func:`validate_key` but the empty prefix (everything) is allowed."""
    if not isinstance(prefix, str):
        raise ValueError(f"metadata prefix must be str, not {type(prefix).__name__}")
    return _check_text(prefix, "metadata prefix", max_bytes) if prefix else prefix


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects exactly the keys starting with ``prefix``.

    Written here rather than borrowed from aetcd because aetcd 1.0's version is wrong for
    prefixes ending in ``0xff``. ``b"\\0"`` means "to the end of the keyspace".
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty str, got {name!r}")
    if name.startswith("/") or name.endswith("/") or "//" in name:
        raise ValueError(f"{what} {name!r} has an empty path component")


def _check_text(text: str, what: str, max_bytes: int) -> str:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains unpaired surrogates") from None
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes, the limit is {max_bytes}")
    if text.isprintable():  # fast path: printable text has no control characters
        return text
    for ch in text:
        if unicodedata.category(ch) == "Cc":
            raise ValueError(f"{what} {text[:64]!r} contains control character {ch!r}")
    return text
