"""The writer's side of space reserved ahead (see :mod:`store.master.reservations`).

A thread putting plain objects on the caller-thread path holds at most one reservation: an
allocation on a memory segment whose front is where its next object goes. Placing an object is
then local (no master call); only its commit goes to the master. The thread owns the
reservation alone, so objects are cut from it front first, in order, as the master requires.

The reservation is written into only while it is certainly still this client's: until half its
stated lifetime has passed since the request was *sent* (the master counts the whole lifetime
from when it *answered*), never after a commit from it was refused, and never once the write
into it failed. Any of those drops it; the next put asks for a new one and hands the rest of
the old one back in the same call.
"""
from __future__ import annotations

import time

from store.master import ReplicaDesc, ReplicateConfig
from store.master.messages import TIER_MEMORY, ReserveReply

__all__ = ["Held", "MAX_RESERVED_OBJECT", "eligible"]

MAX_RESERVED_OBJECT = 64 << 20
"""Larger objects keep the two-phase put: the saved round trip is noise next to their write."""


def eligible(config: ReplicateConfig) -> bool:
    """Whether a put with ``config`` may come from reserved space: one replica wherever the
    space is (pins are fine, they travel with the commit)."""
    return (config.replica_num == 1 and not config.preferred_segment
            and not config.preferred_segments and not config.prefer_alloc_in_same_node)


class Held:
    """One reservation held by one thread."""

    __slots__ = ("id", "segment", "front", "end", "alignment", "usable_until")

    def __init__(self, reply: ReserveReply, sent_at: float) -> None:
        self.id = reply.reservation
        self.segment = reply.segment
        self.front = reply.address
        self.end = reply.address + reply.size
        self.alignment = max(1, reply.alignment)
        self.usable_until = sent_at + reply.ttl_ms / 2000.0

    def take(self, size: int) -> ReplicaDesc | None:
        """Where an object of ``size`` bytes goes, or ``None`` if it does not fit any more (or
        the reservation is too old to write into)."""
        if self.front + self._round(size) > self.end or time.monotonic() >= self.usable_until:
            return None
        return ReplicaDesc(self.segment, self.front, size, TIER_MEMORY)

    def advance(self, size: int) -> None:
        """The object at the front was committed: the next one goes after it."""
        self.front += self._round(size)

    def _round(self, size: int) -> int:
        a = self.alignment
        return (size + a - 1) // a * a
