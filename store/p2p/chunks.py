"""Chunk arithmetic: checksums of byte ranges and mapping object ranges onto buffer extents.

An object may live in several buffers (a model's shards, one tensor per layer) and a holder's
buffers need not line up with another's, so every chunk read is split at the buffer boundaries
of *both* sides; :func:`split_ranges` does that once for a (source, destination) pair.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence

from store.p2p.records import Extent

__all__ = ["ObjectView", "checksums_of", "digest", "locate", "split_ranges"]

DEFAULT_CHUNK_SIZE = 8 << 20


def locate(extents: Sequence[Extent], offset: int, length: int) -> list[tuple[int, int]]:
    """``(address, length)`` pieces of ``extents`` that hold object bytes ``[offset, +length)``."""
    out: list[tuple[int, int]] = []
    base = 0
    end = offset + length
    for e in extents:
        lo, hi = max(offset, base), min(end, base + e.length)
        if lo < hi:
            out.append((e.address + lo - base, hi - lo))
        base += e.length
        if base >= end:
            break
    if sum(n for _, n in out) != length:
        raise ValueError(f"range {offset}+{length} is outside the extents ({base} bytes)")
    return out


def split_ranges(src: Sequence[Extent], dst: Sequence[Extent], offset: int,
                 length: int) -> list[tuple[int, int, int]]:
    """``(src_address, dst_address, length)`` runs copying object bytes ``[offset, +length)``."""
    a, b = locate(src, offset, length), locate(dst, offset, length)
    runs: list[tuple[int, int, int]] = []
    i = j = 0
    ia = ib = 0  # bytes consumed in a[i], b[j]
    while i < len(a) and j < len(b):
        n = min(a[i][1] - ia, b[j][1] - ib)
        runs.append((a[i][0] + ia, b[j][0] + ib, n))
        ia += n
        ib += n
        if ia == a[i][1]:
            i, ia = i + 1, 0
        if ib == b[j][1]:
            j, ib = j + 1, 0
    return runs


class ObjectView:
    """Read access to an object's bytes on this node: memory views and/or file ranges.

    Each part is a ``memoryview`` (cast to bytes) or a ``(path, offset, length)`` file range.
    """

    def __init__(self, parts: Sequence[memoryview | tuple[str, int, int]]) -> None:
        self._parts = list(parts)
        self.size = sum(p.nbytes if isinstance(p, memoryview) else p[2] for p in self._parts)

    def pieces(self, offset: int, length: int) -> Iterator[bytes | memoryview]:
        """The bytes ``[offset, +length)`` in order, without copying memory parts."""
        base, end = 0, offset + length
        for p in self._parts:
            n = p.nbytes if isinstance(p, memoryview) else p[2]
            lo, hi = max(offset, base), min(end, base + n)
            if lo < hi:
                if isinstance(p, memoryview):
                    yield p[lo - base:hi - base]
                else:
                    yield _pread(p[0], p[1] + lo - base, hi - lo)
            base += n
            if base >= end:
                return

    def digest(self, offset: int, length: int) -> str:
        return digest(self.pieces(offset, length))


def _pread(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < length:
            data = os.pread(fd, min(length - len(out), 16 << 20), offset + len(out))
            if not data:
                raise OSError(f"{path} is shorter than {offset + length} bytes")
            out += data
        return bytes(out)
    finally:
        os.close(fd)


def digest(pieces: Iterable[bytes | memoryview]) -> str:
    """SHA-256 (hex) of the concatenation of ``pieces``; releases the GIL on large pieces."""
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    return h.hexdigest()


def checksums_of(view: ObjectView, chunk_size: int) -> list[str]:
    """Per-chunk SHA-256 of a whole object."""
    return [view.digest(off, min(chunk_size, view.size - off))
            for off in range(0, view.size, chunk_size)]
