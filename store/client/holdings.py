"""What a contributed segment holds, so its owner can remount it with its objects after failover.

Why the holder needs to know: a new master leader (or a restarted master) starts empty and
rebuilds object metadata from the clients' remounts (see :mod:`store.master.ha`). Writers tell the
holder what they wrote with a transfer-engine notification, sent in the background in batches
after ``put_end`` (never on the put's critical path). A notification is a msgpack list of
``[key, address, size]`` decoded into a typed structure, bounded by the engine's notification
limit and checked against the segment's range; a newer object overlapping an older one replaces it
(its space was freed and reused). Removals are not announced: after a failover a removed object
whose space was not reused reappears, which is a cache's acceptable failure mode.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import defaultdict
from typing import Any

import msgspec

from store.keys import MAX_KEY_BYTES
from store.master import MasterClient, RemountObject, SegmentDesc
from store.master.messages import MountSegmentReply, MountSegmentRequest
from transfer.control import MAX_NOTIFY_SIZE

__all__ = ["Holdings", "Announcer", "NOTIFY_PREFIX", "remount", "take_announcements"]

logger = logging.getLogger(__name__)

NOTIFY_PREFIX = b"mcstore1"
_decoder = msgspec.msgpack.Decoder(list[RemountObject])
_encoder = msgspec.msgpack.Encoder()
_MAX_PER_MESSAGE = (MAX_NOTIFY_SIZE - 64) // (MAX_KEY_BYTES + 24)


def take_announcements(engine: Any) -> list[bytes]:
    """Take the store's announcements from ``engine``'s notifications, leaving the others queued
    for their own consumers (a KV connector's transfer-done messages, say)."""
    return [n.message for n in engine.notifications(NOTIFY_PREFIX)]


class Holdings:
    """Objects stored in one segment ``[base, base + size)``, keyed by address."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self._starts: list[int] = []
        self._objects: dict[int, RemountObject] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def add(self, obj: RemountObject) -> bool:
        """Record ``obj``; drops older overlapping records. False if it lies outside the segment."""
        if obj.size <= 0 or obj.address < self.base or obj.address + obj.size > self.base + self.size:
            return False
        starts = self._starts
        i = bisect.bisect_left(starts, obj.address)
        if i > 0:
            prev = self._objects[starts[i - 1]]
            if prev.address + prev.size > obj.address:
                i -= 1
        end = obj.address + obj.size
        while i < len(starts) and starts[i] < end:
            del self._objects[starts[i]]
            del starts[i]
        starts.insert(i, obj.address)
        self._objects[obj.address] = obj
        return True

    def discard(self, address: int) -> None:
        """Forget the object starting at ``address`` (it moved to another tier)."""
        if self._objects.pop(address, None) is not None:
            del self._starts[bisect.bisect_left(self._starts, address)]

    def add_object(self, key: str, address: int, size: int) -> bool:
        return self.add(RemountObject(key, address, size))

    def handle(self, message: bytes) -> int:
        """Apply one announcement; returns objects recorded. Malformed input is logged, not raised."""
        try:
            objects = _decoder.decode(message[len(NOTIFY_PREFIX):])
        except msgspec.DecodeError as e:
            logger.warning("ignoring malformed store announcement: %s", e)
            return 0
        n = 0
        for obj in objects:
            key_len = len(obj.key.encode("utf-8"))
            if 0 < key_len <= MAX_KEY_BYTES and self.add(obj):
                n += 1
        return n

    def objects(self) -> list[RemountObject]:
        return list(self._objects.values())


async def remount(master: MasterClient, desc: SegmentDesc, holdings: Holdings) -> int:
    """Mount ``desc`` again reporting what it holds; forget the copies the master refused
    (another version of the key may exist). Returns how many objects were rebuilt."""
    reply = await master.call("mount_segment",
                              MountSegmentRequest(segment=desc, objects=holdings.objects()),
                              MountSegmentReply)
    for address in reply.discarded:
        holdings.discard(address)
    return reply.rebuilt_objects


class Announcer:
    """Batches "I wrote key K at A" messages per holder segment and sends them in the background."""

    def __init__(self, notify: object, interval: float = 0.05) -> None:
        self._notify = notify  # Engine.notify(segment, message)
        self._interval = interval
        self._pending: dict[str, list[RemountObject]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, segment: str, key: str, address: int, size: int) -> None:
        self._pending[segment].append(RemountObject(key, address, size))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, defaultdict(list)
        for segment, objects in pending.items():
            for i in range(0, len(objects), _MAX_PER_MESSAGE):
                chunk = objects[i:i + _MAX_PER_MESSAGE]
                try:
                    await self._notify(segment, NOTIFY_PREFIX + _encoder.encode(chunk))  # type: ignore[operator]
                except Exception as e:  # the holder may be gone: only failover rebuild suffers
                    logger.debug("announcement to %s failed: %s", segment, e)
                    break

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
