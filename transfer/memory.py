"""Registered memory: which address ranges peers may touch, and how to reach their bytes.

Why a registry at all: a transfer names raw addresses, so every request is checked against it on
both sides before a byte moves - an unregistered or out-of-range address gets a clear error, never
a wild read. Lookups happen per slice on data-plane threads, so readers see an immutable snapshot
(sorted starts + regions, swapped atomically) and never take a lock.

:func:`address_of` turns the buffer types users hold (numpy arrays, bytearray, mmap, torch/cupy
tensors) into ``(address, length, location)`` without importing torch or cupy unless such an
object is passed in.
"""
from __future__ import annotations

import bisect
import ctypes
import threading
from dataclasses import dataclass, field
from typing import Any

from transfer.cuda import copy_device_to_host, cuda_pointer_device, parse_cuda_location
from transfer.errors import AddressError, RegistrationError

__all__ = [
    "FILE_ADDRESS_BASE",
    "MAX_ADDRESS",
    "MemoryRegistry",
    "Region",
    "address_of",
    "memory_at",
]

#: Addresses are unsigned 64-bit.
MAX_ADDRESS = (1 << 64) - 1
#: File-backed buffers get addresses from this range (far above any user-space mapping on
#: x86-64/arm64, whose canonical addresses stop below 2**48), so they can never collide with
#: memory and a request can still name "a file range" by address, as Mooncake's API expects.
FILE_ADDRESS_BASE = 1 << 62


@dataclass(slots=True)
class Region:
    """One registered buffer.

    ``location`` is ``cpu:<n>``, ``cuda:<n>`` or ``file:<path>``. Shared-memory-backed buffers
    carry the file name and the offset of ``address`` inside it; file-backed ones the open
    descriptor and the file offset of ``address``.
    """

    address: int
    length: int
    location: str
    shm_name: str | None = None
    shm_offset: int = 0
    file_fd: int | None = None
    file_offset: int = 0
    keepalive: Any = field(default=None, repr=False)  # holds a buffer export: memory stays put
    #: Host memory the CPU transports can address directly (not a file, not CUDA).
    direct: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        self.direct = not (self.is_file or self.is_cuda)

    @property
    def end(self) -> int:
        return self.address + self.length

    @property
    def is_file(self) -> bool:
        return self.location.startswith("file:")

    @property
    def is_cuda(self) -> bool:
        return self.location.startswith("cuda:")

    def contains(self, address: int, length: int) -> bool:
        return self.address <= address and address + length <= self.end


def memory_at(address: int, length: int) -> memoryview:
    """A writable byte memoryview over ``length`` bytes of host memory at ``address``.

    Only call with a range the registry vouched for: this is the one place raw pointers become
    Python buffers.
    """
    if length == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


class MemoryRegistry:
    """The registered buffers of one engine; non-overlapping, looked up by address."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._regions: list[Region] = []

    def __len__(self) -> int:
        return len(self._regions)

    def regions(self) -> list[Region]:
        """A snapshot, sorted by address."""
        return list(self._regions)

    def snapshot(self) -> list[Region]:
        """The current sorted region list itself - never mutated, replaced on every change -
        so callers may cache things derived from it and compare it by identity."""
        return self._regions

    def add(self, region: Region) -> Region:
        """Register ``region``; raises :class:`RegistrationError` on a bad or overlapping range."""
        _check_range(region.address, region.length, RegistrationError)
        with self._lock:
            starts, regions = self._starts, self._regions
            i = bisect.bisect_left(starts, region.address)
            for neighbour in regions[max(0, i - 1):i + 1]:
                if neighbour.address < region.end and region.address < neighbour.end:
                    if neighbour.address == region.address and neighbour.length == region.length:
                        raise RegistrationError(
                            f"buffer 0x{region.address:x}+{region.length} is already registered")
                    raise RegistrationError(
                        f"buffer 0x{region.address:x}+{region.length} overlaps registered "
                        f"buffer 0x{neighbour.address:x}+{neighbour.length}")
            self._starts = starts[:i] + [region.address] + starts[i:]
            self._regions = regions[:i] + [region] + regions[i:]
        return region

    def remove(self, address: int) -> Region:
        """Forget the buffer that starts at ``address``."""
        with self._lock:
            i = bisect.bisect_left(self._starts, address)
            if i == len(self._starts) or self._starts[i] != address:
                raise RegistrationError(f"no registered buffer starts at 0x{address:x}")
            region = self._regions[i]
            self._starts = self._starts[:i] + self._starts[i + 1:]
            self._regions = self._regions[:i] + self._regions[i + 1:]
        return region

    def find(self, address: int, length: int) -> Region:
        """The registered buffer holding all of ``[address, address + length)``.

        Raises :class:`AddressError` naming the problem: bad range, unregistered address, or a
        range that runs past the end of its buffer.
        """
        _check_range(address, length, AddressError)
        starts, regions = self._starts, self._regions  # one consistent snapshot
        i = bisect.bisect_right(starts, address) - 1
        if i < 0 or address >= regions[i].end:
            raise AddressError(f"address 0x{address:x} is not in any registered buffer")
        region = regions[i]
        if address + length > region.end:
            raise AddressError(
                f"range 0x{address:x}+{length} runs past the end of registered buffer "
                f"0x{region.address:x}+{region.length}")
        return region

    def host_bytes(self, address: int, length: int) -> memoryview:
        """The registered bytes at ``[address, address + length)`` as the CPU can read them: a
        view of host memory, or a copy of CUDA memory (a checksum or a ``bytes`` result must
        never read a device address on the host; that crashes the process)."""
        region = self.find(address, length)
        device = parse_cuda_location(region.location)
        if device is None:
            return memory_at(address, length)
        out = memoryview(bytearray(length))
        copy_device_to_host(address, out, length, device)
        return out

    def first(self) -> Region | None:
        regions = self._regions
        return regions[0] if regions else None


def _check_range(address: object, length: object, exc: type[Exception]) -> None:
    if isinstance(address, bool) or not isinstance(address, int):
        raise exc(f"address must be an int, got {type(address).__name__}")
    if isinstance(length, bool) or not isinstance(length, int):
        raise exc(f"length must be an int, got {type(length).__name__}")
    if length <= 0:
        raise exc(f"length must be positive, got {length}")
    if address <= 0 or address + length - 1 > MAX_ADDRESS:
        raise exc(f"range 0x{address:x}+{length} is outside the 64-bit address space")


def address_of(obj: Any, length: int | None = None) -> tuple[int, int, str, Any]:
    """``(address, length, location, keepalive)`` of a buffer object.

    Accepts an int address (``length`` required; CUDA device memory if the CUDA driver says so,
    else host memory), numpy-like arrays, writable buffers (bytearray, mmap, ...), torch
    tensors and cupy arrays. Arrays must be contiguous: a registered buffer is one byte range.
    ``keepalive`` pins Python-owned memory (a bytearray cannot be resized, an mmap not closed)
    while registered.
    """
    if isinstance(obj, bool):
        raise RegistrationError("a bool is not a buffer")
    if isinstance(obj, int):
        if length is None:
            raise RegistrationError("registering a raw address needs a length")
        device = cuda_pointer_device(obj)
        return obj, length, "cpu:0" if device is None else f"cuda:{device}", None
    module = type(obj).__module__.split(".")[0]
    if module == "torch":
        return _torch_address(obj, length)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        if cai.get("strides") is not None:
            raise RegistrationError("CUDA array must be C-contiguous")
        nbytes = int(obj.nbytes)
        device = getattr(getattr(obj, "device", None), "id", 0)
        return int(cai["data"][0]), _sub_length(nbytes, length), f"cuda:{device}", obj
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None and not isinstance(obj, (bytes, bytearray, memoryview)):
        flags = getattr(obj, "flags", None)
        if flags is not None and not flags["C_CONTIGUOUS"]:
            raise RegistrationError("array must be C-contiguous")
        if ai["data"][1]:
            raise RegistrationError("array is read-only")
        return int(ai["data"][0]), _sub_length(int(obj.nbytes), length), "cpu:0", obj
    try:
        view = memoryview(obj)
    except TypeError:
        raise RegistrationError(f"cannot register a {type(obj).__name__}: not a buffer") from None
    if view.readonly:
        raise RegistrationError(f"cannot register a read-only {type(obj).__name__}")
    if not view.c_contiguous:
        raise RegistrationError("buffer must be contiguous")
    nbytes = view.nbytes
    if nbytes == 0:
        raise RegistrationError("cannot register an empty buffer")
    pinned = (ctypes.c_char * nbytes).from_buffer(view.cast("B"))
    return ctypes.addressof(pinned), _sub_length(nbytes, length), "cpu:0", pinned


def _torch_address(t: Any, length: int | None) -> tuple[int, int, str, Any]:
    if not t.is_contiguous():
        raise RegistrationError("tensor must be contiguous")
    nbytes = int(t.numel() * t.element_size())
    location = f"cuda:{t.device.index or 0}" if t.is_cuda else "cpu:0"
    return int(t.data_ptr()), _sub_length(nbytes, length), location, t


def _sub_length(nbytes: int, length: int | None) -> int:
    if length is None:
        return nbytes
    if length <= 0 or length > nbytes:
        raise RegistrationError(f"length {length} is outside the buffer's {nbytes} bytes")
    return length
