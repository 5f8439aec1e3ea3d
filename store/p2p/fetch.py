"""The parallel chunk fetcher behind :meth:`P2PStore.get`.

Every holder of an object is a source. Chunks are handed out one at a time to the live source
with the fewest chunks in flight (at most ``per_source`` each), so a fast peer ends up serving
more than a slow one without any bandwidth estimate. Each landed chunk is hashed against the
record's checksum on a worker thread; a mismatch (corrupt or truncated data) puts the chunk back
with that source excluded for it, and a source that fails a transfer (dead, unreachable, or its
buffer gone) is dropped for the rest of the get. Holders that joined after the get started are
picked up by a periodic re-read of the record, so slow getters fetch from fast ones. The get
fails with :class:`NoSourceError` - naming every source and why it was dropped - only when a
chunk has no source left.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from store.p2p.chunks import ObjectView, split_ranges
from store.p2p.records import Extent, Holder, ObjectRecord
from transfer.batch import TransferRequest
from transfer.engine import Engine
from transfer.errors import TransferError
from transfer.metadata import MetadataError
from transfer.transports.base import Opcode

__all__ = ["ChunkFetcher", "NoSourceError", "SourceStats"]

logger = logging.getLogger(__name__)

#: ``progress(done_bytes, total_bytes)``, called on the event loop after every verified chunk.
ProgressFn = Callable[[int, int], None]
#: Re-reads the record's live holders and the partial copies of other getters (this node
#: excluded): ``(holders, [(holder, have_bitmap)])``.
RefreshFn = Callable[[], Awaitable[tuple[list[Holder], list[tuple[Holder, bytes]]]]]
#: Publishes this getter's own bitmap of verified chunks.
PublishFn = Callable[[bytes], Awaitable[None]]


class NoSourceError(RuntimeError):
    """A chunk of the object could not be fetched from any holder."""


@dataclass
class SourceStats:
    """What one source contributed to a get (the per-source counters of a get's result)."""

    bytes: int = 0
    chunks: int = 0
    failures: int = 0
    corrupt: int = 0
    dropped: str | None = None


@dataclass
class _Source:
    holder: Holder
    stats: SourceStats = field(default_factory=SourceStats)
    inflight: int = 0
    have: bytes | None = None  # None: a full holder; else the chunks a partial copy has

    def has(self, chunk: int) -> bool:
        return self.have is None or bool(self.have[chunk >> 3] >> (chunk & 7) & 1)

    @property
    def live(self) -> bool:
        return self.stats.dropped is None


class ChunkFetcher:
    """Fetch every chunk of ``record`` into ``dest`` (registered with ``engine``) and verify it."""

    def __init__(self, engine: Engine, record: ObjectRecord, dest: list[Extent],
                 view: ObjectView, holders: list[Holder], *, refresh: RefreshFn | None = None,
                 per_source: int = 2, max_inflight: int = 16, timeout: float = 60.0,
                 refresh_interval: float = 0.5, max_corrupt: int = 2,
                 progress: ProgressFn | None = None, publish: PublishFn | None = None
                 ) -> None:
        if per_source < 1 or max_inflight < 1:
            raise ValueError("per_source and max_inflight must be >= 1")
        self._engine = engine
        self._record = record
        self._dest = dest
        self._view = view
        self._sources: dict[str, _Source] = {h.segment: _Source(h) for h in holders}
        self._refresh = refresh
        self._per_source = per_source
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._refresh_interval = refresh_interval
        self._max_corrupt = max_corrupt
        self._progress = progress
        self._publish = publish
        self._have = bytearray((record.num_chunks + 7) // 8)
        self._published = 0
        self._excluded: dict[int, set[str]] = {}
        self._last_refresh = time.monotonic()
        self.refetches = 0

    @property
    def stats(self) -> dict[str, SourceStats]:
        return {name: s.stats for name, s in self._sources.items()}

    async def run(self) -> dict[str, SourceStats]:
        """Fetch everything; raises :class:`NoSourceError` when a chunk has no source left."""
        record = self._record
        # A random order per getter (as BitTorrent does): concurrent getters then hold different
        # chunks early and can serve them to each other instead of all waiting on the origin.
        order = list(range(record.num_chunks))
        random.shuffle(order)
        pending: deque[int] = deque(order)
        running: dict[asyncio.Task[bool], tuple[int, _Source]] = {}
        done_bytes = 0
        try:
            while pending or running:
                if time.monotonic() - self._last_refresh >= self._refresh_interval:
                    await self._refresh_sources()
                    await self._publish_progress()
                self._assign(pending, running)
                if not running:
                    await self._refresh_sources()  # last chance: a new replica may have appeared
                    self._assign(pending, running)
                    if not running:
                        raise NoSourceError(self._no_source_message(pending[0]))
                finished, _ = await asyncio.wait(running, timeout=self._refresh_interval,
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    chunk, src = running.pop(task)
                    src.inflight -= 1
                    if self._settle(task, chunk, src):
                        done_bytes += record.chunk(chunk)[1]
                        self._have[chunk >> 3] |= 1 << (chunk & 7)
                        if self._progress is not None:
                            self._progress(done_bytes, record.size)
                    else:
                        self.refetches += 1
                        pending.appendleft(chunk)
        finally:
            for task in running:
                task.cancel()
            for task in running:
                with contextlib.suppress(BaseException):
                    await task
        return self.stats

    def _assign(self, pending: deque[int], running: dict[asyncio.Task[bool],
                                                         tuple[int, _Source]]) -> None:
        for _ in range(len(pending)):
            if len(running) >= self._max_inflight:
                return
            if not any(s.live and s.inflight < self._per_source for s in self._sources.values()):
                return
            chunk = pending.popleft()
            src = self._pick(chunk)
            if src is None:
                pending.append(chunk)
                continue
            src.inflight += 1
            running[asyncio.create_task(self._fetch(chunk, src))] = (chunk, src)

    def _pick(self, chunk: int) -> _Source | None:
        excluded = self._excluded.get(chunk, ())
        best: _Source | None = None
        for name, s in self._sources.items():
            if (not s.live or s.inflight >= self._per_source or name in excluded
                    or not s.has(chunk)):
                continue
            # Least loaded first; among equals the one that has served least (spreads the load
            # over every holder instead of always starting with the origin).
            if best is None or (s.inflight, s.stats.bytes) < (best.inflight, best.stats.bytes):
                best = s
        return best

    async def _fetch(self, chunk: int, src: _Source) -> bool:
        offset, length = self._record.chunk(chunk)
        requests = [TransferRequest(Opcode.READ, dst, src.holder.segment, s, n)
                    for s, dst, n in split_ranges(src.holder.extents, self._dest, offset, length)]
        await self._engine.transfer(requests, timeout=self._timeout)
        got = await asyncio.to_thread(self._view.digest, offset, length)
        return got == self._record.checksums[chunk]

    def _settle(self, task: asyncio.Task[bool], chunk: int, src: _Source) -> bool:
        """Account a finished chunk; True if it landed intact."""
        name = src.holder.segment
        try:
            ok = task.result()
        except (TransferError, MetadataError, OSError, TimeoutError, ValueError) as e:
            src.stats.failures += 1
            if src.live:
                src.stats.dropped = f"transfer failed: {e}"
                logger.warning("dropping source %s for %s: %s", name, self._record.name, e)
            return False
        if not ok:
            src.stats.corrupt += 1
            self._excluded.setdefault(chunk, set()).add(name)
            logger.warning("chunk %d of %s from %s failed its checksum; refetching", chunk,
                           self._record.name, name)
            if src.stats.corrupt >= self._max_corrupt and src.live:
                src.stats.dropped = f"{src.stats.corrupt} chunks failed their checksum"
            return False
        src.stats.bytes += self._record.chunk(chunk)[1]
        src.stats.chunks += 1
        self._excluded.pop(chunk, None)
        return True

    async def _refresh_sources(self) -> None:
        self._last_refresh = time.monotonic()
        if self._refresh is None:
            return
        try:
            holders, partials = await self._refresh()
        except (MetadataError, OSError, ValueError) as e:
            logger.warning("cannot re-read the holders of %s: %s", self._record.name, e)
            return
        for h in holders:
            src = self._sources.get(h.segment)
            if src is None:
                self._sources[h.segment] = _Source(h)
            elif src.have is not None and src.holder.extents == h.extents:
                src.have = None  # a partial copy completed
        for h, have in partials:
            src = self._sources.get(h.segment)
            if src is None:
                self._sources[h.segment] = _Source(h, have=have)
            elif src.have is not None and src.holder.extents == h.extents:
                src.have = have

    async def _publish_progress(self) -> None:
        done = sum(bin(b).count("1") for b in self._have)
        if self._publish is None or done == self._published:
            return
        try:
            await self._publish(bytes(self._have))
            self._published = done
        except (MetadataError, OSError, ValueError) as e:
            logger.warning("cannot publish progress of %s: %s", self._record.name, e)

    def _no_source_message(self, chunk: int) -> str:
        offset, length = self._record.chunk(chunk)
        why = "; ".join(
            f"{n}: {s.stats.dropped or ('bad checksum for this chunk' if n in self._excluded.get(chunk, ()) else 'busy')}"  # noqa: E501
            for n, s in self._sources.items()) or "the object has no holders"
        return (f"no source left for chunk {chunk} (bytes {offset}+{length}) of "
                f"{self._record.name!r}: {why}")
