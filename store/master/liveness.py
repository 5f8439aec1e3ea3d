"""Client liveness: heartbeats, TTL expiry, and reclaiming what dead clients held.

A client is known from its first mount. Each ping (and mount) refreshes it; one silent
for ``client_ttl`` seconds is declared dead: its segments are unmounted, the replicas there are
dropped and objects left with no replica disappear, so readers are never sent to memory that is
gone. Its record is forgotten, so its pings answer ``known=False`` until it remounts: the client
learns it was declared dead (or that a new leader took over). A ping alone never makes a client
known again - else one ``known=False`` reply lost on the way (a ping that timed out while the
client was cut off, delivered when the link came back) would leave the client believing it is
mounted while the master has dropped its segments, for good.

The same periodic sweep reclaims puts that were started and never ended (the writer crashed
between ``put_start`` and ``put_end``) after ``put_timeout`` seconds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .objects import ObjectStore

__all__ = ["ClientRegistry", "SweepResult"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Client:
    last_seen: float
    segments: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class SweepResult:
    dead_clients: list[str]
    lost_objects: int
    reclaimed_puts: int


class ClientRegistry:
    """Tracks clients of one :class:`ObjectStore` and expires the silent ones."""

    def __init__(self, store: ObjectStore, *, client_ttl: float = 10.0,
                 put_timeout: float = 30.0) -> None:
        if client_ttl <= 0 or put_timeout <= 0:
            raise ValueError("client_ttl and put_timeout must be positive")
        self.store = store
        self.client_ttl = client_ttl
        self.put_timeout = put_timeout
        self.clients: dict[str, _Client] = {}
        self.expired_clients = 0

    def __len__(self) -> int:
        return len(self.clients)

    def ping(self, client_id: str) -> bool:
        """Refresh ``client_id``; False if it is unknown (never mounted, expired, or a new
        leader) - and it stays unknown until it mounts (see the module docstring)."""
        client = self.clients.get(client_id)
        if client is None:
            return False
        client.last_seen = self.store.clock()
        return True

    def mounted(self, client_id: str, segment: str) -> None:
        now = self.store.clock()
        client = self.clients.get(client_id)
        if client is None:
            client = self.clients[client_id] = _Client(now)
        client.last_seen = now
        client.segments.add(segment)

    def unmounted(self, client_id: str, segment: str) -> None:
        client = self.clients.get(client_id)
        if client is not None:
            client.segments.discard(segment)

    def sweep(self) -> SweepResult:
        """Expire silent clients and reclaim stale puts; run it every ``ttl / 4`` or so."""
        store = self.store
        now = store.clock()
        deadline = now - self.client_ttl
        dead = [cid for cid, c in self.clients.items() if c.last_seen < deadline]
        lost = 0
        for cid in dead:
            client = self.clients.pop(cid)
            for name in sorted(client.segments):
                if store.segments.get(name) is not None:
                    lost += store.unmount(name)
            logger.warning("client %r silent for over %.1fs: declared dead, %d segment(s) "
                           "unmounted", cid, self.client_ttl, len(client.segments))
        self.expired_clients += len(dead)
        reclaimed = store.reclaim_stale_puts(self.put_timeout, now)
        store.reservations.expire(now)
        if reclaimed:
            logger.warning("reclaimed %d puts not ended within %.1fs", reclaimed, self.put_timeout)
        return SweepResult(dead, lost, reclaimed)
