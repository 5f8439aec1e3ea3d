"""Cache of peers' segment descriptors, so a transfer does not pay a metadata lookup.

Mooncake caches descriptors forever and refreshes them on demand; a peer that restarts comes
back with new buffers, so its old descriptor must not outlive it for long. Hence two ways out
of the cache: entries age out after ``ttl``, and the engine calls :meth:`DescriptorCache.invalidate`
the moment a connection to the peer fails, so the next lookup reads the fresh descriptor.

Loads are single-flight: when a popular peer's entry expires, a hundred concurrent transfers
cause one metadata request, not a hundred.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["DescriptorCache"]

T = TypeVar("T")


class DescriptorCache(Generic[T]):
    """TTL + LRU cache in front of ``loader(name)``; ``None`` results are never cached.

    ``T`` is whatever the engine makes of the raw bytes (a decoded descriptor), so decoding is
    paid once per load too.
    """

    def __init__(
        self,
        loader: Callable[[str], Awaitable[T | None]],
        *,
        ttl: float = 30.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_entries <= 0:
            raise ValueError("ttl and max_entries must be positive")
        self._loader = loader
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[T | None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return self.peek(name) is not None

    def peek(self, name: str) -> T | None:
        """The cached, unexpired value for ``name``, without loading anything."""
        item = self._entries.get(name)
        if item is None:
            return None
        expires_at, value = item
        if expires_at <= self._clock():
            del self._entries[name]
            return None
        self._entries.move_to_end(name)
        return value

    def lookup(self, name: str) -> T | None:
        """Like :meth:`peek` but mutates nothing, so any thread may call it (the blocking
        small-transfer path validates on the caller's thread, off the loop)."""
        item = self._entries.get(name)
        if item is None or item[0] <= self._clock():
            return None
        return item[1]

    async def get(self, name: str, *, refresh: bool = False) -> T | None:
        """The value for ``name``: from the cache, else loaded (once, however many ask).

        ``refresh=True`` skips the cache (Mooncake's ``force_update``). Loader errors reach
        every waiter and leave nothing cached.
        """
        if not refresh:
            value = self.peek(name)
            if value is not None:
                return value
        task = self._inflight.get(name)
        if task is None or refresh:
            if refresh:
                self._entries.pop(name, None)
            task = asyncio.create_task(self._load(name), name=f"descriptor-load:{name}")
            task.add_done_callback(_consume_exception)
            self._inflight[name] = task
        # Shielded: one caller giving up must not cancel the load the others wait for.
        return await asyncio.shield(task)

    def invalidate(self, name: str) -> bool:
        """Forget ``name`` (e.g. the connection to it failed); ``True`` if anything was dropped.

        A load already in flight is disowned: its result will not be cached, and the next
        :meth:`get` starts a fresh one.
        """
        had_entry = self._entries.pop(name, None) is not None
        had_load = self._inflight.pop(name, None) is not None
        return had_entry or had_load

    def clear(self) -> None:
        """Forget everything (e.g. the metadata server changed)."""
        self._entries.clear()
        self._inflight.clear()

    async def _load(self, name: str) -> T | None:
        me = asyncio.current_task()
        try:
            value = await self._loader(name)
        finally:
            if self._inflight.get(name) is me:
                del self._inflight[name]
                owned = True
            else:
                owned = False  # invalidated or superseded while loading
        if value is not None and owned:
            self._entries[name] = (self._clock() + self._ttl, value)
            self._entries.move_to_end(name)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return value


def _consume_exception(task: asyncio.Task[object]) -> None:
    # Every waiter may have been cancelled; mark the error retrieved to avoid asyncio's warning.
    if not task.cancelled():
        task.exception()
