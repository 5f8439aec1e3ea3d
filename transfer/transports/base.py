"""The contract every data-plane transport (tcp, shm, rdma, file) implements.

Why an explicit contract: the engine owns registration, descriptors, batching, slicing and retries;
a transport only moves already-validated slices between a local address and a remote address of
one peer. Keeping that line sharp is what lets RDMA (which cannot be run here) share every other
code path with the transports we can test end to end.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Opcode", "Slice", "LocalBuffer", "Transport", "TransportError"]


class Opcode(enum.IntEnum):
    """Direction of a transfer, seen from the initiator (Mooncake's READ=0, WRITE=1)."""

    READ = 0   # remote -> local
    WRITE = 1  # local -> remote


@dataclass(frozen=True, slots=True)
class Slice:
    """A piece of one or more requests. The engine has already range-checked both sides.

    The remote side is always one contiguous range. The local side is ``length`` bytes at
    ``local_addr``, or, when ``parts`` is set (only for a transport whose ``gather`` is true),
    the ``(address, length)`` pieces of ``parts`` in order: an object put from one page per
    layer into one replica is one slice, not one per page."""

    opcode: Opcode
    local_addr: int
    remote_addr: int
    length: int
    parts: tuple[tuple[int, int], ...] = ()

    def pieces(self) -> tuple[tuple[int, int], ...]:
        """The local ``(address, length)`` pieces, in order."""
        return self.parts or ((self.local_addr, self.length),)


@dataclass(frozen=True, slots=True)
class LocalBuffer:
    """A registered local buffer as transports see it (for memory registration, e.g. RDMA MRs).

    ``location`` is ``"cpu:<numa>"`` or ``"cuda:<device>"``; ``shm_name`` is set when the buffer
    is backed by a shared-memory file that same-host peers may map.
    """

    address: int
    length: int
    location: str
    shm_name: str | None = None


class TransportError(Exception):
    """A slice could not be moved on this path; the engine may retry it on another path."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Transport(ABC):
    """One way of moving bytes. Instances belong to one engine and live as long as it does."""

    name: ClassVar[str]
    gather: ClassVar[bool] = False
    """Whether :meth:`execute` takes slices whose local side is several pieces (``parts``)."""

    @abstractmethod
    async def start(self) -> dict[str, Any]:
        """Open listeners/devices. Returns this transport's entry for the local segment
        descriptor (JSON-compatible: addresses, ports, NIC GIDs/LIDs, ...)."""

    async def register(self, buffer: LocalBuffer) -> dict[str, Any]:
        """Called when the engine registers a buffer. Returns per-buffer info peers need
        (e.g. an RDMA rkey); published in the descriptor under the buffer's entry."""
        return {}

    async def unregister(self, buffer: LocalBuffer) -> None:
        """Called before the engine forgets a buffer (release MRs, mappings, ...)."""

    @abstractmethod
    def reachable(self, peer_entry: Mapping[str, Any]) -> bool:
        """Whether this transport can reach a peer whose descriptor offers ``peer_entry``."""

    @abstractmethod
    async def execute(self, peer_name: str, peer_entry: Mapping[str, Any],
                      peer_buffers: Sequence[Mapping[str, Any]], slices: Sequence[Slice],
                      *, path: int = 0) -> None:
        """Move every slice to/from the peer or raise :class:`TransportError`.

        ``peer_buffers`` are the peer descriptor's buffer entries (address, length, location,
        per-transport info); ``path`` selects a connection/NIC so that a retry goes elsewhere.
        """

    async def close(self) -> None:
        """Release sockets, queue pairs, mappings. Idempotent."""
