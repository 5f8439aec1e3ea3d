"""Faulting in a contributed segment's pages in the background, before writers touch them.

Why: a segment is a fresh ``/dev/shm`` mapping, so the first write into each 4 KiB page takes a
page fault that allocates and zeroes it - measured at ~750 us per MiB on the holder, three times
the cost of moving the bytes over loopback TCP. Every put lands on never-written space until the
allocator wraps around, so without this a put's latency is dominated by the holder's faults.
(Mooncake pays this once at startup too: registering memory with an RDMA NIC pins every page.)

``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) populates pages writable *without changing their
contents*, so it is safe to run while puts already write into the segment: the segment is mounted
at once and the population runs on a daemon thread in chunks, stoppable between chunks. Where the
call is not available (older kernels, other platforms) or fails (``/dev/shm`` too small), it
stops quietly: the pages then fault on first use exactly as before.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

__all__ = ["Prefaulter"]

logger = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = 23
_CHUNK = 32 << 20
"""Bytes per madvise call: small enough that :meth:`Prefaulter.stop` returns promptly."""


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class Prefaulter:
    """Populates ``[address, address + size)`` on a daemon thread (the GIL is released in
    every ``madvise``); see the module docstring."""

    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size
        self.done = threading.Event()
        """Set when population finished, failed or was stopped."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Prefaulter:
        fn = _madvise()
        if fn is None or self.size <= 0 or self.address % os.sysconf("SC_PAGE_SIZE"):
            self.done.set()
            return self
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True,
                                        name="store-prefault")
        self._thread.start()
        return self

    def _run(self, fn: ctypes._CFuncPtr) -> None:  # type: ignore[name-defined]
        try:
            offset = 0
            while offset < self.size and not self._stop.is_set():
                n = min(_CHUNK, self.size - offset)
                if fn(self.address + offset, n, _MADV_POPULATE_WRITE) != 0:
                    logger.debug("segment prefault stopped at %d of %d bytes: %s", offset,
                                 self.size, os.strerror(ctypes.get_errno()))
                    return
                offset += n
        finally:
            self.done.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current chunk and wait for the thread (before the memory is freed:
        populating an unmapped range would fail harmlessly, but a reused one would not)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
