"""Background keep-alive for keys written with a TTL.

A descriptor written with ``ttl`` must outlive its writer by at most ``ttl`` seconds, yet stay
put for as long as the writer lives. So each such key gets a task that refreshes it every
``ttl / 3`` seconds (two missed refreshes are tolerated). What "refresh" means is the backend's
business (an etcd lease keep-alive, an HTTP ``PATCH``); this module only schedules, retries on
transient errors and stops when the backend says the key is no longer ours.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from transfer.metadata.base import MetadataUnavailableError

__all__ = ["KeepAlive", "refresh_interval"]

logger = logging.getLogger(__name__)

#: Returns False when the key is no longer ours (rewritten by someone else): stop refreshing.
RefreshFn = Callable[[], Awaitable[bool]]


def refresh_interval(ttl: float) -> float:
    """How often to refresh a key with this TTL."""
    return max(ttl / 3.0, 0.05)


class KeepAlive:
    """One refresh task per held key; the owner store calls :meth:`hold` and :meth:`release`."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def __contains__(self, key: str) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def keys(self) -> list[str]:
        return list(self._tasks)

    async def hold(self, key: str, ttl: float, refresh: RefreshFn) -> None:
        """Start refreshing ``key`` (replacing any earlier holder of the same key)."""
        if self._closed:
            raise RuntimeError(f"{self._owner} is closed")
        await self.release(key)
        self._tasks[key] = asyncio.create_task(
            self._run(key, refresh_interval(ttl), refresh), name=f"metadata-keepalive:{key}"
        )

    async def release(self, key: str) -> bool:
        """Stop refreshing ``key``; waits until no refresh is in flight. ``True`` if held."""
        task = self._tasks.pop(key, None)
        if task is None:
            return False
        if task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return True

    async def close(self) -> list[str]:
        """Stop every refresh; returns the keys that were held."""
        self._closed = True
        keys = list(self._tasks)
        for key in keys:
            await self.release(key)
        return keys

    async def _run(self, key: str, interval: float, refresh: RefreshFn) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                still_ours = await refresh()
            except MetadataUnavailableError as e:
                # The key survives up to ttl without us; keep trying, it may come back.
                logger.warning("%s: keep-alive of %r failed, will retry: %s", self._owner, key, e)
                continue
            except Exception:
                logger.exception("%s: keep-alive of %r failed", self._owner, key)
                continue
            if not still_ours:
                logger.warning("%s: %r was taken over by another writer; no longer kept alive",
                               self._owner, key)
                if self._tasks.get(key) is asyncio.current_task():
                    del self._tasks[key]
                return
