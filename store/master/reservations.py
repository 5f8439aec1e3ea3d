"""Space reserved ahead for one writer: a put becomes write + commit, one master round trip.

Why: a two-phase put costs two master round trips around its write (``put_start`` asks where
to write, ``put_end`` publishes). A writer that holds a reservation - one allocation on a
memory segment, granted ahead of the puts - places its next object itself, at the front of
what it holds, writes it, and then publishes it with a single ``put_commit`` naming the key,
size and offset. The master checks that the range is exactly the front of that writer's
reservation, cuts it off as the object's own allocation (:meth:`OffsetAllocator.carve`) and
records a complete object, just as ``put_end`` would have.

Rules that keep it safe:

- A reservation belongs to one client id; only that client commits from it, front first.
- It expires ``put_timeout`` seconds after it was made, like a put started and never ended:
  the rest goes back to the segment. The reply says so, and a writer stops writing into it
  half that long after it asked (the same window :class:`~store.client.staged.StagedPut`
  keeps), so nothing is ever written into space that went back.
- A new reservation may hand back the previous one's rest in the same call.
- Unmounting the segment drops its reservations with it.
- Only plain objects use it: one replica, no preferred segment. Everything else, and every
  tenant-scoped master, keeps the two-phase put.

A reservation is master memory only (not persisted): after a failover the new leader does not
know it, the writer's next commit is refused, and the writer drops it and falls back to the
two-phase put - the same exposure as a ``put_start`` in flight during a failover.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import MasterError, MasterErrorCode
from .messages import ReplicateConfig
from .segments import Segment

if TYPE_CHECKING:
    from .objects import ObjectStore

__all__ = ["MIN_RESERVATION", "Reservation", "Reservations"]

MIN_RESERVATION = 1 << 20
"""Smaller requests are not worth a reservation (and would fragment the segment)."""
_SHARE = 8
"""A reservation takes at most 1/_SHARE of a segment's free space."""


class Reservation:
    __slots__ = ("id", "client_id", "segment", "front", "end", "expires")

    def __init__(self, id: int, client_id: str, segment: Segment, front: int, end: int,
                 expires: float) -> None:
        self.id = id
        self.client_id = client_id
        self.segment = segment
        self.front = front
        """Offset in the segment of the next object (the rest's allocation starts here)."""
        self.end = end
        self.expires = expires


class Reservations:
    """The reservations of one :class:`ObjectStore` (driven by its single thread)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.live: dict[int, Reservation] = {}
        self._next_id = 1
        self.made = 0
        self.commits = 0

    def reserve(self, client_id: str, size: int, ttl: float, release: int = 0) -> Reservation:
        """Reserve up to ``size`` bytes (at least :data:`MIN_RESERVATION` and at most an
        eighth of a segment's free space) on a memory segment for ``client_id``; first hand
        back the rest of ``release`` if it is this client's. ``NO_AVAILABLE_HANDLE`` when no
        segment can spare that much (the writer then uses two-phase puts)."""
        if release:
            self.release(client_id, release)
        if size < MIN_RESERVATION:
            size = MIN_RESERVATION
        store = self.store
        # The segment with the most free space gives the largest share.
        best = max(store.segments.memory_segments(), key=lambda seg: seg.allocator.free,
                   default=None)
        if best is not None:
            size = min(size, best.allocator.free // _SHARE)
            size -= size % best.allocator.alignment
        if best is None or size < MIN_RESERVATION:
            raise MasterError(MasterErrorCode.NO_AVAILABLE_HANDLE,
                              f"no memory segment can spare {MIN_RESERVATION} bytes ahead")
        front = best.allocator.allocate(size)
        rid = self._next_id
        self._next_id += 1
        res = Reservation(rid, client_id, best, front, front + size, store.clock() + ttl)
        self.live[rid] = res
        self.made += 1
        return res

    def commit(self, client_id: str, rid: int, key: str, size: int, address: int,
               config: ReplicateConfig) -> None:
        """Publish ``key`` (``size`` bytes written at ``address``) from the front of
        reservation ``rid``. A retried commit of the same object succeeds again."""
        store = self.store
        existing = store.objects.get(key)
        if (existing is not None and existing.complete and existing.owner == client_id
                and existing.size == size and len(existing.replicas) == 1
                and existing.descriptors()[0].address == address):
            return  # a retry whose first reply was lost: the object is already there
        res = self.live.get(rid)
        if res is None or res.client_id != client_id:
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              f"reservation {rid} is not held by this client (expired, "
                              "released, or made by a previous master)")
        store.check_new_key(key)
        offset = address - res.segment.base
        alloc = res.segment.allocator
        if offset != res.front or size <= 0 or res.front + alloc.allocation_size(size) > res.end:
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              f"[0x{address:x}, +{size}) is not the front of reservation "
                              f"{rid}")
        if res.front + alloc.allocation_size(size) == res.end:
            del self.live[rid]  # the object takes all that is left
        else:
            res.front = alloc.carve(offset, size)
        store.add_complete(key, client_id, size, res.segment, offset, config)
        self.commits += 1

    def release(self, client_id: str, rid: int) -> bool:
        """Hand the rest of reservation ``rid`` back (a no-op if it is not this client's)."""
        res = self.live.get(rid)
        if res is None or res.client_id != client_id:
            return False
        self._free(res)
        return True

    def expire(self, now: float) -> int:
        """Hand back every reservation past its expiry; returns how many."""
        stale = [r for r in self.live.values() if r.expires <= now]
        for res in stale:
            self._free(res)
        return len(stale)

    def drop_segment(self, segment: Segment) -> None:
        """The segment was unmounted: its allocator, and the reservations in it, are gone."""
        for rid in [r.id for r in self.live.values() if r.segment is segment]:
            del self.live[rid]

    @property
    def reserved_bytes(self) -> int:
        return sum(r.end - r.front for r in self.live.values())

    def _free(self, res: Reservation) -> None:
        del self.live[res.id]
        if self.store.segments.get(res.segment.name) is res.segment:
            res.segment.allocator.free_range(res.front)
