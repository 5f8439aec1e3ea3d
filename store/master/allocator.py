"""Per-segment offset allocator: segregated free lists with O(1) coalescing.

Why this design (a small TLSF): the master places ~30k objects/s, so an allocation must cost a
few dict operations, not a scan. Free blocks are indexed three ways - by start (to find the
right neighbour), by end (the left neighbour) and in power-of-two size bins (to find a fit) -
and a bitmask of non-empty bins finds the first bin that can serve a request in O(1). Freed
blocks merge with both neighbours at once, so freeing everything always leaves one block of the
whole capacity. Sizes are rounded up to ``alignment``; since every block starts on a multiple of
it, every offset returned is aligned. A request is served from the smallest bin whose every
block fits (good fit), falling back to the exact-class bin, which keeps fragmentation low
without a best-fit search; the request's own class is scanned only when nothing larger
is free, so an allocation fails only when no free block can hold it.
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["OffsetAllocator", "OutOfSpace"]


class OutOfSpace(Exception):
    """No free block is large enough."""


class OffsetAllocator:
    """Allocates ``[offset, offset + size)`` ranges inside ``[0, capacity)``."""

    __slots__ = ("capacity", "alignment", "used", "_by_start", "_by_end", "_bins", "_mask",
                 "_allocated")

    def __init__(self, capacity: int, alignment: int = 64) -> None:
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self.used = 0
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._bins: list[dict[int, None]] = [{} for _ in range(max(self.capacity, 1).bit_length() + 1)]
        self._mask = 0
        self._allocated: dict[int, int] = {}
        if self.capacity:
            self._insert(0, self.capacity)

    @classmethod
    def with_used(cls, capacity: int, used: Iterable[tuple[int, int]],
                  alignment: int = 64) -> OffsetAllocator:
        """An allocator whose ``used`` ranges are already taken (rebuild after failover).

        Raises ``ValueError`` if a range is out of bounds, misaligned or overlaps another.
        """
        alloc = cls(capacity, alignment)
        if alloc.capacity:
            alloc._remove(0, alloc.capacity)
        cursor = 0
        for offset, size in sorted(used):
            size = alloc._round(size)
            if offset % alignment or offset < cursor or offset + size > alloc.capacity:
                raise ValueError(f"range [{offset}, +{size}) is misaligned, overlaps another "
                                 f"or lies outside the {alloc.capacity}-byte segment")
            if offset > cursor:
                alloc._insert(cursor, offset - cursor)
            alloc._allocated[offset] = size
            alloc.used += size
            cursor = offset + size
        if cursor < alloc.capacity:
            alloc._insert(cursor, alloc.capacity - cursor)
        return alloc

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def free_blocks(self) -> int:
        """Number of free blocks (1 when nothing is allocated: everything coalesced)."""
        return len(self._by_start)

    def largest_free(self) -> int:
        """Size of the largest free block (an upper bound on what one allocation can get)."""
        if not self._mask:
            return 0
        return max(self._by_start[s] for s in self._bins[self._mask.bit_length() - 1])

    def allocation_size(self, size: int) -> int:
        """Bytes an allocation of ``size`` really takes (rounded up to the alignment)."""
        return self._round(size)

    def allocate(self, size: int) -> int:
        """Reserve ``size`` bytes (rounded up to the alignment); return the offset."""
        if size <= 0:
            raise ValueError(f"allocation size must be positive, got {size}")
        need = self._round(size)
        if need > self.capacity - self.used:  # also keeps _find's bin index in range
            raise OutOfSpace(need)
        start = self._find(need)
        block = self._by_start[start]
        self._remove(start, block)
        if block > need:
            self._insert(start + need, block - need)
        self._allocated[start] = need
        self.used += need
        return start

    def free_range(self, offset: int) -> int:
        """Release the allocation at ``offset``; returns its size. ``KeyError`` if not allocated."""
        size = self._allocated.pop(offset)
        self.used -= size
        start, end = offset, offset + size
        left = self._by_end.get(start)
        if left is not None:
            self._remove(left, start - left)
            start = left
        right = self._by_start.get(end)
        if right is not None:
            self._remove(end, right)
            end += right
        self._insert(start, end - start)
        return size

    def carve(self, offset: int, size: int) -> int:
        """Split the allocation at ``offset`` in two allocations: its first ``size`` bytes
        (rounded up to the alignment) and the rest; returns the offset of the rest.

        Why: space granted ahead to a writer (see ``store.master.grants``) is one allocation
        that objects are cut from, front first; each piece must then be freeable on its own.
        ``KeyError`` if nothing is allocated at ``offset``; ``ValueError`` if ``size`` does not
        leave a non-empty rest.
        """
        block = self._allocated[offset]
        need = self._round(size)
        if not 0 < need < block:
            raise ValueError(f"cannot carve {size} bytes off a {block}-byte allocation")
        self._allocated[offset] = need
        self._allocated[offset + need] = block - need
        return offset + need

    def allocations(self) -> dict[int, int]:
        """A copy of ``{offset: size}`` of the live allocations."""
        return dict(self._allocated)

    def free_list(self) -> list[tuple[int, int]]:
        """Sorted ``(offset, size)`` of the free blocks."""
        return sorted(self._by_start.items())

    # -- internals ----------------------------------------------------------------------------

    def _round(self, size: int) -> int:
        a = self.alignment
        return (size + a - 1) & ~(a - 1)

    def _find(self, need: int) -> int:
        # Bin i holds blocks with size in [2**i, 2**(i+1)). Every block of bin
        # need.bit_length() and above is >= need; bin need.bit_length()-1 may have some.
        cls = need.bit_length() - 1
        above = self._mask >> (cls + 1)
        if need & (need - 1) == 0:  # a power of two: its own class fits entirely
            above = self._mask >> cls
            if above:
                b = cls + (above & -above).bit_length() - 1
                return next(iter(self._bins[b]))
            raise OutOfSpace(need)
        if above:
            b = cls + 1 + (above & -above).bit_length() - 1
            return next(iter(self._bins[b]))
        by_start = self._by_start
        # Only reached when nothing larger is free (a nearly full segment): scan the class.
        for start in self._bins[cls]:
            if by_start[start] >= need:
                return start
        raise OutOfSpace(need)

    def _insert(self, start: int, size: int) -> None:
        self._by_start[start] = size
        self._by_end[start + size] = start
        b = size.bit_length() - 1
        self._bins[b][start] = None
        self._mask |= 1 << b

    def _remove(self, start: int, size: int) -> None:
        del self._by_start[start]
        del self._by_end[start + size]
        b = size.bit_length() - 1
        bin_ = self._bins[b]
        del bin_[start]
        if not bin_:
            self._mask &= ~(1 << b)
