"""Memory registration, the part of :class:`transfer.engine.Engine` that decides what peers may touch.

Kept apart from the engine's transfer machinery because it is a concept of its own: host, CUDA,
shared-memory and file buffers become range-checked regions, each transport is told about them
(RDMA registers memory regions, the file transport records device and inode), and the
descriptor is republished once per call.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

from transfer.errors import RegistrationError
from transfer.memory import MemoryRegistry, Region, address_of
from transfer.shm import HostProbe, SharedBuffer
from transfer.transports.base import LocalBuffer, Transport

__all__ = ["Registration"]


class Registration:
    """Registration methods of the engine (a mixin: the engine owns the state named below)."""

    registry: MemoryRegistry
    _info: dict[int, dict[str, dict[str, Any]]]
    _shared: dict[int, SharedBuffer]
    _transports: dict[str, Transport]
    _probe: HostProbe
    _next_file_address: int

    def _check_running(self) -> None:
        raise NotImplementedError

    async def _publish(self) -> None:
        raise NotImplementedError

    async def register(self, buffer: Any, length: int | None = None, *,
                       location: str | None = None) -> int:
        """Register host or CUDA memory; returns its address. See :func:`address_of`."""
        return (await self.register_many([(buffer, length)], location=location))[0]

    async def register_many(self, buffers: Iterable[tuple[Any, int | None]], *,
                            location: str | None = None) -> list[int]:
        """Register several buffers and publish the descriptor once; all or nothing."""
        self._check_running()
        added: list[Region] = []
        try:
            for obj, length in buffers:
                addr, n, loc, keep = address_of(obj, length)
                if location is not None:
                    if not location.startswith(("cpu:", "cuda:")):
                        raise RegistrationError(
                            f"location must be cpu:N or cuda:N, got {location!r}")
                    loc = location
                shm_name, shm_offset = self._shared_backing(addr, n)
                region = self.registry.add(Region(addr, n, loc, shm_name, shm_offset,
                                                  keepalive=keep))
                added.append(region)
                await self._register_with_transports(region)
        except BaseException:
            for region in added:
                self.registry.remove(region.address)
                self._info.pop(region.address, None)
            raise
        await self._publish()
        return [r.address for r in added]

    async def unregister(self, address: int) -> None:
        """Forget the buffer starting at ``address`` and republish."""
        self._check_running()
        region = self.registry.remove(address)
        self._info.pop(address, None)
        lb = LocalBuffer(region.address, region.length, region.location, region.shm_name)
        for transport in self._transports.values():
            await transport.unregister(lb)
        if region.file_fd is not None:
            os.close(region.file_fd)
        await self._publish()

    async def allocate_shared(self, size: int, *, register: bool = True) -> SharedBuffer:
        """Host memory in a ``/dev/shm`` file, registered, so same-host peers copy directly."""
        self._check_running()
        buf = SharedBuffer.create(size, prefix=self._probe.buffer_prefix)
        self._shared[buf.address] = buf
        if register:
            try:
                await self.register(buf.address, size)
            except BaseException:
                self._shared.pop(buf.address, None)
                buf.free()
                raise
        return buf

    async def free_shared(self, buf: SharedBuffer) -> None:
        """Unregister (if registered) and release a buffer from :meth:`allocate_shared`."""
        if self._shared.pop(buf.address, None) is None:
            raise RegistrationError(f"0x{buf.address:x} was not allocated by this engine")
        with contextlib.suppress(RegistrationError):
            await self.unregister(buf.address)
        buf.free()

    async def register_file(self, path: str | os.PathLike[str], *, offset: int = 0,
                            length: int | None = None) -> int:
        """Register ``length`` bytes of a file from ``offset`` as a buffer (``file:<path>``).

        Returns the address peers name in requests; the file must exist and be large enough.
        """
        self._check_running()
        full = os.path.realpath(os.fspath(path))
        fd = os.open(full, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if length is None:
                length = size - offset
            if offset < 0 or length <= 0 or offset + length > size:
                raise RegistrationError(
                    f"range {offset}+{length} is outside {full} ({size} bytes)")
            address = self._next_file_address
            self._next_file_address += (length + 0xFFFF) & ~0xFFFF
            region = self.registry.add(Region(address, length, f"file:{full}", file_fd=fd,
                                              file_offset=offset))
            await self._register_with_transports(region)
            self._info[address].setdefault("file", {}).update({"offset": offset})
        except BaseException:
            os.close(fd)
            raise
        await self._publish()
        return address

    def _shared_backing(self, addr: int, length: int) -> tuple[str | None, int]:
        for base, buf in self._shared.items():
            if base <= addr and addr + length <= base + buf.size:
                return buf.name, addr - base
        return None, 0

    async def _register_with_transports(self, region: Region) -> None:
        lb = LocalBuffer(region.address, region.length, region.location, region.shm_name)
        info: dict[str, dict[str, Any]] = {}
        for name, transport in self._transports.items():
            entry = await transport.register(lb)
            if entry:
                info[name] = entry
        self._info[region.address] = info
