"""Mounted segments and replica placement.

A segment is memory a client contributes to the pool: DRAM (tier ``memory``) or a file on its
SSD (tier ``file``). The master never touches its bytes; it owns the segment's allocator and
knows which object occupies which offset, so that unmounting a segment (or a client dying) drops
exactly the replicas that lived there without scanning every object.

Placement: a put asks for ``replica_num`` distinct memory segments. Preferred segments are tried
first, then (with ``prefer_alloc_in_same_node``) segments on the requester's host, then the rest
starting from a rotating index so load spreads without a random draw per object.
"""
from __future__ import annotations

from collections.abc import Iterable

from .allocator import OffsetAllocator, OutOfSpace
from .errors import MasterError, MasterErrorCode
from .messages import TIER_MEMORY, TIERS, SegmentDesc

__all__ = ["MAX_SEGMENT_NAME", "Segment", "SegmentTable", "release", "validate_segment"]

MAX_SEGMENT_NAME = 256
_MAX_ADDRESS = (1 << 64) - 1


class Segment:
    """One mounted segment: its descriptor, allocator and ``offset -> key`` of its replicas."""

    __slots__ = ("name", "tier", "base", "size", "client_id", "host_id", "allocator", "owners")

    def __init__(self, desc: SegmentDesc, allocator: OffsetAllocator | None = None) -> None:
        self.name = desc.name
        self.tier = desc.tier
        self.base = desc.base
        self.size = desc.size
        self.client_id = desc.client_id
        self.host_id = desc.host_id
        self.allocator = allocator if allocator is not None else OffsetAllocator(desc.size)
        self.owners: dict[int, str] = {}

    @property
    def used(self) -> int:
        return self.allocator.used

    @property
    def is_memory(self) -> bool:
        return self.tier == TIER_MEMORY

    def place_one(self, key: str, size: int) -> int | None:
        """Allocate ``size`` bytes for ``key`` here (a replica added to an existing object);
        the offset, or ``None`` if this segment has no room."""
        alloc = self.allocator
        if alloc.capacity - alloc.used < size:
            return None
        try:
            offset = alloc.allocate(size)
        except OutOfSpace:
            return None
        self.owners[offset] = key
        return offset


def validate_segment(desc: SegmentDesc) -> None:
    """Reject descriptors that could not describe real memory, with INVALID_PARAMS."""
    problems = []
    if not desc.name or len(desc.name.encode("utf-8")) > MAX_SEGMENT_NAME:
        problems.append(f"name must be 1..{MAX_SEGMENT_NAME} bytes")
    if not desc.client_id or len(desc.client_id) > MAX_SEGMENT_NAME:
        problems.append(f"client_id must be 1..{MAX_SEGMENT_NAME} characters")
    if len(desc.host_id) > MAX_SEGMENT_NAME:
        problems.append(f"host_id must be at most {MAX_SEGMENT_NAME} characters")
    if desc.tier not in TIERS:
        problems.append(f"tier must be one of {', '.join(TIERS)}")
    if desc.size <= 0 or desc.base < 0 or desc.base + desc.size > _MAX_ADDRESS:
        problems.append("base and size must describe a non-empty 64-bit address range")
    if problems:
        raise MasterError(MasterErrorCode.INVALID_PARAMS,
                          f"bad segment {desc.name[:64]!r}: " + "; ".join(problems))


class SegmentTable:
    """All mounted segments, with capacity totals of the memory tier for the watermark."""

    def __init__(self) -> None:
        self.segments: dict[str, Segment] = {}
        self._memory: list[Segment] = []
        self._files: list[Segment] = []
        self._cursor = 0
        self.memory_capacity = 0
        self.largest_memory_segment = 0

    def __len__(self) -> int:
        return len(self.segments)

    def get(self, name: str) -> Segment | None:
        return self.segments.get(name)

    @property
    def memory_used(self) -> int:
        return sum(s.allocator.used for s in self._memory)

    def memory_segments(self) -> list[Segment]:
        return list(self._memory)

    @property
    def has_file_tier(self) -> bool:
        return bool(self._files)

    def add(self, segment: Segment) -> None:
        """Register a mounted segment (the name must be free)."""
        if segment.name in self.segments:
            raise MasterError(MasterErrorCode.SEGMENT_ALREADY_EXISTS,
                              f"segment {segment.name!r} is already mounted")
        self.segments[segment.name] = segment
        if segment.is_memory:
            self._memory.append(segment)
            self._recount()
        else:
            self._files.append(segment)

    def remove(self, name: str) -> Segment:
        segment = self.segments.pop(name, None)
        if segment is None:
            raise MasterError(MasterErrorCode.SEGMENT_NOT_FOUND, f"segment {name!r} is not mounted")
        if segment.is_memory:
            self._memory.remove(segment)
            self._recount()
        else:
            self._files.remove(segment)
        return segment

    def _recount(self) -> None:
        self.memory_capacity = sum(s.allocator.capacity for s in self._memory)
        self.largest_memory_segment = max((s.allocator.capacity for s in self._memory), default=0)

    def place(self, key: str, size: int, replica_num: int, preferred: Iterable[str],
              same_host: str | None) -> list[tuple[Segment, int]] | None:
        """Allocate ``size`` bytes on ``replica_num`` distinct segments for ``key``.

        Preferred segments may be of either tier (that is how an object is moved to a file
        segment); the others are memory segments. Returns ``(segment, offset)`` pairs, or
        ``None`` (and nothing allocated) if not enough segments have room.
        """
        chosen: list[tuple[Segment, int]] = []
        seen: set[str] = set()
        for name in preferred:
            seg = self.segments.get(name)
            if seg is not None and name not in seen and self._try(seg, key, size, chosen):
                seen.add(name)
                if len(chosen) == replica_num:
                    return chosen
        memory = self._memory
        n = len(memory)
        if n:
            start = self._cursor % n
            self._cursor = start + 1
            order = memory[start:] + memory[:start] if start else memory
            if same_host:
                order = ([s for s in order if s.host_id == same_host]
                         + [s for s in order if s.host_id != same_host])
            for seg in order:
                if seg.name not in seen and self._try(seg, key, size, chosen):
                    seen.add(seg.name)
                    if len(chosen) == replica_num:
                        return chosen
        release(key, chosen)
        return None

    def place_file(self, key: str, size: int, host_id: str) -> tuple[Segment, int] | None:
        """Allocate ``size`` bytes for ``key`` on a file-tier segment, same host first (so the
        holder's copy stays on the machine), else the emptiest; ``None`` if none has room."""
        order = sorted(self._files, key=lambda s: (s.host_id != host_id, s.used / s.size))
        chosen: list[tuple[Segment, int]] = []
        for seg in order:
            if self._try(seg, key, size, chosen):
                return chosen[0]
        return None

    @staticmethod
    def _try(seg: Segment, key: str, size: int, chosen: list[tuple[Segment, int]]) -> bool:
        alloc = seg.allocator
        if alloc.capacity - alloc.used < size:
            return False
        try:
            offset = alloc.allocate(size)
        except OutOfSpace:
            return False
        seg.owners[offset] = key
        chosen.append((seg, offset))
        return True


def release(key: str, replicas: Iterable[tuple[Segment, int]]) -> None:
    """Free the replicas' space (their segments may already be unmounted: then a no-op)."""
    for seg, offset in replicas:
        if seg.owners.get(offset) == key:
            del seg.owners[offset]
            seg.allocator.free_range(offset)

