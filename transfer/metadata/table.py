"""An in-memory, versioned key/value table with TTLs: the state behind the HTTP metadata server
and the local entries of the P2P backend.

It is synchronous on purpose: every operation, compare-and-set included, runs without awaiting,
so on one event loop it is atomic without locks. Versions come from one table-wide counter (like
etcd's revision), so a key deleted and re-created never gets an old version back.
"""
from __future__ import annotations

import enum
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Entry", "Outcome", "TableFullError", "VersionedTable"]


@dataclass(slots=True)
class Entry:
    """One stored value. ``expires_at`` is on the table's clock (monotonic seconds)."""

    value: bytes
    version: int
    expires_at: float | None = None


class Outcome(enum.Enum):
    """Result of a conditional delete or a TTL refresh."""

    OK = "ok"
    MISSING = "missing"
    CONFLICT = "conflict"


class TableFullError(Exception):
    """Storing the value would exceed the table's entry or byte budget."""


class VersionedTable:
    """Versioned dict with compare-and-set, TTL expiry and a memory budget.

    Expired entries vanish on access (so readers never see them) and are purged by
    :meth:`sweep`, which the owner calls periodically so memory does not grow with dead keys.
    """

    def __init__(
        self,
        *,
        max_entries: int = 1_000_000,
        max_total_bytes: int = 1 << 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: dict[str, Entry] = {}
        self._revision = 0
        self._bytes = 0
        self._max_entries = max_entries
        self._max_total_bytes = max_total_bytes
        self._clock = clock
        # (expires_at, version, key); stale rows (touched or rewritten keys) are skipped.
        self._expiry_heap: list[tuple[float, int, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        """Bytes held by keys and values (UTF-8 key length + value length)."""
        return self._bytes

    @property
    def revision(self) -> int:
        """Version given to the most recent write."""
        return self._revision

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None and self._expired(entry):
            self._remove(key, entry)
            return None
        return entry

    def put(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Store unconditionally; returns the new version."""
        return self._write(key, value, ttl, self.get(key))

    def compare_and_set(
        self, key: str, value: bytes, expected: int | None, *, ttl: float | None = None
    ) -> int | None:
        """Store only if ``key`` is at version ``expected`` (``None``: absent).

        Returns the new version, or ``None`` when the precondition failed.
        """
        current = self.get(key)
        current_version = None if current is None else current.version
        if current_version != expected:
            return None
        return self._write(key, value, ttl, current)

    def delete(self, key: str, expected: int | None = None) -> Outcome:
        """Remove ``key``; with ``expected``, only if it is still at that version."""
        entry = self.get(key)
        if entry is None:
            return Outcome.MISSING
        if expected is not None and entry.version != expected:
            return Outcome.CONFLICT
        self._remove(key, entry)
        self._revision += 1
        return Outcome.OK

    def touch(self, key: str, ttl: float, expected: int) -> Outcome:
        """Push the expiry of ``key`` to now + ``ttl`` if it is still at version ``expected``.

        The version is unchanged: a keep-alive is not a write, and readers caching the value
        must not be told it changed.
        """
        entry = self.get(key)
        if entry is None:
            return Outcome.MISSING
        if entry.version != expected:
            return Outcome.CONFLICT
        entry.expires_at = self._clock() + ttl
        heapq.heappush(self._expiry_heap, (entry.expires_at, entry.version, key))
        return Outcome.OK

    def items(self, prefix: str = "") -> list[tuple[str, Entry]]:
        """Live entries whose key starts with ``prefix``, sorted by key."""
        now = self._clock()
        found = [
            (key, entry)
            for key, entry in self._entries.items()
            if key.startswith(prefix) and (entry.expires_at is None or entry.expires_at > now)
        ]
        found.sort(key=lambda item: item[0])
        return found

    def sweep(self) -> int:
        """Drop every expired entry; returns how many were dropped."""
        now = self._clock()
        dropped = 0
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            _, version, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.version == version and self._expired(entry, now):
                self._remove(key, entry)
                dropped += 1
        return dropped

    def _write(self, key: str, value: bytes, ttl: float | None, current: Entry | None) -> int:
        delta = len(value) - (0 if current is None else len(current.value))
        if current is None:
            delta += len(key.encode("utf-8"))
            if len(self._entries) >= self._max_entries:
                raise TableFullError(f"metadata table is full ({self._max_entries} entries)")
        if self._bytes + delta > self._max_total_bytes:
            raise TableFullError(
                f"metadata table is full ({self._bytes} of {self._max_total_bytes} bytes used)"
            )
        self._revision += 1
        expires_at = None if ttl is None else self._clock() + ttl
        self._entries[key] = Entry(value, self._revision, expires_at)
        self._bytes += delta
        if expires_at is not None:
            heapq.heappush(self._expiry_heap, (expires_at, self._revision, key))
        return self._revision

    def _remove(self, key: str, entry: Entry) -> None:
        del self._entries[key]
        self._bytes -= len(entry.value) + len(key.encode("utf-8"))

    def _expired(self, entry: Entry, now: float | None = None) -> bool:
        if entry.expires_at is None:
            return False
        return entry.expires_at <= (self._clock() if now is None else now)
