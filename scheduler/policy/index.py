"""Which holder has which prefix blocks: bounded per-holder indexes and the global pool view.

Each holder (a prefill instance's DRAM cache, or a store node) has a :class:`BlockIndex` with a
capacity and an eviction policy, so the index stays bounded however long the proxy runs. The
:class:`GlobalPool` keeps, per block, a bitmask of the holders that have it: one walk down a
request's block list then yields every holder's prefix-match length at once (the first block a
holder lacks ends its prefix), which is what keeps a 2048-block decision under a millisecond.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from .types import BlockId, ConductorError, EvictionPolicy


class BlockIndex:
    """The blocks one holder has, bounded by ``capacity`` (``None``: unbounded).

    Eviction: ``lru`` evicts the least recently used block; ``lfu`` the least frequently used
    (ties: least recent); ``length`` the deepest block in its prefix chain first (ties: least
    recent), because a deep block is only useful to requests that share everything before it.
    Blocks of one request are touched deepest-first so that, under LRU, a prefix's root outlives
    its tail: evicting the root first would make the whole chain unreachable for prefix matching.
    """

    __slots__ = ("capacity", "policy", "_lru", "_keys", "_heap", "_tick", "_seq")

    def __init__(self, capacity: int | None = None, policy: EvictionPolicy = "lru") -> None:
        if capacity is not None and capacity < 0:
            raise ConductorError("capacity must be >= 0 or None")
        if policy not in ("lru", "lfu", "length"):
            raise ConductorError(f"unknown eviction policy {policy!r}")
        self.capacity = capacity
        self.policy: EvictionPolicy = policy
        self._lru: OrderedDict[BlockId, None] = OrderedDict()
        self._keys: dict[BlockId, tuple[int, int]] = {}
        self._heap: list[tuple[tuple[int, int], int, BlockId]] = []
        self._tick = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._lru) if self.policy == "lru" else len(self._keys)

    def __contains__(self, block: object) -> bool:
        return block in (self._lru if self.policy == "lru" else self._keys)

    def blocks(self) -> list[BlockId]:
        """Every block held, in no promised order."""
        return list(self._lru) if self.policy == "lru" else list(self._keys)

    def add(self, blocks: Sequence[BlockId]) -> tuple[list[BlockId], list[BlockId]]:
        """Insert or touch a request's prefix blocks (in prefix order); returns (added, evicted).

        A block both added and evicted by the same call (capacity smaller than the request) is
        reported in neither list.
        """
        if self.capacity == 0:
            return [], []
        added: list[BlockId] = []
        if self.policy == "lru":
            lru = self._lru
            for block in reversed(blocks):
                if block in lru:
                    lru.move_to_end(block)
                else:
                    lru[block] = None
                    added.append(block)
        else:
            self._tick += 1
            n = len(blocks)
            for depth in range(n - 1, -1, -1):
                block = blocks[depth]
                old = self._keys.get(block)
                if old is None:
                    added.append(block)
                key = self._key(old, depth)
                self._keys[block] = key
                heapq.heappush(self._heap, (key, next(self._seq), block))
            if len(self._heap) > 4 * len(self._keys) + 64:
                self._compact()
        evicted = self._evict_over_capacity()
        if evicted and added:
            both = set(evicted).intersection(added)
            if both:
                added = [b for b in added if b not in both]
                evicted = [b for b in evicted if b not in both]
        return added, evicted

    def touch(self, blocks: Iterable[BlockId]) -> None:
        """Mark held blocks as used (a cache hit); blocks not held are ignored."""
        if self.policy == "lru":
            lru = self._lru
            for block in reversed(list(blocks)):
                if block in lru:
                    lru.move_to_end(block)
            return
        self._tick += 1
        for depth, block in reversed(list(enumerate(blocks))):
            old = self._keys.get(block)
            if old is not None:
                key = self._key(old, depth)
                self._keys[block] = key
                heapq.heappush(self._heap, (key, next(self._seq), block))

    def remove(self, blocks: Iterable[BlockId]) -> list[BlockId]:
        """Drop blocks (the holder reported them evicted); returns those that were held."""
        removed = []
        store = self._lru if self.policy == "lru" else self._keys
        for block in blocks:
            if block in store:
                del store[block]
                removed.append(block)
        return removed

    def _key(self, old: tuple[int, int] | None, depth: int) -> tuple[int, int]:
        # Smaller key = evicted first.
        if self.policy == "lfu":
            return ((old[0] if old else 0) + 1, self._tick)
        prev_depth = -old[0] if old else depth
        return (-min(depth, prev_depth), self._tick)

    def _evict_over_capacity(self) -> list[BlockId]:
        if self.capacity is None:
            return []
        evicted: list[BlockId] = []
        if self.policy == "lru":
            while len(self._lru) > self.capacity:
                evicted.append(self._lru.popitem(last=False)[0])
            return evicted
        while len(self._keys) > self.capacity:
            key, _, block = heapq.heappop(self._heap)
            if self._keys.get(block) == key:
                del self._keys[block]
                evicted.append(block)
        return evicted

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._keys.get(e[2]) == e[0]]
        heapq.heapify(self._heap)


class GlobalPool:
    """The cluster's view of cached blocks: per holder a bounded index, per block a holder mask."""

    def __init__(self) -> None:
        self._slot: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._index: dict[str, BlockIndex] = {}
        self._masks: dict[BlockId, int] = {}

    @property
    def holders(self) -> list[str]:
        return list(self._slot)

    def add_holder(
        self, holder: str, capacity: int | None = None, policy: EvictionPolicy = "lru"
    ) -> None:
        if holder in self._slot:
            raise ConductorError(f"holder {holder!r} already present")
        try:
            slot = self._ids.index(None)
            self._ids[slot] = holder
        except ValueError:
            slot = len(self._ids)
            self._ids.append(holder)
        self._slot[holder] = slot
        self._index[holder] = BlockIndex(capacity, policy)

    def remove_holder(self, holder: str) -> None:
        """Forget a holder and its blocks (it died or left)."""
        slot = self._slot.pop(holder, None)
        if slot is None:
            raise ConductorError(f"unknown holder {holder!r}")
        index = self._index.pop(holder)
        self._unmark(slot, index.blocks())
        self._ids[slot] = None

    def index(self, holder: str) -> BlockIndex:
        try:
            return self._index[holder]
        except KeyError:
            raise ConductorError(f"unknown holder {holder!r}") from None

    def add(self, holder: str, blocks: Sequence[BlockId]) -> list[BlockId]:
        """The holder now has these blocks; returns what its index evicted to make room."""
        bit = 1 << self._slot_of(holder)
        added, evicted = self._index[holder].add(blocks)
        masks = self._masks
        for block in added:
            masks[block] = masks.get(block, 0) | bit
        self._unmark(self._slot[holder], evicted)
        return evicted

    def touch(self, holder: str, blocks: Sequence[BlockId]) -> None:
        self._slot_of(holder)
        self._index[holder].touch(blocks)

    def remove(self, holder: str, blocks: Iterable[BlockId]) -> None:
        """The holder evicted these blocks."""
        slot = self._slot_of(holder)
        self._unmark(slot, self._index[holder].remove(blocks))

    def has(self, holder: str, block: BlockId) -> bool:
        return bool(self._masks.get(block, 0) >> self._slot_of(holder) & 1)

    def prefix_lengths(self, blocks: Sequence[BlockId]) -> dict[str, int]:
        """Every holder's prefix-match length for ``blocks`` (blocks held in a row from the start)."""
        ids = self._ids
        alive = 0
        for slot, holder in enumerate(ids):
            if holder is not None:
                alive |= 1 << slot
        result = dict.fromkeys(self._slot, 0)
        masks = self._masks
        i = 0
        for i, block in enumerate(blocks):
            mask = masks.get(block, 0)
            dropped = alive & ~mask
            if dropped:
                alive &= mask
                while dropped:
                    low = dropped & -dropped
                    holder = ids[low.bit_length() - 1]
                    if holder is not None:
                        result[holder] = i
                    dropped ^= low
                if not alive:
                    return result
        n = len(blocks)
        while alive:
            low = alive & -alive
            holder = ids[low.bit_length() - 1]
            if holder is not None:
                result[holder] = n
            alive ^= low
        return result

    def _slot_of(self, holder: str) -> int:
        try:
            return self._slot[holder]
        except KeyError:
            raise ConductorError(f"unknown holder {holder!r}") from None

    def _unmark(self, slot: int, blocks: Iterable[BlockId]) -> None:
        clear = ~(1 << slot)
        masks = self._masks
        for block in blocks:
            mask = masks.get(block, 0) & clear
            if mask:
                masks[block] = mask
            else:
                masks.pop(block, None)
