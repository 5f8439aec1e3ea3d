"""Replica locations: which replica to read first, and a cache of locations under their lease.

Why cache: a get is a master hop plus a holder hop. While the master's lease on an object runs the
object can be neither evicted nor (without ``force``) removed, so its replica addresses cannot
change; reusing them for repeated gets inside the lease saves the master hop. Entries expire a
safety margin before the lease does, are dropped when a read from them fails or when this client
removes the key, and the cache is bounded. A forced remove by *another* client inside the lease is
the one case the cache cannot see; with checksums enabled such a read fails instead of returning
wrong bytes.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from store.master import ReplicaDesc

__all__ = ["LocationCache", "order_replicas"]

_MARGIN = 0.8


def order_replicas(replicas: Sequence[ReplicaDesc], local_segments: frozenset[str],
                   local_host: str) -> list[ReplicaDesc]:
    """Nearest first: our own segments, then same-host segments, then the rest; memory before
    file tier within each group (a file replica is the fallback of an evicted DRAM copy)."""
    def rank(r: ReplicaDesc) -> tuple[int, int]:
        if r.segment in local_segments:
            distance = 0
        elif r.segment.rpartition(":")[0].strip("[]") == local_host:
            distance = 1
        else:
            distance = 2
        return distance, 0 if r.tier == "memory" else 1
    return sorted(replicas, key=rank)


class LocationCache:
    """``key -> (replicas, expiry)``; LRU-bounded, monotonic-clock expiry."""

    def __init__(self, max_entries: int = 65536) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[list[ReplicaDesc], float]] = OrderedDict()
        # The loop and caller threads (store.client.direct) share the cache.
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> list[ReplicaDesc] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[1] <= time.monotonic():
            with self._lock:
                self._entries.pop(key, None)
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def put(self, key: str, replicas: list[ReplicaDesc], lease_ttl_ms: int) -> None:
        if lease_ttl_ms <= 0 or self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = (replicas, time.monotonic() + lease_ttl_ms * _MARGIN / 1000.0)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def invalidate(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
