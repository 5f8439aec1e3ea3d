"""Object metadata: two-phase puts, replicas, leases, pins, and the LRU order eviction uses.

One :class:`ObjectStore` owns everything the master knows and is driven from a single thread
(the RPC loop), so there are no locks: every operation below runs to completion before the next
starts, which is what makes concurrent puts of one key safe - the first ``put_start`` inserts
the record, the second finds it and gets ``OBJECT_PUT_IN_PROGRESS`` (or
``OBJECT_ALREADY_EXISTS``), and nobody ever sees a half-written object because replicas are only
returned once ``put_end`` marked the record complete.

Per-object cost matters (the target is millions of objects): a record is a ``__slots__`` object
holding the size, ``(segment, offset)`` tuples, three floats and the put owner; the LRU is the
``OrderedDict`` that also indexes the records (``move_to_end`` on every read).

Leases: a read (and an exists that asks for it) grants a lease of ``lease_ttl`` seconds during
which the object is neither evicted nor removed, so "exists, then load" never races eviction.
Soft pins keep an object out of eviction until nothing else can be freed; hard pins never evict.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .errors import MasterError, MasterErrorCode
from .messages import MountSegmentReply, RemountObject, ReplicaDesc, ReplicateConfig, SegmentDesc
from .segments import Segment, SegmentTable, release, validate_segment
from .allocator import OffsetAllocator
from .reservations import Reservations

if TYPE_CHECKING:
    from .demotion import Demotion

__all__ = ["MAX_KEY_BYTES", "MAX_REPLICAS", "ObjectMeta", "ObjectStore", "check_key"]

MAX_KEY_BYTES = 256
MAX_REPLICAS = 16

_OK = 0
_NOT_FOUND = int(MasterErrorCode.OBJECT_NOT_FOUND)
_NOT_READY = int(MasterErrorCode.REPLICA_IS_NOT_READY)

Replica = tuple[Segment, int]
EvictionHook = Callable[[str, list[ReplicaDesc]], None]
"""Called with an object's key and memory replicas just before eviction frees them (the SSD
tier hooks in here to copy the object to a file segment first)."""


class ObjectMeta:
    """What the master knows about one object."""

    __slots__ = ("size", "replicas", "complete", "owner", "started", "lease_until",
                 "soft_pin_until", "hard_pin", "rebuilt")

    def __init__(self, size: int, replicas: list[Replica], owner: str, started: float,
                 soft_pin_until: float, hard_pin: bool) -> None:
        self.size = size
        self.replicas = replicas
        self.complete = False
        self.owner = owner
        self.started = started
        self.lease_until = 0.0
        self.soft_pin_until = soft_pin_until
        self.hard_pin = hard_pin
        self.rebuilt = False
        """Known from remounts (a failover rebuild), not from a put on this master."""

    def descriptors(self) -> list[ReplicaDesc]:
        size = self.size
        return [ReplicaDesc(seg.name, seg.base + off, size, seg.tier) for seg, off in self.replicas]


def check_key(key: str) -> None:
    """Non-empty and at most 256 bytes of UTF-8, else INVALID_KEY."""
    if not key or (len(key) > MAX_KEY_BYTES // 4 and len(key.encode("utf-8")) > MAX_KEY_BYTES):
        raise MasterError(MasterErrorCode.INVALID_KEY,
                          f"key must be 1..{MAX_KEY_BYTES} bytes of UTF-8, got "
                          f"{len(key.encode('utf-8'))} bytes")


class ObjectStore:
    """Segments + objects + the rules between them. Not thread-safe: one loop drives it."""

    def __init__(
        self,
        *,
        lease_ttl: float = 10.0,
        soft_pin_ttl: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease_ttl = lease_ttl
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self.soft_pin_ttl = soft_pin_ttl
        self.clock = clock
        self.segments = SegmentTable()
        self.objects: OrderedDict[str, ObjectMeta] = OrderedDict()
        self.pending: dict[str, ObjectMeta] = {}
        """Puts started and not ended, oldest first (for the stale-put sweep)."""
        self.stored_bytes = 0
        self.evict_hook: EvictionHook | None = None
        self.make_room: Callable[[int], int] | None = None
        """Set by the evictor: frees at least the given bytes of memory tier if it can."""
        self.demoting: dict[str, Demotion] = {}
        """Objects being copied to the file tier (see :mod:`.demotion`)."""
        self.demotion_dropped: Callable[[Demotion], None] | None = None
        """Set by the demoter: an object being demoted was dropped (free its file space)."""
        self.on_drop: Callable[[str], None] | None = None
        """Set by the tenancy layer (:mod:`.tenants`): an object is gone (release its charge)."""
        self.reservations = Reservations(self)
        """Space reserved ahead for writers (see :mod:`.reservations`)."""

    # -- segments -----------------------------------------------------------------------------

    def mount(self, desc: SegmentDesc, objects: list[RemountObject]) -> MountSegmentReply:
        """Mount a segment; with ``objects``, re-register what it holds (failover rebuild)."""
        validate_segment(desc)
        if self.segments.get(desc.name) is not None:
            raise MasterError(MasterErrorCode.SEGMENT_ALREADY_EXISTS,
                              f"segment {desc.name!r} is already mounted")
        if not objects:
            self.segments.add(Segment(desc))
            return MountSegmentReply(0)
        ranges = []
        for obj in objects:
            check_key(obj.key)
            if obj.size <= 0 or obj.address < desc.base:
                raise MasterError(MasterErrorCode.INVALID_PARAMS,
                                  f"remounted object {obj.key!r} lies outside segment {desc.name!r}")
            ranges.append((obj.address - desc.base, obj.size))
        try:
            allocator = OffsetAllocator.with_used(desc.size, ranges)
        except ValueError as e:
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              f"remount of {desc.name!r}: {e}") from None
        segment = Segment(desc, allocator)
        self.segments.add(segment)
        rebuilt = 0
        discarded: list[int] = []
        for obj in objects:
            offset = obj.address - desc.base
            segment.owners[offset] = obj.key
            meta = self.objects.get(obj.key)
            if meta is None:
                meta = ObjectMeta(obj.size, [], desc.client_id, 0.0, 0.0, False)
                meta.complete = True
                meta.rebuilt = True
                self.objects[obj.key] = meta
                self.stored_bytes += obj.size
                rebuilt += 1
            # Only copies of an object rebuilt from remounts join it. An object put on this
            # master may be a newer version of the key (removed and put again while this
            # holder was declared dead): same size, other bytes, and a checksum cannot tell.
            if meta.complete and meta.rebuilt and meta.size == obj.size:
                meta.replicas.append((segment, offset))
            else:  # possibly another version of that key: this copy may be stale
                del segment.owners[offset]
                allocator.free_range(offset)
                discarded.append(obj.address)
        return MountSegmentReply(rebuilt, discarded)

    def unmount(self, name: str, client_id: str | None = None) -> int:
        """Unmount a segment, dropping its replicas; returns how many objects disappeared."""
        segment = self.segments.get(name)
        if segment is None:
            raise MasterError(MasterErrorCode.SEGMENT_NOT_FOUND, f"segment {name!r} is not mounted")
        if client_id is not None and segment.client_id != client_id:
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              f"segment {name!r} belongs to another client")
        self.segments.remove(name)
        self.reservations.drop_segment(segment)
        owners, segment.owners = segment.owners, {}
        lost = 0
        for offset, key in owners.items():
            meta = self.objects.get(key)
            if meta is None:
                continue
            meta.replicas = [r for r in meta.replicas if r[0] is not segment]
            if not meta.replicas:
                self.drop(key, meta)
                lost += 1
        return lost

    # -- puts ---------------------------------------------------------------------------------

    def put_start(self, client_id: str, key: str, size: int, config: ReplicateConfig,
                  now: float | None = None) -> list[ReplicaDesc]:
        """Reserve space for ``key`` on ``replica_num`` distinct segments; see the module doc."""
        if now is None:
            now = self.clock()
        check_key(key)
        replica_num = config.replica_num
        if not 1 <= replica_num <= MAX_REPLICAS:
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              f"replica_num must be 1..{MAX_REPLICAS}, got {replica_num}")
        segs = self.segments
        largest = segs.largest_memory_segment
        if size <= 0 or (largest and size > largest and not _preferred(config)):
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              f"object size {size} must be positive and fit a segment "
                              f"(largest is {largest} bytes)")
        self.check_new_key(key)
        preferred = _preferred(config)
        same_host = self._host_of(config, client_id) if config.prefer_alloc_in_same_node else None
        replicas = segs.place(key, size, replica_num, preferred, same_host)
        if replicas is None and self.make_room is not None:
            self.make_room(size * replica_num)
            replicas = segs.place(key, size, replica_num, preferred, same_host)
        if replicas is None:
            raise MasterError(MasterErrorCode.NO_AVAILABLE_HANDLE,
                              f"no room for {replica_num} replica(s) of {size} bytes "
                              f"({len(segs.memory_segments())} memory segments mounted)")
        meta = ObjectMeta(size, replicas, client_id, now, self._soft_until(config, now),
                          config.with_hard_pin)
        self.objects[key] = meta
        self.pending[key] = meta
        return meta.descriptors()

    def check_new_key(self, key: str) -> None:
        """A valid key that no object (complete or being put) has yet."""
        check_key(key)
        existing = self.objects.get(key)
        if existing is not None:
            if existing.complete:
                raise MasterError(MasterErrorCode.OBJECT_ALREADY_EXISTS, f"{key!r} already exists")
            raise MasterError(MasterErrorCode.OBJECT_PUT_IN_PROGRESS,
                              f"a put of {key!r} is in progress")

    def add_complete(self, key: str, client_id: str, size: int, segment: Segment, offset: int,
                     config: ReplicateConfig) -> None:
        """Record ``key`` as complete at ``offset`` of ``segment``, whose allocation there is
        already the object's (a commit from a reservation; see :mod:`.reservations`)."""
        now = self.clock()
        segment.owners[offset] = key
        meta = ObjectMeta(size, [(segment, offset)], client_id, now,
                          self._soft_until(config, now), config.with_hard_pin)
        meta.complete = True
        self.objects[key] = meta
        self.stored_bytes += size

    def _soft_until(self, config: ReplicateConfig, now: float) -> float:
        if not _soft_pin(config):
            return 0.0
        ttl = config.soft_pin_ttl_ms / 1000.0 if config.soft_pin_ttl_ms > 0 else self.soft_pin_ttl
        return now + ttl

    def put_end(self, client_id: str, key: str) -> None:
        """Publish a started put: its replicas become visible to readers."""
        meta = self.objects.get(key)
        if meta is None:
            raise MasterError(MasterErrorCode.OBJECT_NOT_FOUND,
                              f"no put of {key!r} to end (revoked, or reclaimed after timeout)")
        if meta.complete:
            return  # a retried put_end
        if meta.owner != client_id:
            raise MasterError(MasterErrorCode.OBJECT_PUT_IN_PROGRESS,
                              f"the put of {key!r} in progress belongs to another client")
        meta.complete = True
        del self.pending[key]
        self.stored_bytes += meta.size

    def put_revoke(self, client_id: str, key: str) -> None:
        """Abandon a started put and free its space."""
        meta = self.objects.get(key)
        if meta is None:
            raise MasterError(MasterErrorCode.OBJECT_NOT_FOUND, f"no put of {key!r} to revoke")
        if meta.complete:
            raise MasterError(MasterErrorCode.OBJECT_ALREADY_EXISTS,
                              f"the put of {key!r} has ended; use remove")
        if meta.owner != client_id:
            raise MasterError(MasterErrorCode.OBJECT_PUT_IN_PROGRESS,
                              f"the put of {key!r} in progress belongs to another client")
        self.drop(key, meta)

    # -- reads --------------------------------------------------------------------------------

    def get_replica_list(self, key: str, now: float | None = None) -> list[ReplicaDesc]:
        """Complete replicas of ``key``; grants a lease (see :attr:`lease_ttl`)."""
        meta = self.objects.get(key)
        if meta is None:
            raise MasterError(MasterErrorCode.OBJECT_NOT_FOUND, f"{key!r} not found")
        if not meta.complete:
            raise MasterError(MasterErrorCode.REPLICA_IS_NOT_READY, f"the put of {key!r} has not ended")
        meta.lease_until = (self.clock() if now is None else now) + self.lease_ttl
        self.objects.move_to_end(key)
        return meta.descriptors()

    def lookup(self, key: str, now: float) -> tuple[int, list[ReplicaDesc]]:
        """Batch form of :meth:`get_replica_list`: a code instead of an exception."""
        meta = self.objects.get(key)
        if meta is None:
            return _NOT_FOUND, []
        if not meta.complete:
            return _NOT_READY, []
        meta.lease_until = now + self.lease_ttl
        self.objects.move_to_end(key)
        return _OK, meta.descriptors()

    def exists(self, key: str, grant_lease: bool, now: float) -> bool:
        """True if ``key`` is complete; optionally lease it (and count it as an access)."""
        meta = self.objects.get(key)
        if meta is None or not meta.complete:
            return False
        if grant_lease:
            meta.lease_until = now + self.lease_ttl
            self.objects.move_to_end(key)
        return True

    def batch_exists(self, keys: Iterable[str], grant_lease: bool) -> list[bool]:
        objects = self.objects
        if not grant_lease:
            out = []
            for key in keys:
                meta = objects.get(key)
                out.append(meta is not None and meta.complete)
            return out
        now = self.clock()
        return [self.exists(key, True, now) for key in keys]

    # -- removal ------------------------------------------------------------------------------

    def remove(self, key: str, force: bool = False, now: float | None = None) -> None:
        """Remove a complete object; refused while leased unless ``force``."""
        meta = self.objects.get(key)
        if meta is None:
            raise MasterError(MasterErrorCode.OBJECT_NOT_FOUND, f"{key!r} not found")
        if not meta.complete:
            raise MasterError(MasterErrorCode.REPLICA_IS_NOT_READY,
                              f"the put of {key!r} has not ended; revoke it instead")
        if not force and meta.lease_until > (self.clock() if now is None else now):
            raise MasterError(MasterErrorCode.OBJECT_HAS_LEASE,
                              f"{key!r} is leased by a reader; retry after the lease expires")
        self.drop(key, meta)

    def remove_all(self, force: bool = False) -> int:
        """Remove every complete object that is not leased (all complete ones with ``force``)."""
        now = self.clock()
        doomed = [k for k, m in self.objects.items()
                  if m.complete and (force or m.lease_until <= now)]
        for key in doomed:
            self.drop(key, self.objects[key])
        return len(doomed)

    def reclaim_stale_puts(self, timeout: float, now: float | None = None) -> int:
        """Revoke puts started more than ``timeout`` seconds ago and never ended."""
        if now is None:
            now = self.clock()
        deadline = now - timeout
        stale = []
        for key, meta in self.pending.items():  # oldest first
            if meta.started > deadline:
                break
            stale.append((key, meta))
        for key, meta in stale:
            self.drop(key, meta)
        return len(stale)

    def drop(self, key: str, meta: ObjectMeta) -> None:
        """Forget ``key`` and free every replica it still has."""
        del self.objects[key]
        if self.on_drop is not None:
            self.on_drop(key)
        if meta.complete:
            self.stored_bytes -= meta.size
        else:
            self.pending.pop(key, None)
        release(key, meta.replicas)
        meta.replicas = []
        if self.demoting:
            demotion = self.demoting.get(key)
            if demotion is not None and self.demotion_dropped is not None:
                self.demotion_dropped(demotion)

    def _host_of(self, config: ReplicateConfig, client_id: str) -> str | None:
        for name in _preferred(config):
            seg = self.segments.get(name)
            if seg is not None:
                return seg.host_id
        for seg in self.segments.segments.values():
            if seg.client_id == client_id:
                return seg.host_id
        return None


def _preferred(config: ReplicateConfig) -> list[str]:
    if config.preferred_segment:
        return [config.preferred_segment, *config.preferred_segments]
    return config.preferred_segments


def _soft_pin(config: ReplicateConfig) -> bool:
    action = config.soft_pin_action.lower()
    return config.soft_pin or (action not in ("", "none"))
