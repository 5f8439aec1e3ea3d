"""Staging for local buffers the CPU transports cannot address directly: files and CUDA memory.

Why stage in the engine: tcp and shm move bytes between host addresses. A request whose local
side is a registered file range or CUDA memory first gets a host staging buffer - filled before
a WRITE (``pread`` / device-to-host copy), drained after a READ (``pwrite`` / host-to-device) -
so every transport sees plain host memory. The same helpers serve the tcp server side for
remote requests that target file or CUDA regions. CUDA copies go through :mod:`transfer.cuda`,
imported only when a CUDA region is actually touched.
"""
from __future__ import annotations

import asyncio
import ctypes
from typing import TYPE_CHECKING, Any

from transfer.memory import Region
from transfer.transports.base import Opcode
from transfer.transports.tcp import read_file, write_file

if TYPE_CHECKING:
    from transfer.batch import Batch, TransferRequest

__all__ = ["BatchStaging", "Staging", "load_region", "store_region"]


def _device(region: Region) -> int:
    return int(region.location.split(":", 1)[1])


def load_region(region: Region, addr: int, dst: memoryview) -> None:
    """Copy ``len(dst)`` bytes of ``region`` at ``addr`` into host memory ``dst``."""
    if region.is_file:
        read_file(region, addr, dst)
    elif region.is_cuda:
        from transfer import cuda

        cuda.copy_device_to_host(addr, dst, len(dst), _device(region))
    else:
        raise RuntimeError(f"{region.location} needs no staging")


def store_region(region: Region, addr: int, src: memoryview) -> None:
    """Copy host memory ``src`` into ``region`` at ``addr``."""
    if region.is_file:
        write_file(region, addr, src)
    elif region.is_cuda:
        from transfer import cuda

        cuda.copy_host_to_device(src, addr, len(src), _device(region))
    else:
        raise RuntimeError(f"{region.location} needs no staging")


class Staging:
    """Factory of per-batch staging; also hands the tcp server its region I/O functions."""

    def region_io(self) -> tuple[Any, Any]:
        return load_region, store_region

    def new_batch(self) -> BatchStaging:
        return BatchStaging()


class BatchStaging:
    """Staging buffers of one batch, released when the batch ends."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[bytearray, Any, Region]] = {}

    async def prepare(self, index: int, req: TransferRequest, local: Region) -> int:
        """The host address the transports should use for request ``index``."""
        if not (local.is_file or local.is_cuda):
            return req.local_addr
        buf = bytearray(req.length)
        pin = (ctypes.c_char * req.length).from_buffer(buf)
        self._buffers[index] = (buf, pin, local)
        if req.opcode == Opcode.WRITE:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, load_region, local, req.local_addr, memoryview(buf))
        return ctypes.addressof(pin)

    async def finish(self, batch: Batch) -> None:
        """After the transfer: write READ results back to their file/CUDA destinations."""
        from transfer.batch import RequestStatus

        loop = asyncio.get_running_loop()
        try:
            for index, (buf, _, region) in self._buffers.items():
                req = batch.requests[index]
                result = batch.results[index]
                if req.opcode != Opcode.READ or result.status is not RequestStatus.COMPLETED:
                    continue
                try:
                    await loop.run_in_executor(None, store_region, region, req.local_addr,
                                               memoryview(buf))
                except (OSError, RuntimeError, ImportError) as e:
                    result.status, result.error = RequestStatus.FAILED, f"staging out: {e}"
        finally:
            self.release()

    def release(self) -> None:
        self._buffers.clear()
