"""Length-prefixed framing over an asyncio byte stream.

A frame is a 4-byte big-endian unsigned payload length followed by that many payload bytes.
:class:`FramedProtocol` turns the stream back into frames for both the server and the client.

Why a hand-written ``asyncio.Protocol`` rather than ``StreamReader.readexactly``: the stream
API costs a task wake-up and several buffer copies per frame, which is most of a loopback round
trip. Here the common case (whole frames inside one ``data_received`` chunk) is decoded straight
out of the chunk with no copy, and only a frame split across chunks is accumulated.

Memory is bounded by construction: the length is checked against ``max_frame_size`` as soon as
the 4 header bytes are in, before any payload is buffered, and the accumulation buffer only ever
holds the one partial frame (so it never exceeds ``HEADER_SIZE + max_frame_size``).
"""
from __future__ import annotations

import asyncio
import struct

import msgspec

__all__ = ["HEADER_SIZE", "MAX_LENGTH", "FramedProtocol", "encode_frame"]

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
MAX_LENGTH = (1 << 32) - 1
"""The largest length a 4-byte prefix can express."""


def encode_frame(encoder: msgspec.msgpack.Encoder, message: object) -> bytearray:
    """Encode ``message`` with ``encoder`` and prefix its length, in one buffer.

    ``encode_into`` writes the payload after a 4-byte hole that is then filled with the length,
    so header and payload leave in a single ``transport.write`` without a concatenation copy.
    Callers compare ``len(frame) - HEADER_SIZE`` against the peer's limit before sending.
    """
    frame = bytearray(HEADER_SIZE)
    encoder.encode_into(message, frame, HEADER_SIZE)
    length = len(frame) - HEADER_SIZE
    if length > MAX_LENGTH:
        raise ValueError(f"message of {length} bytes cannot be framed (limit {MAX_LENGTH})")
    _HEADER.pack_into(frame, 0, length)
    return frame


class FramedProtocol(asyncio.Protocol):
    """An ``asyncio.Protocol`` that delivers whole frames to :meth:`frame_received`.

    Subclasses implement :meth:`frame_received` (must not keep the memoryview it is given past
    the call: it may point into a reused chunk) and :meth:`frame_too_large`, and call
    :meth:`stop_reading_frames` once the connection is being torn down so that no further
    frames of the current chunk are delivered. ``max_frame_size`` may be changed at any time
    (the handshake raises it once the peer is trusted); it applies to the next header parsed.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self.peak_buffered = 0
        """High-water mark of bytes held for a partial frame; exposed for memory checks."""
        self._buf = bytearray()
        self._want = 0  # total bytes (header + payload) of the partial frame, once known
        self._frames_stopped = False

    # -- subclass interface -------------------------------------------------------------------

    def frame_received(self, payload: memoryview) -> None:
        """Handle one complete frame payload (called synchronously from ``data_received``)."""
        raise NotImplementedError

    def frame_too_large(self, length: int) -> None:
        """The peer announced a frame longer than ``max_frame_size``: report and close."""
        raise NotImplementedError

    def stop_reading_frames(self) -> None:
        """Deliver no more frames and drop anything buffered (the connection is closing)."""
        self._frames_stopped = True
        self._buf = bytearray()
        self._want = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._frames_stopped:
            return
        n = len(data)
        pos = 0
        buf = self._buf
        if buf:
            # Finish the frame left over from earlier chunks, taking only the bytes it needs.
            if len(buf) < HEADER_SIZE:
                pos = min(HEADER_SIZE - len(buf), n)
                buf += data[:pos]
                if len(buf) < HEADER_SIZE:
                    return
                length = _HEADER.unpack_from(buf)[0]
                if length > self.max_frame_size:
                    self._reject(length)
                    return
                self._want = HEADER_SIZE + length
            take = min(self._want - len(buf), n - pos)
            if take:
                buf += memoryview(data)[pos:pos + take]
                pos += take
            self.peak_buffered = max(self.peak_buffered, len(buf))
            if len(buf) < self._want:
                return
            # Hand over a fresh buffer first: the old one is then never resized while the
            # subclass (or a decoder result) may still hold a view of it.
            self._buf = bytearray()
            self._want = 0
            self.frame_received(memoryview(buf)[HEADER_SIZE:])
            if self._frames_stopped:
                return

        view = memoryview(data)
        while n - pos >= HEADER_SIZE:
            length = _HEADER.unpack_from(data, pos)[0]
            if length > self.max_frame_size:
                self._reject(length)
                return
            end = pos + HEADER_SIZE + length
            if end > n:
                self._want = HEADER_SIZE + length
                break
            self.frame_received(view[pos + HEADER_SIZE:end])
            if self._frames_stopped:
                return
            pos = end
        if pos < n:
            rest = bytearray(view[pos:])
            self._buf = rest
            self.peak_buffered = max(self.peak_buffered, len(rest))

    def _reject(self, length: int) -> None:
        self.stop_reading_frames()
        self.frame_too_large(length)
