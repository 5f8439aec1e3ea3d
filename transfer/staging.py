"""Staging for local buffers the CPU transports cannot address directly: files and CUDA memory.

Why stage in the engine: tcp and shm move bytes between host addresses. A request whose local
side is a registered file range or CUDA memory first gets a host staging buffer - filled before
a WRITE (``pread`` / device-to-host copy), drained after a READ (``pwrite`` / host-to-device) -
so every transport sees plain host memory. The same helpers serve the tcp server side for
remote requests that target file or CUDA regions. CUDA copies go through :mod:`transfer.cuda`,
imported only when a CUDA region is actually touched.

CUDA staging buffers come from a bounded :class:`transfer.cuda.StagingPool` of *pinned* chunks
(so the device copy is a DMA), created on first CUDA use. Staging never waits for the pool: a
request larger than a chunk, or one arriving while every chunk is leased (a batch holds its
chunks until it ends, so waiting could deadlock a big batch), gets pageable memory instead -
slower, never stuck. File staging always uses pageable memory (``pread`` gains nothing from
pinning).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from transfer.memory import Region
from transfer.transports.base import Opcode, Slice
from transfer.transports.tcp_server import read_file, write_file

if TYPE_CHECKING:
    from transfer.batch import Batch, TransferRequest
    from transfer.cuda import StagingBuffer, StagingPool

__all__ = ["BatchStaging", "Staging", "copy_regions", "load_region", "staged_slices",
           "store_region"]


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
    """Per-engine staging: the pinned CUDA pool, per-batch staging, the tcp server's region I/O."""

    def __init__(self, chunk_size: int = 4 << 20, count: int = 16,
                 allocator: Callable[[int], Any] | None = None) -> None:
        self._chunk_size = chunk_size
        self._count = count
        self._allocator = allocator
        self._pool: StagingPool | None = None
        self._lock = threading.Lock()
        self._no_pinned = False

    def region_io(self) -> tuple[Any, Any, Any]:
        """``(load, store, buffer)`` for the tcp server (:mod:`transfer.transports.tcp_server`)."""
        return load_region, store_region, self.host_buffer

    def new_batch(self) -> BatchStaging:
        return BatchStaging(self)

    def _pinned_pool(self) -> StagingPool:
        with self._lock:
            if self._pool is None:
                from transfer.cuda import StagingPool

                self._pool = StagingPool(self._chunk_size, self._count, self._allocator)
            return self._pool

    def try_lease(self, region: Region, length: int) -> StagingBuffer | None:
        """A pinned chunk for ``length`` bytes of a CUDA region, if one is free right now."""
        if not region.is_cuda or length > self._chunk_size:
            return None
        if self._no_pinned:
            return None
        pool = self._pinned_pool()
        try:
            return pool.acquire(timeout=0)
        except TimeoutError:
            return None
        except RuntimeError:  # no allocator can pin here (no CUDA library): stop asking
            self._no_pinned = True
            return None

    def give_back(self, chunk: StagingBuffer) -> None:
        pool = self._pool
        if pool is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                pool.release(chunk)

    @property
    def chunk_size(self) -> int:
        """Bytes of one pinned chunk: a CUDA slice longer than this is staged in pageable memory."""
        return self._chunk_size

    @contextlib.contextmanager
    def host_buffer(self, region: Region, length: int) -> Iterator[memoryview]:
        """Host memory to stage ``length`` bytes of ``region`` through (pinned when it can)."""
        chunk = self.try_lease(region, length)
        if chunk is None:
            yield memoryview(bytearray(length))
            return
        try:
            yield chunk.view[:length]
        finally:
            self.give_back(chunk)

    def close(self) -> None:
        """Free the pinned chunks (leased ones stay valid until given back)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


@contextlib.contextmanager
def staged_slices(staging: Staging, slices: Sequence[Slice],
                  regions: Sequence[Region | None]) -> Iterator[list[Slice]]:
    """``slices`` with each CUDA (or file) local side swapped for host memory, on the calling
    thread: filled from the device before a WRITE; copied to the device after a READ, once the
    body has finished without an error (a failed exchange leaves the device memory alone).

    Why on the caller's thread: the caller-thread exchanges (:mod:`transfer.smallpath`, the
    shm fast path) exist to skip the hops to the loop and a worker; a CUDA buffer that sent a
    put back to the general path cost ~1.7 ms per 1 MiB on an H200 host, against ~0.3 ms for
    host memory. The device copy also runs on the caller's current CUDA stream, after the work
    that produced the bytes."""
    with contextlib.ExitStack() as stack:
        out: list[Slice] = []
        loads: list[tuple[Region, int, memoryview]] = []
        back: list[tuple[Region, int, memoryview]] = []
        held: list[memoryview] = []  # a pageable buffer lives only as long as its view
        for s, region in zip(slices, regions):
            if region is None:
                out.append(s)
                continue
            view = stack.enter_context(staging.host_buffer(region, s.length))
            held.append(view)
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
            (loads if s.opcode == Opcode.WRITE else back).append((region, s.local_addr, view))
            out.append(Slice(s.opcode, address, s.remote_addr, s.length))
        copy_regions(loads, load=True)
        yield out
        copy_regions(back, load=False)


class BatchStaging:
    """Staging buffers of one batch, released when the batch ends.

    Requests are packed into pinned chunks (several small requests share one), and the device or
    file copies of the whole batch run in one executor call before the transfer and one after.
    The connector puts a block as one piece per layer (two on GPU layouts); with an executor hop
    and a pinned chunk per piece, 64 pieces of 32 KiB took 13-23 ms through this path on this
    2-core VM (device copies faked by ``memmove``), 2.4 ms over shm and 8.4 ms over tcp after."""

    def __init__(self, staging: Staging | None = None) -> None:
        self._staging = staging
        # (request index, its local address staged here, the host view, its region)
        self._buffers: list[tuple[int, int, memoryview, Region]] = []
        self._owners: list[Any] = []  # pinned chunks to give back; pageable memory to keep alive
        self._chunk: tuple[Any, int] | None = None  # the pinned chunk being filled, its used bytes

    def add(self, index: int, req: TransferRequest, local: Region) -> list[tuple[int, int, int]]:
        """``(host address, offset in the request, length)`` pieces the transports should use
        for request ``index`` (nothing copied yet: :meth:`load` does that for the whole batch).

        A CUDA request longer than a pinned chunk is cut at the chunk size, a chunk per piece:
        staged whole it would need pageable memory, and a 16 MiB put of CUDA memory over tcp
        ran at 2.0-2.9 GB/s that way on an H200 host, against 6.2-6.6 GB/s for host memory."""
        if not (local.is_file or local.is_cuda):
            return [(req.local_addr, 0, req.length)]
        step = req.length
        if local.is_cuda and self._staging is not None:
            step = min(step, self._staging.chunk_size)
        pieces = []
        for off in range(0, req.length, step):
            n = min(step, req.length - off)
            view, address = self._host(local, n)
            self._buffers.append((index, req.local_addr + off, view, local))
            pieces.append((address, off, n))
        return pieces

    def pinned(self, local: Region, n: int) -> tuple[memoryview, int] | None:
        """``n`` bytes of a pinned chunk for CUDA region ``local`` (packed right after the
        previous request's, so pieces that follow each other stay contiguous), or None when
        no chunk is free or ``n`` does not fit in one."""
        staging = self._staging
        if staging is None or not local.is_cuda or n > staging.chunk_size:
            return None
        if self._chunk is not None and self._chunk[1] + n <= staging.chunk_size:
            chunk, used = self._chunk
        else:
            chunk, used = staging.try_lease(local, n), 0
            if chunk is None:
                return None
            self._owners.append(chunk)
        self._chunk = (chunk, (used + n + 63) & ~63)
        return chunk.view[used:used + n], chunk.address + used

    def _host(self, local: Region, n: int) -> tuple[memoryview, int]:
        got = self.pinned(local, n)
        if got is not None:
            return got
        buf = bytearray(n)
        pin = (ctypes.c_char * n).from_buffer(buf)
        self._owners.append((buf, pin))
        return memoryview(buf), ctypes.addressof(pin)

    async def load(self, batch: Batch) -> None:
        """Fill the staging buffers of the batch's WRITE requests, in one executor call."""
        work = [(region, address, view) for index, address, view, region in self._buffers
                if batch.requests[index].opcode == Opcode.WRITE]
        if work:
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(copy_regions, work, load=True))

    async def finish(self, batch: Batch) -> None:
        """After the transfer: write READ results back to their file/CUDA destinations."""
        from transfer.batch import RequestStatus

        try:
            work, indices = [], set()
            for index, address, view, region in self._buffers:
                if batch.requests[index].opcode == Opcode.READ \
                        and batch.results[index].status is RequestStatus.COMPLETED:
                    work.append((region, address, view))
                    indices.add(index)
            if not work:
                return
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(copy_regions, work, load=False))
            except (OSError, RuntimeError, ImportError) as e:
                for index in indices:
                    result = batch.results[index]
                    result.status, result.error = RequestStatus.FAILED, f"staging out: {e}"
        finally:
            self.release()

    def release(self) -> None:
        """Give pinned chunks back to the pool and drop pageable buffers."""
        owners, self._owners, self._buffers, self._chunk = self._owners, [], [], None
        if self._staging is None:
            return
        for owner in owners:
            if not isinstance(owner, tuple):
                self._staging.give_back(owner)


def copy_regions(work: Sequence[tuple[Region, int, memoryview]], *, load: bool) -> None:
    """The copies of one batch, into host memory (``load``) or back out of it: a device's
    pieces as one :func:`transfer.cuda.copy_many` (one wait for all of them), file ranges one
    by one."""
    by_device: dict[int, list[tuple[int, memoryview, int]]] = {}
    for region, address, view in work:
        if region.is_cuda:
            by_device.setdefault(_device(region), []).append((address, view, len(view)))
        elif load:
            load_region(region, address, view)
        else:
            store_region(region, address, view)
    if by_device:
        from transfer import cuda

        for device, copies in by_device.items():
            cuda.copy_many(copies, device, to_host=load)
