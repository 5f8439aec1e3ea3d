"""Approximate-LRU eviction of the memory tier, driven by a high watermark.

When memory-tier usage passes ``high_watermark`` (default 0.90) of capacity, :meth:`Evictor.run`
frees ``ratio`` (default 0.05) of capacity - or more, down to the watermark - walking the LRU
from its cold end. Objects that are leased, hard-pinned or still being written are skipped;
soft-pinned ones are taken only in a second pass, when the first could not free enough.
The walk is bounded (``max_scan``) so one pass can never stall the loop on a store full of
leased objects. A put that finds no room calls :meth:`make_room` for exactly what it needs
before giving up with ``NO_AVAILABLE_HANDLE``.

Only memory replicas are evicted: an object that also has a file-tier replica keeps it (and
stays readable). With a :class:`~.demotion.Demoter` (the SSD tier) a victim is first offered to
it: if a file segment has room the object is demoted instead - its memory is freed once the holder
has copied it (the bytes count as freed for this pass; objects being demoted are skipped). Before
dropping memory replicas the store's ``evict_hook`` is told.
"""
from __future__ import annotations

import logging

from .demotion import Demoter
from .messages import ReplicaDesc
from .objects import ObjectMeta, ObjectStore
from .segments import release

__all__ = ["Evictor"]

logger = logging.getLogger(__name__)


class Evictor:
    """Frees memory-tier space of an :class:`ObjectStore` by approximate LRU."""

    def __init__(self, store: ObjectStore, *, high_watermark: float = 0.90, ratio: float = 0.05,
                 max_scan: int = 200_000, offload: bool = False,
                 offload_timeout: float = 10.0) -> None:
        if not 0.0 < high_watermark <= 1.0:
            raise ValueError(f"high_watermark must be in (0, 1], got {high_watermark}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.store = store
        self.high_watermark = high_watermark
        self.ratio = ratio
        self.max_scan = max_scan
        self.evicted_objects = 0
        self.evicted_bytes = 0
        self.demoter = Demoter(store, self.drop_memory, timeout=offload_timeout, enabled=offload)
        store.make_room = self.make_room

    def over_watermark(self) -> bool:
        segs = self.store.segments
        return segs.memory_capacity > 0 and (
            self._memory_used() > self.high_watermark * segs.memory_capacity)

    def _memory_used(self) -> int:
        """Memory-tier bytes in use, not counting what in-flight demotions are about to free."""
        return self.store.segments.memory_used - self.demoter.inflight_memory_bytes

    def run(self) -> int:
        """One watermark check; evicts if above it. Returns bytes freed."""
        if not self.over_watermark():
            return 0
        segs = self.store.segments
        capacity = segs.memory_capacity
        target = max(int(self.ratio * capacity),
                     self._memory_used() - int(self.high_watermark * capacity))
        return self.make_room(target)

    def make_room(self, need: int) -> int:
        """Evict cold objects until ``need`` bytes of memory tier are freed (or nothing more
        can be). Returns the bytes freed."""
        store = self.store
        now = store.clock()
        freed = 0
        pinned: list[tuple[str, ObjectMeta]] = []
        victims: list[tuple[str, ObjectMeta]] = []
        scanned = 0
        demoting = store.demoting
        for key, meta in store.objects.items():  # coldest first
            if freed >= need or scanned >= self.max_scan:
                break
            scanned += 1
            if not meta.complete or meta.hard_pin or meta.lease_until > now or key in demoting:
                continue
            gain = _memory_bytes(meta)
            if not gain:
                continue
            if meta.soft_pin_until > now:
                pinned.append((key, meta))
                continue
            victims.append((key, meta))
            freed += gain
        for key, meta in pinned:  # second pass: soft pins yield only if nothing else could
            if freed >= need:
                break
            victims.append((key, meta))
            freed += _memory_bytes(meta)
        demoted = 0
        demoter = self.demoter
        for key, meta in victims:
            if demoter.enabled and demoter.start(key, meta, _memory_bytes(meta)):
                demoted += 1
            else:
                self.drop_memory(key, meta)
        if victims:
            logger.info("evicting %d objects (%d demoted to the file tier; %d bytes) to free %d "
                        "bytes", len(victims), demoted, freed, need)
        return freed

    def drop_memory(self, key: str, meta: ObjectMeta) -> None:
        """Evict the old way: drop the memory replicas (the object too if nothing is left)."""
        store = self.store
        memory = [r for r in meta.replicas if r[0].is_memory]
        if store.evict_hook is not None:
            size = meta.size
            try:
                store.evict_hook(key, [ReplicaDesc(s.name, s.base + o, size, s.tier)
                                       for s, o in memory])
            except Exception:
                logger.exception("eviction hook failed for %r; evicting anyway", key)
        self.evicted_objects += 1
        self.evicted_bytes += meta.size * len(memory)
        kept = [r for r in meta.replicas if not r[0].is_memory]
        if kept:
            release(key, memory)
            meta.replicas = kept
        else:
            store.drop(key, meta)


def _memory_bytes(meta: ObjectMeta) -> int:
    return sum(seg.allocator.allocation_size(meta.size) for seg, _ in meta.replicas
               if seg.is_memory)
