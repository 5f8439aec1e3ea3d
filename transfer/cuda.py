"""CUDA memory helpers: recognise CUDA buffers, get their pointers, stage them through host memory.

Why: tcp and shm move bytes with the CPU, which cannot touch device memory; RDMA can, but only
when GPUDirect (the nvidia-peermem module) is present. Everywhere else a CUDA slice is copied
through a *pinned* host buffer (pinned so that cudaMemcpy is a DMA, not a bounce through
pageable memory). This module gives the engine and the transports:

- :func:`is_cuda_object` / :func:`cuda_pointer_info`: detection and ``(ptr, nbytes, device)``
  for torch CUDA tensors and cupy arrays, without importing torch or cupy: an object of those
  types can only exist if its library is already imported, so we look at ``type(obj).__module__``
  and ``sys.modules``.
- :func:`cuda_pointer_device`: the same question for a bare address, which is how Mooncake's
  API (and vLLM's connectors) register memory: ``register_buffer(tensor.data_ptr(), nbytes)``.
- :class:`StagingPool`: a bounded pool of equally sized host buffers (pinned by default; the
  allocator is a parameter, so the pooling logic runs on CPU-only machines too), usable from
  threads (:meth:`StagingPool.lease`) and from asyncio (:meth:`StagingPool.lease_async`).
- :func:`copy_device_to_host` / :func:`copy_host_to_device`: cudaMemcpy by raw pointer, so the
  engine can stage any slice of a registered CUDA buffer (:func:`copy_many` for a batch of
  pieces, waited for once)::

      pool = StagingPool(chunk_size=4 << 20, count=8)
      async with pool.lease_async(timeout=5) as staging:
          copy_device_to_host(dev_ptr + offset, staging.address, n, device)
          sock.sendall(staging.view[:n])
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HostAllocation",
    "StagingBuffer",
    "StagingPool",
    "copy_device_to_host",
    "copy_host_to_device",
    "copy_many",
    "cuda_pointer_device",
    "cuda_pointer_info",
    "host_allocator",
    "is_cuda_object",
    "parse_cuda_location",
    "pinned_allocator",
]

MAX_CHUNK = 1 << 30
MAX_COUNT = 1024


def _module_root(obj: Any) -> str:
    return type(obj).__module__.partition(".")[0]


def is_cuda_object(obj: Any) -> bool:
    """True for a torch tensor on a CUDA device or a cupy array; never imports either."""
    root = _module_root(obj)
    if root == "torch":
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(obj, torch.Tensor) and bool(obj.is_cuda)
    if root == "cupy":
        cupy = sys.modules.get("cupy")
        return cupy is not None and isinstance(obj, cupy.ndarray)
    return False


def cuda_pointer_info(obj: Any) -> tuple[int, int, int]:
    """``(device pointer, nbytes, device index)`` of a contiguous CUDA tensor/array.

    Non-contiguous views are refused (ValueError): registering their span would expose bytes
    that are not part of the object.
    """
    if not is_cuda_object(obj):
        raise TypeError(f"{type(obj).__module__}.{type(obj).__qualname__} is not a CUDA "
                        "tensor/array")
    if _module_root(obj) == "torch":
        if not obj.is_contiguous():
            raise ValueError("CUDA tensor is not contiguous; call .contiguous() first")
        return int(obj.data_ptr()), int(obj.numel()) * int(obj.element_size()), \
            int(obj.device.index or 0)
    if not obj.flags.c_contiguous:
        raise ValueError("cupy array is not C-contiguous; use cupy.ascontiguousarray first")
    return int(obj.data.ptr), int(obj.nbytes), int(obj.device.id)


_CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
_CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
_CU_MEMORYTYPE_DEVICE = 2
_libcuda: Any = None


def _loaded_libcuda() -> Any:
    """The CUDA driver library if this process has already loaded it, else ``None``.

    ``RTLD_NOLOAD`` never loads it: a process that has not loaded the driver cannot hold device
    memory, so the answer for every address is then "host", at the cost of one ``dlopen``
    (repeated until the driver is there; once found, it is kept)."""
    global _libcuda
    if _libcuda is None:
        try:
            _libcuda = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            return None
    return _libcuda


_pointer_attribute: Any = None


def _loaded_driver() -> Any:
    """``cuPointerGetAttribute`` of the loaded driver, or ``None`` (see :func:`_loaded_libcuda`)."""
    global _pointer_attribute
    if _pointer_attribute is None:
        lib = _loaded_libcuda()
        if lib is None:
            return None
        fn = lib.cuPointerGetAttribute
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
        fn.restype = ctypes.c_int
        _pointer_attribute = fn
    return _pointer_attribute


def cuda_pointer_device(address: int) -> int | None:
    """The CUDA device index if ``address`` is device memory, else ``None`` (host memory).

    Why: a bare address carries no type, and treating device memory as host memory would make
    a socket send read a GPU address and crash the process. Mooncake's transfer engine asks the
    driver the same question (``cudaPointerGetAttributes``). Page-locked host memory answers
    "host": the CPU transports can use it directly."""
    get = _loaded_driver()
    if get is None or address <= 0:
        return None
    kind = ctypes.c_uint(0)
    if get(ctypes.byref(kind), _CU_POINTER_ATTRIBUTE_MEMORY_TYPE, address) != 0 \
            or kind.value != _CU_MEMORYTYPE_DEVICE:
        return None  # not known to CUDA (ordinary host memory), or CUDA not initialised
    ordinal = ctypes.c_int(0)
    if get(ctypes.byref(ordinal), _CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, address) != 0:
        return 0
    return int(ordinal.value)


def parse_cuda_location(location: str) -> int | None:
    """The device index of ``"cuda:N"``, None for any other location."""
    kind, sep, index = location.partition(":")
    if kind == "cuda" and sep and index.isdigit():
        return int(index)
    return None


@dataclass(frozen=True, slots=True)
class HostAllocation:
    """Host memory from an allocator; ``owner`` keeps it alive."""

    address: int
    view: memoryview
    owner: Any = field(repr=False)


Allocator = Callable[[int], HostAllocation]


def host_allocator(nbytes: int) -> HostAllocation:
    """Ordinary (pageable) host memory: for CPU-only machines and tests."""
    buf = (ctypes.c_ubyte * nbytes)()
    return HostAllocation(ctypes.addressof(buf), memoryview(buf).cast("B"), buf)


def pinned_allocator(nbytes: int) -> HostAllocation:
    """Page-locked host memory through torch (preferred when loaded) or cupy."""
    backend = _backend()
    if backend == "torch":
        import torch  # noqa: PLC0415 - only on CUDA machines

        tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        address = int(tensor.data_ptr())
        view = memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")
        return HostAllocation(address, view, tensor)
    import cupy  # noqa: PLC0415

    mem = cupy.cuda.alloc_pinned_memory(nbytes)
    address = int(mem.ptr)
    view = memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")
    return HostAllocation(address, view, mem)


def _backend() -> str:
    """Which CUDA library does the copies: one already imported, else torch, else cupy."""
    for name in ("torch", "cupy"):
        if name in sys.modules:
            if name == "torch" and not sys.modules["torch"].cuda.is_available():
                continue
            return name
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    try:
        import cupy  # noqa: PLC0415, F401

        return "cupy"
    except ImportError:
        raise RuntimeError("CUDA staging needs torch with CUDA or cupy; neither is usable") \
            from None


class _DeviceSpan:
    """A raw device range as a ``__cuda_array_interface__`` object, so torch can view it."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None}


def _host_address(host: int | memoryview | Any) -> int:
    if isinstance(host, int):
        return host
    view = memoryview(host)
    if view.readonly:
        raise ValueError("host buffer is read-only")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Driver:
    """The CUDA driver's synchronous copies, for a thread whose current stream is the default.

    Why: a copy through torch builds two tensor views, switches device and synchronises a
    stream; on an H200 host a device-to-host copy took 26 us for 64 KiB and 44 us for 1 MiB
    that way, 13 and 32 us through the driver. ``cuMemcpy*`` on the legacy default stream is
    one call, ordered after the work queued on that stream (where vLLM's forward pass runs), so
    it is used only while the caller's current torch (or cupy) stream *is* the default one;
    otherwise the library's own copy on the caller's stream is."""

    def __init__(self, lib: Any) -> None:
        self.dtoh, self.htod = lib.cuMemcpyDtoH_v2, lib.cuMemcpyHtoD_v2
        self.dtoh.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        self.htod.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        self.get_current, self.set_current = lib.cuCtxGetCurrent, lib.cuCtxSetCurrent
        self.get_current.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self.set_current.argtypes = [ctypes.c_void_p]
        self.retain = lib.cuDevicePrimaryCtxRetain
        self.retain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        self.dtoh_async, self.htod_async = lib.cuMemcpyDtoHAsync_v2, lib.cuMemcpyHtoDAsync_v2
        self.dtoh_async.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                                    ctypes.c_void_p]
        self.htod_async.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_void_p]
        self.sync = lib.cuStreamSynchronize
        self.sync.argtypes = [ctypes.c_void_p]
        for fn in (self.dtoh, self.htod, self.get_current, self.set_current, self.retain,
                   self.dtoh_async, self.htod_async, self.sync):
            fn.restype = ctypes.c_int
        self.primary: dict[int, ctypes.c_void_p] = {}
        self.lock = threading.Lock()

    def context_on(self, device: int) -> tuple[bool, ctypes.c_void_p | None]:
        """Make ``device``'s primary context (the one torch and cupy allocate in) current on
        this thread. Returns whether it is, and the caller's own context to restore afterwards
        if this replaced one: a thread working in another context (another device's, or one
        it created itself) gets it back. A thread with none keeps the primary one, as after
        any torch call."""
        ctx = ctypes.c_void_p()
        if self.get_current(ctypes.byref(ctx)) != 0:
            return False, None
        with self.lock:
            primary = self.primary.get(device)
            if primary is None:
                primary = ctypes.c_void_p()
                if self.retain(ctypes.byref(primary), device) != 0:
                    return False, None
                self.primary[device] = primary
        if ctx.value == primary.value:
            return True, None
        if self.set_current(primary) != 0:
            return False, None
        return True, (ctx if ctx.value else None)


_driver_copies: _Driver | None | bool = None


def _driver_for_copies() -> _Driver | None:
    global _driver_copies
    if _driver_copies is None:
        lib = _loaded_libcuda()
        if lib is None:
            return None
        try:
            _driver_copies = _Driver(lib)
        except AttributeError:  # a driver without these entry points: torch/cupy copy
            _driver_copies = False
    return _driver_copies or None


def _on_default_stream(device: int) -> bool:
    """Whether the caller's current stream (torch's, else cupy's) is the legacy default."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_stream(device).cuda_stream) == 0
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        return int(cupy.cuda.get_current_stream().ptr) == 0
    return True


def _driver_copies_of(copies: Sequence[tuple[int, int, int]], device: int,
                      to_host: bool) -> bool:
    """``(dst, src, nbytes)`` copies on the legacy default stream through the driver: one
    synchronous ``cuMemcpy``, or several queued as async copies and waited for once. ``False``
    (nothing copied) where the driver path does not apply."""
    driver = _driver_for_copies()
    if driver is None or not _on_default_stream(device):
        return False
    ok, restore = driver.context_on(device)
    if not ok:
        return False
    rc, failed = 0, 0
    try:
        if len(copies) == 1:
            dst, src, n = copies[0]
            rc = driver.dtoh(dst, src, n) if to_host else driver.htod(dst, src, n)
            failed = n
        else:
            queue = driver.dtoh_async if to_host else driver.htod_async
            for dst, src, n in copies:
                rc, failed = queue(dst, src, n, None), n
                if rc != 0:
                    break
            synced = driver.sync(None)  # also after a failed enqueue: copies are in flight
            rc = rc or synced
    finally:
        if restore is not None:
            driver.set_current(restore)
    if rc != 0:
        raise RuntimeError(f"cuMemcpy{'DtoH' if to_host else 'HtoD'} of {failed} bytes on "
                           f"cuda:{device} failed: CUDA error {rc}")
    return True


def _copy(dst: int, src: int, nbytes: int, device: int, to_host: bool) -> None:
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    if nbytes == 0:
        return
    if _driver_copies_of([(dst, src, nbytes)], device, to_host):
        return
    if _backend() == "cupy":
        import cupy  # noqa: PLC0415

        kind = cupy.cuda.runtime.memcpyDeviceToHost if to_host \
            else cupy.cuda.runtime.memcpyHostToDevice
        with cupy.cuda.Device(device):
            cupy.cuda.runtime.memcpy(dst, src, nbytes, kind)
        return
    import torch  # noqa: PLC0415

    dev = torch.device("cuda", device)
    dev_ptr, host_ptr = (src, dst) if to_host else (dst, src)
    dev_t = torch.as_tensor(_DeviceSpan(dev_ptr, nbytes), device=dev)
    host_t = torch.frombuffer((ctypes.c_ubyte * nbytes).from_address(host_ptr),
                              dtype=torch.uint8)
    with torch.cuda.device(dev):
        if to_host:
            host_t.copy_(dev_t)
        else:
            dev_t.copy_(host_t)
        torch.cuda.current_stream(dev).synchronize()


def copy_device_to_host(dev_ptr: int, host: int | memoryview, nbytes: int, device: int) -> None:
    """Synchronously copy ``nbytes`` from device memory to host memory (address or view)."""
    _copy(_host_address(host), dev_ptr, nbytes, device, to_host=True)


def copy_host_to_device(host: int | memoryview, dev_ptr: int, nbytes: int, device: int) -> None:
    """Synchronously copy ``nbytes`` from host memory (address or view) to device memory."""
    _copy(dev_ptr, _host_address(host), nbytes, device, to_host=False)


def copy_many(copies: Sequence[tuple[int, int | memoryview, int]], device: int,
              to_host: bool) -> None:
    """Several ``(device pointer, host address or view, nbytes)`` copies between one device and
    host memory, all done when this returns.

    Why: the connector moves a KV block as one piece per layer, and a synchronous copy pays the
    driver's fixed cost per piece (10-13 us on an H200, whatever the size). While the caller's
    stream is the default one, the pieces are queued as async copies and waited for once;
    otherwise each is copied on its own on the caller's stream."""
    if any(n < 0 for _, _, n in copies):
        raise ValueError("nbytes must be >= 0")
    work = [(_host_address(host), dev, n) if to_host else (dev, _host_address(host), n)
            for dev, host, n in copies if n > 0]
    if len(work) > 1 and _driver_copies_of(work, device, to_host):
        return
    for dev, host, n in copies:
        if to_host:
            copy_device_to_host(dev, host, n, device)
        else:
            copy_host_to_device(host, dev, n, device)


@dataclass(frozen=True, slots=True)
class StagingBuffer:
    """One leased staging chunk. ``index`` is stable, so users can cache per-chunk state
    (an RDMA transport registers each chunk once per NIC)."""

    index: int
    address: int
    nbytes: int
    view: memoryview


class StagingPool:
    """At most ``count`` host buffers of ``chunk_size`` bytes, allocated on first need.

    Why bounded: pinned memory is a scarce kernel resource; a burst of transfers waits for a
    free chunk (with a timeout) instead of pinning gigabytes.
    """

    def __init__(self, chunk_size: int, count: int, allocator: Allocator | None = None) -> None:
        if not 0 < chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK}]")
        if not 0 < count <= MAX_COUNT:
            raise ValueError(f"count must be in (0, {MAX_COUNT}]")
        self.chunk_size = chunk_size
        self.count = count
        self._allocator = allocator or pinned_allocator
        self._allocations: list[HostAllocation] = []
        self._free: collections.deque[int] = collections.deque()
        self._leased: set[int] = set()
        self._lock = threading.Condition()
        self._async_waiters: collections.deque[tuple[asyncio.AbstractEventLoop,
                                                     asyncio.Future[int]]] = collections.deque()
        self._closed = False

    def _buffer(self, index: int) -> StagingBuffer:
        alloc = self._allocations[index]
        return StagingBuffer(index, alloc.address, self.chunk_size, alloc.view)

    def _take(self) -> int | None:
        """Under the lock: a free index, allocating a new chunk while under ``count``."""
        if self._closed:
            raise RuntimeError("staging pool is closed")
        if self._free:
            index = self._free.popleft()
        elif len(self._allocations) < self.count:
            alloc = self._allocator(self.chunk_size)
            if len(alloc.view) < self.chunk_size:
                raise RuntimeError("allocator returned a short buffer")
            self._allocations.append(alloc)
            index = len(self._allocations) - 1
        else:
            return None
        self._leased.add(index)
        return index

    @property
    def allocated(self) -> int:
        return len(self._allocations)

    @property
    def in_use(self) -> int:
        with self._lock:
            return len(self._leased)

    def buffers(self) -> list[StagingBuffer]:
        """Every chunk allocated so far (leased or not), e.g. to register them up front."""
        with self._lock:
            return [self._buffer(i) for i in range(len(self._allocations))]

    def acquire(self, timeout: float | None = None) -> StagingBuffer:
        """Block until a chunk is free; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while (index := self._take()) is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no staging buffer free within {timeout} s "
                                       f"({self.count} x {self.chunk_size} B all leased)")
                self._lock.wait(remaining)
            return self._buffer(index)

    async def acquire_async(self, timeout: float | None = None) -> StagingBuffer:
        """Like :meth:`acquire` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            index = self._take()
            if index is not None:
                return self._buffer(index)
            future: asyncio.Future[int] = loop.create_future()
            self._async_waiters.append((loop, future))
        try:
            index = await asyncio.wait_for(future, timeout)
        except BaseException as exc:
            with self._lock:
                with contextlib.suppress(ValueError):
                    self._async_waiters.remove((loop, future))
            if future.done() and not future.cancelled():
                self.release(self._buffer(future.result()))  # handed over as we gave up
            if isinstance(exc, asyncio.TimeoutError):
                raise TimeoutError(f"no staging buffer free within {timeout} s") from None
            raise
        return self._buffer(index)

    def release(self, buffer: StagingBuffer) -> None:
        """Give a chunk back; hands it straight to the oldest waiter, async ones first."""
        with self._lock:
            if buffer.index not in self._leased:
                raise ValueError(f"staging buffer {buffer.index} is not leased")
            while self._async_waiters:
                loop, future = self._async_waiters.popleft()
                if future.done():
                    continue
                try:
                    loop.call_soon_threadsafe(_hand_over, future, buffer.index, self)
                except RuntimeError:
                    continue  # that loop is gone
                return  # stays leased, now on behalf of the waiter
            self._leased.discard(buffer.index)
            self._free.append(buffer.index)
            self._lock.notify()

    @contextlib.contextmanager
    def lease(self, timeout: float | None = None) -> Iterator[StagingBuffer]:
        buffer = self.acquire(timeout)
        try:
            yield buffer
        finally:
            self.release(buffer)

    @contextlib.asynccontextmanager
    async def lease_async(self, timeout: float | None = None) -> AsyncIterator[StagingBuffer]:
        buffer = await self.acquire_async(timeout)
        try:
            yield buffer
        finally:
            self.release(buffer)

    def close(self) -> None:
        """Drop the chunks (leased ones stay alive through their leases' views)."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self._allocations.clear()
            self._lock.notify_all()


def _hand_over(future: asyncio.Future[int], index: int, pool: StagingPool) -> None:
    if future.done():
        # The waiter timed out between release() and now: put the chunk back.
        pool.release(pool._buffer(index))
    else:
        future.set_result(index)
