"""The SSD tier: demoting objects chosen for eviction to a file segment instead of dropping them.

Why a protocol and not a hook: the master never touches object bytes, so it cannot copy an object
to the file tier itself. When the evictor picks a victim and a file-tier segment has room, the
:class:`Demoter` allocates a file replica and queues a :class:`~.messages.DemoteTask` for the
client that holds the object's memory replica. That client picks its tasks up with
``take_demotions`` (it polls while its ping replies say ``offload=True``), copies the bytes
through its transfer engine, and calls ``demote_end``. Only then is the file replica published
and the memory replica freed - so a reader always finds at least one complete replica, and an
object is never lost because a copy was slow.

A demotion not ended within ``timeout`` (the holder died, or is stuck) or reported failed is
abandoned: its file space is freed and the object is evicted the old way. An object that is
leased when its demotion ends keeps its memory replica too (a lease promises the replica a reader
was given stays put); a later eviction pass then drops just the memory copy. Removing an object
while it is being demoted frees the file space at once (:meth:`ObjectStore.drop`), and the late
``demote_end`` is ignored. Ids, not keys, name demotions so a late reply can never complete the
demotion of a newer object under the same key.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from .messages import DemoteTask, ReplicaDesc
from .objects import ObjectMeta, ObjectStore
from .segments import Segment, release

__all__ = ["Demoter", "Demotion"]

logger = logging.getLogger(__name__)

MAX_TASKS_PER_TAKE = 256


class Demotion:
    """One demotion in flight: the object, its file replica (allocated, unpublished), the holder."""

    __slots__ = ("id", "key", "meta", "target", "holder", "deadline", "memory_bytes")

    def __init__(self, id: int, key: str, meta: ObjectMeta, target: tuple[Segment, int],
                 holder: str, deadline: float, memory_bytes: int) -> None:
        self.id = id
        self.key = key
        self.meta = meta
        self.target = target
        self.holder = holder
        self.deadline = deadline
        self.memory_bytes = memory_bytes


class Demoter:
    """Starts, hands out, ends and expires demotions of one :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore, drop_memory: Callable[[str, ObjectMeta], None], *,
                 timeout: float = 10.0, enabled: bool = True) -> None:
        self.store = store
        self.drop_memory = drop_memory
        """Evicts an object the old way (the evictor's): used when a demotion is abandoned."""
        self.timeout = timeout
        self.enabled = enabled
        self._ids = 0
        self.by_id: OrderedDict[int, Demotion] = OrderedDict()  # oldest first (deadline order)
        self._queued: dict[str, OrderedDict[int, Demotion]] = {}
        self.inflight_memory_bytes = 0
        """Memory-tier bytes that ending the in-flight demotions will free."""
        self.demoted_objects = 0
        self.demoted_bytes = 0
        self.abandoned = 0
        store.demotion_dropped = self._dropped

    @property
    def active(self) -> bool:
        """Whether holders should poll for tasks: enabled and some file segment is mounted."""
        return self.enabled and self.store.segments.has_file_tier

    def start(self, key: str, meta: ObjectMeta, memory_bytes: int) -> bool:
        """Begin demoting ``key`` if a file segment has room; False means "evict it instead"."""
        if not self.enabled or key in self.store.demoting:
            return False
        if any(not seg.is_memory for seg, _ in meta.replicas):
            return False  # already has a file replica: dropping the memory copy loses nothing
        source = next(((s, o) for s, o in meta.replicas if s.is_memory), None)
        if source is None:
            return False
        target = self.store.segments.place_file(key, meta.size, source[0].host_id)
        if target is None:
            return False
        self._ids += 1
        d = Demotion(self._ids, key, meta, target, source[0].client_id,
                     self.store.clock() + self.timeout, memory_bytes)
        self.store.demoting[key] = d
        self.by_id[d.id] = d
        self._queued.setdefault(d.holder, OrderedDict())[d.id] = d
        self.inflight_memory_bytes += memory_bytes
        return True

    def take(self, client_id: str, limit: int = MAX_TASKS_PER_TAKE) -> list[DemoteTask]:
        """Hand ``client_id`` up to ``limit`` of its queued demotions (each is handed out once)."""
        queue = self._queued.get(client_id)
        if not queue:
            return []
        tasks = []
        while queue and len(tasks) < limit:
            _, d = queue.popitem(last=False)
            if self.store.demoting.get(d.key) is not d:
                self._forget(d)  # removed or dropped meanwhile
                continue
            source = next(((s, o) for s, o in d.meta.replicas
                           if s.is_memory and s.client_id == client_id), None)
            if source is None:  # its holder's segment went away: leave the object be
                self._abandon(d, "its memory replica is gone", evict=False)
                continue
            seg, off = source
            tseg, toff = d.target
            size = d.meta.size
            tasks.append(DemoteTask(d.id, d.key,
                                    ReplicaDesc(seg.name, seg.base + off, size, seg.tier),
                                    ReplicaDesc(tseg.name, tseg.base + toff, size, tseg.tier)))
        if not queue:
            del self._queued[client_id]
        return tasks

    def end(self, client_id: str, demotion_id: int, ok: bool) -> bool:
        """The holder copied (``ok``) or could not copy an object; True if it was published."""
        d = self.by_id.get(demotion_id)
        if d is None or d.holder != client_id:
            return False
        store = self.store
        if store.demoting.get(d.key) is not d:
            self._forget(d)
            return False
        if not ok:
            self._abandon(d, "the holder could not copy it")
            return False
        tseg, toff = d.target
        if store.segments.get(tseg.name) is not tseg or tseg.owners.get(toff) != d.key:
            self._abandon(d, "its file segment was unmounted")
            return False
        self._forget(d)
        meta = d.meta
        if meta.lease_until > store.clock():
            meta.replicas.append(d.target)  # leased: keep the memory copy the reader was given
        else:
            memory = [r for r in meta.replicas if r[0].is_memory]
            release(d.key, memory)
            meta.replicas = [r for r in meta.replicas if not r[0].is_memory] + [d.target]
        self.demoted_objects += 1
        self.demoted_bytes += meta.size
        return True

    def expire(self) -> int:
        """Abandon demotions past their deadline; returns how many."""
        now = self.store.clock()
        late = []
        for d in self.by_id.values():  # oldest first, all share one timeout
            if d.deadline > now:
                break
            late.append(d)
        for d in late:
            if self.store.demoting.get(d.key) is d:
                self._abandon(d, f"not ended within {self.timeout}s")
            else:
                self._forget(d)
        return len(late)

    def _abandon(self, d: Demotion, why: str, evict: bool = True) -> None:
        store = self.store
        self._forget(d)
        release(d.key, [d.target])
        self.abandoned += 1
        logger.warning("demotion of %r to %s abandoned (%s)%s", d.key, d.target[0].name, why,
                       "; evicting it" if evict else "")
        meta = store.objects.get(d.key)
        if evict and meta is d.meta and meta.complete and meta.lease_until <= store.clock():
            self.drop_memory(d.key, meta)

    def _dropped(self, d: Demotion) -> None:
        release(d.key, [d.target])
        self._forget(d)

    def _forget(self, d: Demotion) -> None:
        if self.by_id.pop(d.id, None) is not None:
            self.inflight_memory_bytes -= d.memory_bytes
        if self.store.demoting.get(d.key) is d:
            del self.store.demoting[d.key]
        queue = self._queued.get(d.holder)
        if queue is not None:
            queue.pop(d.id, None)
            if not queue:
                del self._queued[d.holder]

    def __len__(self) -> int:
        return len(self.by_id)
