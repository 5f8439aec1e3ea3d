"""Same-host transfers by copying between shared-memory mappings: no socket, one memcpy.

Chosen by the engine only when the peer's probe file is readable here with the published token
(see :mod:`transfer.shm`) and the remote buffer is shared-memory backed; everything else goes
over tcp. Copies run on worker threads with ``ctypes.memmove``, which releases the GIL, so
slices on different paths copy in parallel.
"""
from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transfer.errors import AddressError, DescriptorError
from transfer.shm import HostProbe, ShmMappings
from transfer.transports._lookup import find_entry
from transfer.transports.base import Opcode, Slice, Transport, TransportError

__all__ = ["ShmTransport"]

_INLINE_BYTES = 4 << 20


class ShmTransport(Transport):
    """Copies between this process's memory and a same-host peer's shared-memory files."""

    name = "shm"

    def __init__(self, probe: HostProbe, *, workers: int = 2) -> None:
        self._probe = probe
        self.workers = workers
        self._mappings = ShmMappings()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mooncake-shm")

    async def start(self) -> dict[str, Any]:
        return self._probe.entry()

    def reachable(self, peer_entry: Mapping[str, Any]) -> bool:
        return HostProbe.matches(peer_entry)

    async def execute(self, peer_name: str, peer_entry: Mapping[str, Any],
                      peer_buffers: Sequence[Mapping[str, Any]], slices: Sequence[Slice],
                      *, path: int = 0) -> None:
        if sum(s.length for s in slices) <= _INLINE_BYTES:
            # A thread hand-off costs more than copying this little: copy on the loop.
            self._copy(peer_buffers, slices)
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._copy, peer_buffers, slices)

    def map_range(self, name: str, offset: int, length: int) -> int:
        """Where ``[offset, offset + length)`` of the peer's shared file ``name`` is mapped here
        (mapping it on first use); for the engine's shm fast path."""
        try:
            return self._mappings.local_address(name, offset, length)
        except OSError:
            self._mappings.drop(name)
            raise

    async def copy_runs(self, parts: Sequence[Sequence[tuple[int, int, int]]]) -> None:
        """Copy ``(dst, src, length)`` runs already validated by the engine, one worker thread
        per part, and return when all are done."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._executor, copy_runs, part)
                               for part in parts))

    def copy_runs_blocking(self, parts: Sequence[Sequence[tuple[int, int, int]]]) -> None:
        """:meth:`copy_runs` for a thread that is not the loop's: the first part is copied on
        the calling thread (it would only wait otherwise), the others on worker threads."""
        futures = [self._executor.submit(copy_runs, part) for part in parts[1:]]
        try:
            copy_runs(parts[0])
        finally:
            for future in futures:
                future.result()

    def _copy(self, peer_buffers: Sequence[Mapping[str, Any]], slices: Sequence[Slice]) -> None:
        for s in slices:
            try:
                entry = find_entry(peer_buffers, s.remote_addr, s.length)
                name = entry.get("shm_name")
                if name is None:
                    raise TransportError("peer buffer is not shared-memory backed", retryable=False)
                offset = entry.get("shm_offset", 0) + (s.remote_addr - entry["address"])
                remote = self._mappings.local_address(name, offset, s.length)
            except (AddressError, DescriptorError) as e:
                raise TransportError(str(e), retryable=False) from None
            except OSError as e:
                self._mappings.drop(str(entry.get("shm_name")))
                raise TransportError(f"cannot map peer shared memory: {e}") from None
            if s.opcode == Opcode.WRITE:
                ctypes.memmove(remote, s.local_addr, s.length)
            else:
                ctypes.memmove(s.local_addr, remote, s.length)

    async def close(self) -> None:
        self._mappings.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def copy_runs(runs: Sequence[tuple[int, int, int]]) -> None:
    """``memmove`` every ``(dst, src, length)`` run (the GIL is released during each)."""
    memmove = ctypes.memmove
    for dst, src, length in runs:
        memmove(dst, src, length)
