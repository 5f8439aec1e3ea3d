"""Segment prefaulting: pages become resident without their contents changing."""
from __future__ import annotations

import ctypes
import mmap
import os
import sys

import pytest

from store.client.prefault import Prefaulter
from transfer.shm import SharedBuffer

MIB = 1 << 20


def _resident_pages(address: int, size: int) -> int:
    """Pages of ``[address, address + size)`` in memory, by ``mincore``."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    vec = (ctypes.c_ubyte * (size // page))()
    if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_prefault_populates_and_keeps_contents() -> None:
    size = 16 * MIB
    buf = SharedBuffer.create(size)
    try:
        view = buf.view
        view[:4] = b"keep"
        view[size - 4:size] = b"tail"
        assert _resident_pages(buf.address, size) < size // mmap.PAGESIZE
        p = Prefaulter(buf.address, size).start()
        assert p.done.wait(10)
        p.stop()
        assert _resident_pages(buf.address, size) == size // mmap.PAGESIZE
        assert bytes(view[:4]) == b"keep" and bytes(view[size - 4:size]) == b"tail"
        assert bytes(view[4:8]) == b"\0\0\0\0"
        del view
    finally:
        buf.free()


def test_prefault_stops_and_ignores_unaligned_ranges() -> None:
    buf = SharedBuffer.create(4 * MIB)
    try:
        unaligned = Prefaulter(buf.address + 1, MIB).start()
        assert unaligned.done.is_set()  # refused up front, nothing to wait for
        p = Prefaulter(buf.address, 4 * MIB).start()
        p.stop()
        assert p.done.wait(5)
    finally:
        buf.free()
