"""CUDA detection, pointer info and the staging pool; the copies themselves need a GPU."""
from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from transfer.cuda import (
    StagingPool,
    copy_device_to_host,
    copy_host_to_device,
    cuda_pointer_info,
    host_allocator,
    is_cuda_object,
    parse_cuda_location,
)


def test_detection_does_not_import_torch_or_cupy() -> None:
    code = ("import sys, numpy, transfer.cuda as c\n"
            "assert not c.is_cuda_object(numpy.zeros(3)) and not c.is_cuda_object(b'x')\n"
            "assert 'torch' not in sys.modules and 'cupy' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cpu_tensors_are_not_cuda() -> None:
    assert not is_cuda_object(torch.zeros(4))
    assert not is_cuda_object(np.zeros(4))
    with pytest.raises(TypeError, match="not a CUDA"):
        cuda_pointer_info(torch.zeros(4))


def test_parse_cuda_location() -> None:
    assert parse_cuda_location("cuda:3") == 3
    assert parse_cuda_location("cpu:0") is None and parse_cuda_location("cuda:") is None


def test_pool_leases_are_bounded_and_reused() -> None:
    allocs: list[int] = []

    def allocator(n: int):
        allocs.append(n)
        return host_allocator(n)

    pool = StagingPool(4096, 2, allocator)
    assert allocs == []  # lazy: nothing pinned until needed
    with pool.lease() as one:
        one.view[:5] = b"hello"
        assert ctypes.string_at(one.address, 5) == b"hello"
        with pool.lease() as two:
            assert two.index != one.index and pool.in_use == 2
            with pytest.raises(TimeoutError, match="2 x 4096"):
                pool.acquire(timeout=0.05)
    assert pool.in_use == 0 and allocs == [4096, 4096]
    with pool.lease() as again:
        assert again.index in (0, 1)
    assert len(allocs) == 2 and len(pool.buffers()) == 2
    with pytest.raises(ValueError, match="not leased"):
        pool.release(again)


def test_pool_hands_buffers_across_threads() -> None:
    pool = StagingPool(1024, 1, host_allocator)
    held = pool.acquire()
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5).index))
    waiter.start()
    time.sleep(0.05)
    assert got == []
    pool.release(held)
    waiter.join(5)
    assert got == [held.index] and pool.in_use == 1


async def test_pool_async_waiters() -> None:
    pool = StagingPool(1024, 1, host_allocator)
    held = await pool.acquire_async()
    waiter = asyncio.ensure_future(pool.acquire_async(timeout=5))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    # Released from another thread, as a transport's completion thread would.
    threading.Thread(target=pool.release, args=(held,)).start()
    got = await asyncio.wait_for(waiter, 5)
    assert got.index == held.index and pool.in_use == 1
    with pytest.raises(TimeoutError):
        await pool.acquire_async(timeout=0.02)
    pool.release(got)
    async with pool.lease_async(timeout=1) as buf:
        assert pool.in_use == 1 and buf.nbytes == 1024
    assert pool.in_use == 0


async def test_pool_timed_out_waiter_does_not_leak() -> None:
    pool = StagingPool(1024, 1, host_allocator)
    held = await pool.acquire_async()
    with pytest.raises(TimeoutError):
        await pool.acquire_async(timeout=0.01)
    pool.release(held)  # nobody waits any more: the chunk must become free
    await asyncio.sleep(0)
    assert pool.in_use == 0
    assert (await pool.acquire_async(timeout=1)).index == held.index


def test_pool_validation() -> None:
    with pytest.raises(ValueError):
        StagingPool(0, 1, host_allocator)
    with pytest.raises(ValueError):
        StagingPool(1024, 0, host_allocator)
    pool = StagingPool(1024, 1, host_allocator)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.acquire(timeout=0)


def test_copy_rejects_readonly_host() -> None:
    with pytest.raises(ValueError, match="read-only"):
        copy_device_to_host(0, memoryview(b"abc"), 3, 0)


@pytest.mark.gpu
def test_pointer_info_and_copies_on_gpu() -> None:
    dev = torch.arange(1 << 20, dtype=torch.int32, device="cuda:0")
    assert is_cuda_object(dev)
    ptr, nbytes, device = cuda_pointer_info(dev)
    assert (ptr, nbytes, device) == (dev.data_ptr(), 4 << 20, 0)
    with pytest.raises(ValueError, match="contiguous"):
        cuda_pointer_info(dev.view(1024, 1024).t())
    host = np.zeros(1 << 20, dtype=np.int32)
    copy_device_to_host(ptr + 4096, memoryview(host).cast("B")[4096:], nbytes - 4096, device)
    assert (host[1024:] == np.arange(1024, 1 << 20)).all() and (host[:1024] == 0).all()
    back = torch.zeros_like(dev)
    copy_host_to_device(host.ctypes.data, back.data_ptr(), nbytes, 0)
    torch.cuda.synchronize()
    assert torch.equal(back[1024:], dev[1024:])


@pytest.mark.gpu
def test_pinned_pool_stages_a_cuda_tensor() -> None:
    src = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros_like(src)
    pool = StagingPool(1 << 20, 2)  # default allocator: pinned memory via torch
    ptr, nbytes, device = cuda_pointer_info(src)
    for off in range(0, nbytes, pool.chunk_size):
        with pool.lease(timeout=5) as chunk:
            n = min(pool.chunk_size, nbytes - off)
            copy_device_to_host(ptr + off, chunk.address, n, device)
            copy_host_to_device(chunk.view, dst.data_ptr() + off, n, device)
    assert torch.equal(src, dst)


@pytest.mark.gpu
def test_copies_are_ordered_after_the_callers_stream() -> None:
    """On the default stream the driver's synchronous copy runs after the queued work; on a
    side stream the copy goes through torch on that stream. Either way the bytes are the ones
    the queued kernels wrote (64 MiB fills take long enough for a race to show)."""
    n = 64 << 20
    host = np.zeros(n, dtype=np.uint8)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    dev.fill_(7)  # default stream, not waited for
    copy_device_to_host(dev.data_ptr(), memoryview(host), n, 0)
    assert (host == 7).all()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dev.fill_(9)  # on the side stream
        copy_device_to_host(dev.data_ptr(), memoryview(host), n, 0)
    assert (host == 9).all()
    host[:] = 5
    with torch.cuda.stream(side):
        copy_host_to_device(memoryview(host), dev.data_ptr(), n, 0)
        assert int(dev.min()) == 5 and int(dev.max()) == 5


@pytest.mark.gpu
def test_a_thread_in_its_own_context_gets_it_back_after_a_copy() -> None:
    """A thread with a context of its own current (``cuCtxCreate``, as some libraries do)
    copies memory torch allocated in the primary context: the copy runs in the primary
    context, the bytes are right both ways, and the thread's own context is current again."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuCtxCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_int]
    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cuCtxDestroy_v2.argtypes = [ctypes.c_void_p]
    n = 1 << 20
    dev = torch.full((n,), 3, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    host = np.zeros(n, dtype=np.uint8)
    seen: dict[str, int | None] = {}

    def current() -> int | None:
        ctx = ctypes.c_void_p()
        assert lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0
        return ctx.value

    def worker() -> None:
        own = ctypes.c_void_p()
        assert lib.cuCtxCreate_v2(ctypes.byref(own), 0, 0) == 0
        try:
            seen["own"], seen["before"] = own.value, current()
            copy_device_to_host(dev.data_ptr(), memoryview(host), n, 0)
            host[:] += 1
            copy_host_to_device(memoryview(host), dev.data_ptr(), n, 0)
            seen["after"] = current()
        finally:
            lib.cuCtxDestroy_v2(own)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["before"] == seen["own"] == seen["after"] is not None
    assert (host == 4).all()
    assert int(dev.min()) == 4 and int(dev.max()) == 4


class _StandInDriver:
    """The driver calls :mod:`transfer.cuda` makes, done by ``memmove`` on host memory: records
    each call with the context current at the time; ``rc`` fails the calls that copy."""

    def __init__(self) -> None:
        self.current, self.calls, self.rc = "caller's", [], 0

    def context_on(self, device: int) -> tuple[bool, str]:
        previous, self.current = self.current, f"primary:{device}"
        return True, previous

    def dtoh(self, dst: int, src: int, n: int) -> int:
        self.calls.append(("dtoh", self.current))
        ctypes.memmove(dst, src, n)
        return self.rc

    def htod(self, dst: int, src: int, n: int) -> int:
        self.calls.append(("htod", self.current))
        ctypes.memmove(dst, src, n)
        return self.rc

    def dtoh_async(self, dst: int, src: int, n: int, stream: None) -> int:
        self.calls.append(("dtoh_async", self.current))
        ctypes.memmove(dst, src, n)
        return self.rc

    def htod_async(self, dst: int, src: int, n: int, stream: None) -> int:
        self.calls.append(("htod_async", self.current))
        ctypes.memmove(dst, src, n)
        return self.rc

    def sync(self, stream: None) -> int:
        self.calls.append(("sync", self.current))
        return 0

    def set_current(self, ctx: str) -> int:
        self.current = ctx
        return 0


def test_driver_copies_run_in_the_devices_context_and_give_the_callers_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver path (no GPU here: a stand-in for the driver, the calling code real): the
    copy runs with the device's primary context current, the caller's own context comes back
    afterwards, also when the copy fails, and a failed copy raises with the CUDA error."""
    from transfer import cuda

    driver = _StandInDriver()
    monkeypatch.setattr(cuda, "_driver_for_copies", lambda: driver)
    src = np.arange(1000, dtype=np.uint8)
    dst = np.zeros(1000, dtype=np.uint8)
    copy_device_to_host(src.ctypes.data, memoryview(dst), 1000, 1)
    copy_host_to_device(memoryview(src), dst.ctypes.data, 1000, 1)
    assert (dst == src).all()
    assert driver.calls == [("dtoh", "primary:1"), ("htod", "primary:1")]
    assert driver.current == "caller's"
    driver.rc = 700
    with pytest.raises(RuntimeError, match="CUDA error 700"):
        copy_device_to_host(src.ctypes.data, memoryview(dst), 1000, 1)
    assert driver.current == "caller's"


def test_a_batch_of_copies_is_queued_and_waited_for_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`copy_many` through the driver (stand-in, calling code real): every piece queued
    as an async copy in the device's context, one wait, the caller's context back; a failed
    enqueue still waits for the copies already in flight before it raises."""
    from transfer import cuda

    driver = _StandInDriver()
    monkeypatch.setattr(cuda, "_driver_for_copies", lambda: driver)
    dev = np.arange(4096, dtype=np.uint8)
    host = np.zeros(4096, dtype=np.uint8)
    pieces = [(dev.ctypes.data + o, memoryview(host)[o:o + 512], 512)
              for o in range(0, 4096, 1024)]
    cuda.copy_many(pieces, 2, to_host=True)
    assert driver.calls == [("dtoh_async", "primary:2")] * 4 + [("sync", "primary:2")]
    assert driver.current == "caller's"
    for o in range(0, 4096, 1024):
        assert (host[o:o + 512] == dev[o:o + 512]).all() and not host[o + 512:o + 1024].any()
    driver.calls.clear()
    cuda.copy_many([(dev.ctypes.data, memoryview(host), 4096)], 2, to_host=False)
    assert driver.calls == [("htod", "primary:2")]  # one piece: the synchronous copy
    driver.calls.clear()
    driver.rc = 1
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        cuda.copy_many(pieces, 2, to_host=False)
    assert driver.calls == [("htod_async", "primary:2"), ("sync", "primary:2")]
    assert driver.current == "caller's"
    with pytest.raises(ValueError):
        cuda.copy_many([(dev.ctypes.data, memoryview(host), -1)], 2, to_host=True)
