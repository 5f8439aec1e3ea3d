"""Adding one replica of a complete object on a chosen segment (hot-spot replication).

Why: the Conductor sends a request to a prefill instance whose prefix lives on another host; a
replica on the chosen instance's *local* store node makes that load local. The master never
touches bytes, so this is a two-phase protocol like a put: ``replica_start`` reserves space on
the named segment and returns it together with the object's complete replicas (the copy's
sources) and leases the object so those sources stay put while the caller copies;
``replica_end`` publishes the new replica (readers see it only from then on), ``replica_revoke``
frees it. A reservation never ended is reclaimed after the put timeout, like a stale put.

The reservation is *not* in the object's replica list until it ends, so removal, eviction or an
unmount of the object meanwhile frees the object's published replicas as usual and leaves the
reservation to be freed here: a late ``replica_end`` then answers OBJECT_NOT_FOUND and frees it
(the object record is compared by identity, so a newer object under the same key is never given
a copy of the old one's bytes). If the target segment is unmounted meanwhile, its space went
with it and ``replica_end`` answers SEGMENT_NOT_FOUND.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

from .errors import MasterError, MasterErrorCode
from .messages import ReplicaDesc
from .objects import ObjectMeta, ObjectStore, check_key
from .segments import Segment, release

__all__ = ["PendingReplica", "Replications"]

logger = logging.getLogger(__name__)


class PendingReplica:
    """A replica reserved by ``replica_start`` and not yet ended or revoked."""

    __slots__ = ("key", "meta", "target", "started")

    def __init__(self, key: str, meta: ObjectMeta, target: tuple[Segment, int],
                 started: float) -> None:
        self.key = key
        self.meta = meta
        self.target = target
        self.started = started


class Replications:
    """Replica additions in flight for one :class:`ObjectStore`, keyed by ``(client, key)``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.pending: OrderedDict[tuple[str, str], PendingReplica] = OrderedDict()
        """Oldest first, for :meth:`reclaim_stale`."""
        self.added = 0

    def start(self, client_id: str, key: str, segment: str,
              now: float | None = None) -> tuple[ReplicaDesc, list[ReplicaDesc]]:
        """Reserve a replica of ``key`` on ``segment``; returns ``(target, sources)``.

        Errors: OBJECT_NOT_FOUND, REPLICA_IS_NOT_READY (put not ended), SEGMENT_NOT_FOUND,
        INVALID_PARAMS (not a memory segment), OBJECT_ALREADY_EXISTS (a replica is already on
        that segment), OBJECT_PUT_IN_PROGRESS (this client already replicates ``key``),
        NO_AVAILABLE_HANDLE (no room on that segment, even after eviction)."""
        store = self.store
        if now is None:
            now = store.clock()
        check_key(key)
        if not client_id:
            raise MasterError(MasterErrorCode.INVALID_PARAMS, "client_id must not be empty")
        meta = store.objects.get(key)
        if meta is None:
            raise MasterError(MasterErrorCode.OBJECT_NOT_FOUND, f"{key!r} not found")
        if not meta.complete:
            raise MasterError(MasterErrorCode.REPLICA_IS_NOT_READY,
                              f"the put of {key!r} has not ended")
        seg = store.segments.get(segment)
        if seg is None:
            raise MasterError(MasterErrorCode.SEGMENT_NOT_FOUND,
                              f"segment {segment!r} is not mounted")
        if not seg.is_memory:
            raise MasterError(MasterErrorCode.INVALID_PARAMS,
                              f"segment {segment!r} is not a memory segment")
        if any(s is seg for s, _ in meta.replicas):
            raise MasterError(MasterErrorCode.OBJECT_ALREADY_EXISTS,
                              f"{key!r} already has a replica on {segment!r}")
        if (client_id, key) in self.pending:
            raise MasterError(MasterErrorCode.OBJECT_PUT_IN_PROGRESS,
                              f"a replication of {key!r} by this client is in progress")
        # Lease first: the sources we hand out must outlive the copy, and eviction to make room
        # below must not pick this very object.
        meta.lease_until = max(meta.lease_until, now + store.lease_ttl)
        offset = seg.place_one(key, meta.size)
        if offset is None and store.make_room is not None:
            store.make_room(meta.size)
            offset = seg.place_one(key, meta.size)
        if offset is None:
            raise MasterError(MasterErrorCode.NO_AVAILABLE_HANDLE,
                              f"no room for {meta.size} bytes of {key!r} on {segment!r}")
        self.pending[(client_id, key)] = PendingReplica(key, meta, (seg, offset), now)
        target = ReplicaDesc(seg.name, seg.base + offset, meta.size, seg.tier)
        return target, meta.descriptors()

    def end(self, client_id: str, key: str) -> None:
        """Publish the reserved replica (see the module doc for the races it settles)."""
        p = self.pending.pop((client_id, key), None)
        if p is None:
            raise MasterError(MasterErrorCode.OBJECT_NOT_FOUND,
                              f"no replication of {key!r} by this client to end "
                              "(revoked, or reclaimed after timeout)")
        store = self.store
        seg, offset = p.target
        if store.segments.get(seg.name) is not seg or seg.owners.get(offset) != key:
            raise MasterError(MasterErrorCode.SEGMENT_NOT_FOUND,
                              f"segment {seg.name!r} was unmounted during the replication")
        if store.objects.get(key) is not p.meta or not p.meta.complete:
            release(key, [p.target])
            raise MasterError(MasterErrorCode.OBJECT_NOT_FOUND,
                              f"{key!r} was removed during the replication")
        p.meta.replicas.append(p.target)
        self.added += 1

    def revoke(self, client_id: str, key: str) -> None:
        """Abandon a reserved replica and free its space."""
        p = self.pending.pop((client_id, key), None)
        if p is None:
            raise MasterError(MasterErrorCode.OBJECT_NOT_FOUND,
                              f"no replication of {key!r} by this client to revoke")
        release(key, [p.target])

    def reclaim_stale(self, timeout: float, now: float | None = None) -> int:
        """Free reservations started more than ``timeout`` seconds ago; returns how many."""
        if now is None:
            now = self.store.clock()
        deadline = now - timeout
        stale = []
        for ident, p in self.pending.items():
            if p.started > deadline:
                break
            stale.append(ident)
        for ident in stale:
            p = self.pending.pop(ident)
            release(p.key, [p.target])
        if stale:
            logger.warning("reclaimed %d replications not ended within %.1fs", len(stale), timeout)
        return len(stale)

    def __len__(self) -> int:
        return len(self.pending)
