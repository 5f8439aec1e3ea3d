"""Shared-memory host buffers and the same-host probe.

Why files in ``/dev/shm``: a same-host peer can ``mmap`` one by name and copy straight into it,
with no socket and no extra copy. Why a probe rather than comparing addresses: two containers may
share an IP but not ``/dev/shm`` (or the reverse), so "same host" is decided by what matters - an
engine writes a random token to a probe file, publishes the file name and the token in its
descriptor, and a peer that can open that file and read the same token shares its ``/dev/shm``.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from transfer.errors import AddressError, DescriptorError

__all__ = ["SHM_DIR", "HostProbe", "SharedBuffer", "ShmMappings", "check_shm_name"]

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^mooncake-[A-Za-z0-9_.-]{1,200}$")
_TOKEN_BYTES = 16


def check_shm_name(name: object) -> str:
    """Accept only names this module creates: a peer's descriptor must not steer us to
    ``../etc/passwd`` or any other file."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise DescriptorError(f"invalid shared-memory name {name!r}")
    return name


@dataclass
class SharedBuffer:
    """Host memory backed by a ``/dev/shm`` file, so same-host peers can map it.

    ``address`` stays valid until :meth:`free`. The file is removed by :meth:`free` (peers that
    mapped it keep their mapping until they drop it).
    """

    name: str
    size: int
    _mmap: mmap.mmap = field(repr=False)
    _pin: Any = field(repr=False)
    address: int = 0

    @classmethod
    def create(cls, size: int, prefix: str = "buf") -> SharedBuffer:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"shared buffer size must be a positive int, got {size!r}")
        name = f"mooncake-{prefix}-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        pin = (ctypes.c_char * size).from_buffer(mapping)
        return cls(name=name, size=size, _mmap=mapping, _pin=pin, address=ctypes.addressof(pin))

    @property
    def view(self) -> memoryview:
        """A writable view of the whole buffer."""
        return memoryview(self._pin).cast("B")

    def free(self) -> None:
        """Unmap and remove the file. Idempotent."""
        if self._pin is None:
            return
        self._pin = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))
        with contextlib.suppress(BufferError):
            self._mmap.close()
        self.address = 0


class HostProbe:
    """This engine's probe file; :meth:`matches` checks a peer's.

    The engine holds a shared ``flock`` on its probe file for its whole life, so
    :func:`reap_stale` can tell a dead engine's files (lock free) from a live one's, even across
    PID namespaces that share ``/dev/shm``.
    """

    def __init__(self) -> None:
        self.token = secrets.token_hex(_TOKEN_BYTES)
        self.id = secrets.token_hex(8)
        self.name = f"mooncake-probe-{self.id}"
        path = os.path.join(SHM_DIR, self.name)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        os.write(self._fd, self.token.encode())

    @property
    def buffer_prefix(self) -> str:
        """Name prefix of this engine's shared buffers (reaped with the probe)."""
        return f"buf-{self.id}"

    def entry(self) -> dict[str, str]:
        return {"probe": self.name, "token": self.token}

    @staticmethod
    def matches(entry: Any) -> bool:
        """Whether the peer that published ``entry`` shares our ``/dev/shm``."""
        try:
            name = check_shm_name(entry.get("probe"))
            token = entry.get("token")
            if not isinstance(token, str) or len(token) != 2 * _TOKEN_BYTES:
                return False
            with open(os.path.join(SHM_DIR, name), "rb") as f:
                return secrets.compare_digest(f.read(2 * _TOKEN_BYTES + 1), token.encode())
        except (OSError, DescriptorError, AttributeError):
            return False

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def reap_stale(min_age: float = 10.0) -> int:
    """Remove probe and buffer files of engines that died without cleaning up (kill -9).

    A probe whose lock can be taken exclusively has no living owner; files younger than
    ``min_age`` seconds are left alone (their owner may not have locked them yet).
    Returns the number of files removed.
    """
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    now = time.time()
    for name in names:
        if not name.startswith("mooncake-probe-"):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < min_age:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: its engine is alive
        finally:
            os.close(fd)
        owner = name[len("mooncake-probe-"):]
        for other in names:
            if other == name or other.startswith(f"mooncake-buf-{owner}-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM_DIR, other))
                    removed += 1
    return removed


class _Mapping:
    __slots__ = ("address", "mmap", "pin", "size")

    def __init__(self, name: str) -> None:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            if self.size <= 0:
                raise AddressError(f"shared-memory file {name} is empty")
            self.mmap = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.pin = (ctypes.c_char * self.size).from_buffer(self.mmap)
        self.address = ctypes.addressof(self.pin)

    def close(self) -> None:
        self.pin = None
        with contextlib.suppress(BufferError):
            self.mmap.close()


class ShmMappings:
    """Peers' shared-memory files mapped into this process, by name (mapped once, reused)."""

    def __init__(self, max_mappings: int = 1024) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, _Mapping] = {}
        self._max = max_mappings

    def local_address(self, name: str, offset: int, length: int) -> int:
        """Where ``[offset, offset + length)`` of the peer's file ``name`` is mapped here."""
        check_shm_name(name)
        with self._lock:
            m = self._maps.get(name)
            if m is None:
                if len(self._maps) >= self._max:
                    self._maps.pop(next(iter(self._maps))).close()
                m = self._maps[name] = _Mapping(name)
        if offset < 0 or offset + length > m.size:
            raise AddressError(f"range {offset}+{length} is outside shared file {name} "
                               f"({m.size} bytes)")
        return m.address + offset

    def drop(self, name: str) -> None:
        """Forget a mapping (the peer restarted or the file vanished)."""
        with self._lock:
            m = self._maps.pop(name, None)
        if m is not None:
            m.close()

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        for m in maps.values():
            m.close()
