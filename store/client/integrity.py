"""Optional per-object checksums: an 8-byte trailer stored after the value.

Why a trailer in the object rather than a field in the master's metadata: the trailer travels with
the bytes, so a reader verifies exactly what it read from *that* replica (a replica overwritten
after its space was reused fails, a healthy sibling passes), and the master stays unchanged. The
trailer is ``b"MCK1"`` + CRC-32 (little-endian) of the value. A pool either uses checksums or not:
a checksumming reader refuses an object without a trailer rather than guess.
"""
from __future__ import annotations

import struct
import zlib

__all__ = ["TRAILER_SIZE", "make_trailer", "check_trailer", "crc32_of"]

TRAILER_SIZE = 8
_MAGIC = b"MCK1"
_TRAILER = struct.Struct("<4sI")


def crc32_of(data: memoryview | bytes | bytearray) -> int:
    """CRC-32 of ``data`` (zlib's, hardware-assisted where the platform has it)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def make_trailer(data: memoryview | bytes | bytearray) -> bytes:
    """The trailer to store after ``data``."""
    return _TRAILER.pack(_MAGIC, crc32_of(data))


def check_trailer(data: memoryview | bytes | bytearray, trailer: bytes | memoryview) -> str | None:
    """``None`` if ``trailer`` matches ``data``, else why not (for the error message)."""
    magic, crc = _TRAILER.unpack(bytes(trailer))
    if magic != _MAGIC:
        return "object has no checksum trailer (written by a client without checksums?)"
    actual = crc32_of(data)
    if actual != crc:
        return f"checksum mismatch: stored crc32 {crc:08x}, read {actual:08x}"
    return None
