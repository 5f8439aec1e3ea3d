"""File segments: registered file ranges, read and written with positional I/O.

Why files are segments at all: the store's SSD tier and remote SSD pools (local NVMe, or an
NVMe-oF block device or mount) then use the same request API as memory. The owner registers a
file range under location ``file:<path>``; remote peers reach it through the owner's tcp
listener (which does ``pread``/``pwrite`` server-side), and a same-host peer - proven by the shm
probe, and by the file's device and inode matching what the owner published - opens the file
itself and skips the network.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transfer.errors import AddressError
from transfer.memory import memory_at
from transfer.shm import HostProbe
from transfer.transports._lookup import find_entry
from transfer.transports.base import LocalBuffer, Opcode, Slice, Transport, TransportError

__all__ = ["FileTransport", "file_path_of"]


def file_path_of(location: str) -> str:
    if not location.startswith("file:/"):
        raise ValueError(f"{location!r} is not a file location")
    return location[len("file:"):]


class FileTransport(Transport):
    """Direct positional I/O on a same-host peer's registered files."""

    name = "file"

    def __init__(self, probe: HostProbe, *, workers: int = 2) -> None:
        self._probe = probe
        self._lock = threading.Lock()
        self._fds: dict[tuple[str, int, int], int] = {}
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mooncake-file")

    async def start(self) -> dict[str, Any]:
        return self._probe.entry()

    async def register(self, buffer: LocalBuffer) -> dict[str, Any]:
        if not buffer.location.startswith("file:"):
            return {}
        st = os.stat(file_path_of(buffer.location))
        return {"dev": st.st_dev, "ino": st.st_ino}

    def reachable(self, peer_entry: Mapping[str, Any]) -> bool:
        return HostProbe.matches(peer_entry)

    async def execute(self, peer_name: str, peer_entry: Mapping[str, Any],
                      peer_buffers: Sequence[Mapping[str, Any]], slices: Sequence[Slice],
                      *, path: int = 0) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._io, peer_buffers, slices)

    def _open(self, entry: Mapping[str, Any]) -> tuple[int, int]:
        path = file_path_of(entry["location"])
        ident = entry.get("info", {}).get("file", {})
        key = (path, int(ident.get("dev", -1)), int(ident.get("ino", -1)))
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(path, os.O_RDWR)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != key[1:]:
                    os.close(fd)
                    raise TransportError(f"{path} is not the file the peer registered",
                                         retryable=False)
                self._fds[key] = fd
        return fd, int(entry.get("info", {}).get("file", {}).get("offset", 0))

    def _io(self, peer_buffers: Sequence[Mapping[str, Any]], slices: Sequence[Slice]) -> None:
        for s in slices:
            try:
                entry = find_entry(peer_buffers, s.remote_addr, s.length)
                fd, base = self._open(entry)
            except AddressError as e:
                raise TransportError(str(e), retryable=False) from None
            except OSError as e:
                raise TransportError(f"cannot open peer file: {e}") from None
            offset = base + (s.remote_addr - entry["address"])
            view = memory_at(s.local_addr, s.length)
            done = 0
            try:
                while done < s.length:
                    if s.opcode == Opcode.WRITE:
                        n = os.pwritev(fd, [view[done:]], offset + done)
                    else:
                        n = os.preadv(fd, [view[done:]], offset + done)
                        if n == 0:
                            raise OSError("short read (file truncated?)")
                    done += n
            except OSError as e:
                raise TransportError(f"file I/O failed: {e}", retryable=False) from None

    async def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._executor.shutdown(wait=False, cancel_futures=True)
