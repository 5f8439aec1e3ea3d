"""The async store client: puts and gets of objects through the master and the transfer engine.

Data never passes through the master: a put asks it where to write (``batch_put_start``), writes
every replica through the transfer engine in one transfer batch, then publishes
(``batch_put_end``) or gives the space back (``batch_put_revoke``). A get asks where the complete
replicas are (or reuses locations cached under their lease, see :mod:`.locations`), reads the
nearest one and, if that read fails, the next. Replicas in this client's own segment are copied
with ``memmove`` instead of going through a transport.

Two modes. *Embedded*: ``global_segment_size > 0`` - this process contributes shared-memory-backed
DRAM to the pool and serves it; **its objects vanish with the process**. *Client only*:
``global_segment_size == 0`` - the memory lives in long-lived store nodes (:mod:`store.node`) and
this process only has its ``local_buffer_size`` staging buffer, so the cache outlives it.

Everything here runs on the engine's event loop; :class:`~store.client.sync.StoreClient` is the
blocking facade for threads (vLLM workers).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from store.keys import validate_key
from store.master import MasterClient, ReplicaDesc, ReplicateConfig, SegmentDesc
from store.master.allocator import OffsetAllocator, OutOfSpace
from store.master.tenants import master_credentials
from transfer.config import MooncakeConfig
from transfer.engine import Engine
from transfer.errors import AddressError
from transfer.memory import memory_at

from .errors import (BUFFER_NOT_REGISTERED, CHECKSUM_MISMATCH, TRANSFER_FAIL, MasterErrorCode,
                     StoreError, as_store_error)
from .demote import serve_demotions
from .holdings import Announcer, Holdings, remount, take_announcements
from .integrity import TRAILER_SIZE, check_trailer, make_trailer
from .locations import LocationCache, order_replicas
from .prefault import Prefaulter
from .replicate import check_segment, replicate
from .transfers import Piece, move

__all__ = ["AsyncStoreClient", "Piece"]

logger = logging.getLogger(__name__)
_DEFAULT = ReplicateConfig()


class AsyncStoreClient:
    """One store client on one transfer engine; see the module docstring."""

    def __init__(self, engine: Engine, config: MooncakeConfig | None = None, *,
                 global_segment_size: int | None = None, local_buffer_size: int | None = None,
                 master_address: str | None = None, etcd_endpoints: Sequence[str] | None = None,
                 checksum: bool = False, heartbeat_interval: float | None = None,
                 location_cache_size: int = 65536, transfer_timeout: float = 60.0,
                 retry_timeout: float | None = None) -> None:
        cfg = config if config is not None else engine.config
        self.engine = engine
        self.config = cfg
        self.global_segment_size = (cfg.global_segment_size if global_segment_size is None
                                    else global_segment_size)
        self.local_buffer_size = (cfg.local_buffer_size if local_buffer_size is None
                                  else local_buffer_size)
        if etcd_endpoints is None and cfg.master.enable_ha:
            etcd_endpoints = cfg.etcd.endpoints
        self.master = MasterClient(None if etcd_endpoints else
                                   (master_address or cfg.master_server_address),
                                   etcd_endpoints=etcd_endpoints or None,
                                   **master_credentials(cfg),
                                   timeout=cfg.rpc.request_timeout,
                                   retry_timeout=(cfg.rpc.retry_timeout if retry_timeout is None
                                                  else retry_timeout),
                                   connect_timeout=cfg.rpc.connect_timeout)
        self.client_id = uuid.uuid4().hex
        self.checksum = checksum
        self.heartbeat_interval = (heartbeat_interval if heartbeat_interval is not None
                                   else max(0.1, cfg.master.client_ttl / 4))
        self.transfer_timeout = transfer_timeout
        self.locations = LocationCache(location_cache_size)
        self.segments: list[SegmentDesc] = []
        self.holdings: dict[str, Holdings] = {}
        self._local_segments: frozenset[str] = frozenset()
        self._host = ""
        self._staging_alloc: OffsetAllocator | None = None
        self._staging_base = 0
        self._buffers: list[Any] = []
        self._announcer: Announcer | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._prefault: Prefaulter | None = None
        self.direct_puts: collections.deque[tuple[str, list[tuple[str, int, int]]]] = (
            collections.deque())
        """``(key, [(segment, address, size)])`` of puts done on caller threads (:mod:`.direct`),
        appended there without waking the loop; applied on the next heartbeat tick."""
        self._offload = False
        """The master's SSD tier is on (from ping): poll for demotions of our memory."""
        self._started = False
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> AsyncStoreClient:
        """Allocate the staging buffer, contribute the segment (if any), start heartbeats."""
        if self._started:
            raise RuntimeError("store client already started")
        engine = self.engine
        self._host = engine.name.rpartition(":")[0].strip("[]")
        staging = await engine.allocate_shared(self.local_buffer_size)
        self._buffers.append(staging)
        self._staging_base = staging.address
        self._staging_alloc = OffsetAllocator(self.local_buffer_size, alignment=64)
        self._announcer = Announcer(engine.notify)
        self._started = True
        try:
            if self.global_segment_size > 0:
                seg = await engine.allocate_shared(self.global_segment_size)
                self._buffers.append(seg)
                # Fault the pages in now, not on each put's critical path (see .prefault).
                self._prefault = Prefaulter(seg.address, self.global_segment_size).start()
                await self.mount(SegmentDesc(name=engine.name, base=seg.address,
                                             size=self.global_segment_size,
                                             client_id=self.client_id, host_id=self._host))
        except BaseException:
            await self.close()
            raise
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        return self

    async def prefaulted(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout`` s) until the contributed memory's pages are faulted in
        (see :mod:`.prefault`): a long-lived node does before it reports ready, so no put pays
        the first touch. Population goes on in the background after a timeout."""
        if self._prefault is None:
            return True
        return await asyncio.to_thread(self._prefault.done.wait, timeout)

    async def mount(self, desc: SegmentDesc) -> None:
        """Contribute a registered range (memory, or a file segment for the SSD tier)."""
        try:
            await self.master.mount_segment(desc)
        except Exception as e:
            raise as_store_error(e) from None
        self.segments.append(desc)
        self.holdings[desc.name] = Holdings(desc.base, desc.size)
        self._local_segments = frozenset(s.name for s in self.segments
                                         if s.name == self.engine.name)

    async def close(self) -> None:
        """Unmount contributed segments (their objects are lost), stop heartbeats. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._heartbeat
        self._record_direct_puts()
        if self._announcer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._announcer.flush(), 2.0)
            await self._announcer.close()
        for desc in self.segments:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.master.unmount_segment(self.client_id, desc.name), 5.0)
        await self.master.close()
        if self._prefault is not None:
            await asyncio.to_thread(self._prefault.stop)
        for buf in self._buffers:
            with contextlib.suppress(Exception):
                await self.engine.free_shared(buf)
        self._buffers.clear()

    async def _heartbeat_loop(self) -> None:
        """Drain write announcements often; ping the master every ``heartbeat_interval``; while
        the master's SSD tier is on, copy objects it demotes out of our memory every tick."""
        tick = min(0.2, self.heartbeat_interval)
        loop = asyncio.get_running_loop()
        next_ping = loop.time()
        while True:
            await asyncio.sleep(tick)
            self._record_direct_puts()
            self._drain_announcements()
            if not self.segments:
                continue
            if self._offload:
                try:
                    await serve_demotions(self)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    logger.warning("serving demotions failed: %s", e)
            if loop.time() < next_ping:
                continue
            next_ping = loop.time() + self.heartbeat_interval
            try:
                reply = await self.master.ping(self.client_id)
                self._offload = reply.offload and any(s.tier == "memory" for s in self.segments)
                if not reply.known:
                    await self._remount()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("store heartbeat failed: %s", e)

    def _record_direct_puts(self) -> None:
        """The bookkeeping ``put_pieces`` does after a put, for caller-thread puts: a loop
        wake-up per put would cost the caller's thread the GIL on a 2-core box."""
        records = self.direct_puts
        while records:
            self._record_put(*records.popleft())

    def _record_put(self, key: str, replicas: Sequence[tuple[str, int, int]]) -> None:
        """After a put was published: our own segments' holdings learn the object, other
        holders are told they now hold it (``(segment, address, size)`` per replica)."""
        for segment, address, size in replicas:
            if segment in self._local_segments:
                self.holdings[segment].add_object(key, address, size)
            elif self._announcer is not None:
                self._announcer.add(segment, key, address, size)

    def _drain_announcements(self) -> None:
        """Apply writers' announcements to our holdings. Only a client that holds a segment
        takes notifications at all, and it leaves other consumers' ones in the engine's queue."""
        holdings = self.holdings.get(self.engine.name)
        if holdings is None:
            return
        for message in take_announcements(self.engine):
            holdings.handle(message)

    async def _remount(self) -> None:
        """The master forgot us (restart, failover, or we were declared dead): mount again,
        reporting the objects each segment still holds so the master can rebuild them."""
        self._drain_announcements()
        self.locations.clear()
        for desc in self.segments:
            objects = self.holdings[desc.name].objects()
            try:
                rebuilt = await remount(self.master, desc, self.holdings[desc.name])
                logger.info("remounted %s with %d objects (%d rebuilt)", desc.name,
                            len(objects), rebuilt)
            except Exception as e:
                if getattr(e, "code", None) != MasterErrorCode.SEGMENT_ALREADY_EXISTS:
                    raise

    # -- staging ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def scratch(self, size: int) -> Any:
        """A registered scratch range of ``size`` bytes: staging if it fits, else a temporary
        registered buffer (slower: registering republishes the descriptor). Size 0 (no
        checksum trailers) allocates nothing."""
        assert self._staging_alloc is not None
        if size <= 0:
            yield self._staging_base
            return
        offset = -1
        if size <= self._staging_alloc.capacity - self._staging_alloc.used:
            try:
                offset = self._staging_alloc.allocate(max(size, 1))
            except (OutOfSpace, ValueError):
                offset = -1
        if offset >= 0:
            try:
                yield self._staging_base + offset
            finally:
                self._staging_alloc.free_range(offset)
            return
        buf = await self.engine.allocate_shared(max(size, 1))
        try:
            yield buf.address
        finally:
            await self.engine.free_shared(buf)

    def check_registered(self, pieces: Sequence[Piece]) -> None:
        for addr, length in pieces:
            try:
                self.engine.registry.find(addr, length)
            except AddressError as e:
                raise StoreError(BUFFER_NOT_REGISTERED,
                                 f"buffer 0x{addr:x}+{length} is not registered: {e}") from None

    def _gather(self, parts: Sequence[Piece]) -> memoryview | bytes:
        """The bytes of registered ``parts`` as the host can read them (CUDA parts copied)."""
        host = self.engine.registry.host_bytes
        if len(parts) == 1:
            return host(*parts[0])
        return b"".join(host(a, n) for a, n in parts)

    # -- puts ---------------------------------------------------------------------------------

    async def put_pieces(self, keys: Sequence[str], pieces: Sequence[Sequence[Piece]],
                         config: ReplicateConfig = _DEFAULT) -> list[StoreError | None]:
        """Put each object made of registered ``pieces``; one master call per phase and one
        transfer batch for all replicas. Returns ``None`` or the error per key."""
        self._check_open()
        n = len(keys)
        if len(pieces) != n:
            raise StoreError(MasterErrorCode.INVALID_PARAMS,
                             f"{n} keys but {len(pieces)} buffers")
        results: list[StoreError | None] = [None] * n
        sizes = [0] * n
        todo: list[int] = []
        for i, (key, parts) in enumerate(zip(keys, pieces)):
            err = _check_key(key)
            size = sum(p[1] for p in parts)
            if err is None and (size <= 0 or any(p[1] < 0 for p in parts)):
                err = StoreError(MasterErrorCode.INVALID_PARAMS,
                                 f"object {key!r} has size {size}; it must be positive")
            if err is None:
                try:
                    self.check_registered([p for p in parts if p[1] > 0])
                except StoreError as e:
                    err = e
            results[i] = err
            if err is None:
                sizes[i] = size + (TRAILER_SIZE if self.checksum else 0)
                todo.append(i)
        if not todo:
            return results
        async with self.scratch(TRAILER_SIZE * len(todo) if self.checksum else 0) as trailers:
            all_parts = [list(pieces[i]) for i in range(n)]
            if self.checksum:
                for j, i in enumerate(todo):
                    addr = trailers + j * TRAILER_SIZE
                    memory_at(addr, TRAILER_SIZE)[:] = make_trailer(self._gather(pieces[i]))
                    all_parts[i].append((addr, TRAILER_SIZE))
            try:
                items = await self.master.batch_put_start(
                    self.client_id, [keys[i] for i in todo], [sizes[i] for i in todo], config)
            except Exception as e:
                err = as_store_error(e)
                for i in todo:
                    results[i] = err
                return results
            writes: list[tuple[int, ReplicaDesc]] = []
            started: list[int] = []
            for i, item in zip(todo, items):
                if item.code:
                    results[i] = StoreError(item.code, f"put of {keys[i]!r} refused")
                    continue
                started.append(i)
                writes.extend((i, r) for r in item.replicas)
            failed = await move(self, "write", [(i, r, all_parts[i]) for i, r in writes])
            good = [i for i in started if i not in failed]
            bad = [i for i in started if i in failed]
            await self._finish_puts(keys, good, bad, failed, results)
        assert self._announcer is not None
        for i, r in writes:
            if results[i] is None:
                self._record_put(keys[i], [(r.segment, r.address, r.size)])
        return results

    async def put_bytes(self, keys: Sequence[str], values: Sequence[Sequence[Any]],
                        config: ReplicateConfig = _DEFAULT) -> list[StoreError | None]:
        """Put values given as sequences of bytes-like parts, staged in the local buffer."""
        views = [[memoryview(p).cast("B") for p in parts] for parts in values]
        sizes = [sum(v.nbytes for v in parts) for parts in views]
        total = sum((s + 63) & ~63 for s in sizes)
        async with self.scratch(total) as base:
            pieces, offset = [], base
            for parts, size in zip(views, sizes):
                pos = offset
                for v in parts:
                    memory_at(pos, v.nbytes)[:] = v
                    pos += v.nbytes
                pieces.append([(offset, size)] if size else [])
                offset += (size + 63) & ~63
            return await self.put_pieces(keys, pieces, config)

    async def _finish_puts(self, keys: Sequence[str], good: list[int], bad: list[int],
                           failed: dict[int, str], results: list[StoreError | None]) -> None:
        if bad:
            with contextlib.suppress(Exception):
                await self.master.batch_put_revoke(self.client_id, [keys[i] for i in bad])
            for i in bad:
                results[i] = StoreError(TRANSFER_FAIL,
                                        f"writing {keys[i]!r} failed: {failed[i]}")
        if good:
            try:
                codes = await self.master.batch_put_end(self.client_id, [keys[i] for i in good])
            except Exception as e:
                err = as_store_error(e)
                codes = [err.code] * len(good)
            for i, code in zip(good, codes):
                if code:
                    results[i] = StoreError(code, f"publishing {keys[i]!r} failed")

    # -- gets ---------------------------------------------------------------------------------

    async def replicas(self, keys: Sequence[str]) -> list[list[ReplicaDesc] | StoreError]:
        """Complete replicas per key, nearest first (cached under the lease, else one master
        call for all the misses)."""
        out: list[list[ReplicaDesc] | StoreError] = [[] for _ in keys]
        missing: list[int] = []
        for i, key in enumerate(keys):
            err = _check_key(key)
            if err is not None:
                out[i] = err
                continue
            cached = self.locations.get(key)
            if cached is None:
                missing.append(i)
            else:
                out[i] = cached
        if missing:
            try:
                reply = await self.master.batch_get_replica_list([keys[i] for i in missing])
            except Exception as e:
                err = as_store_error(e)
                for i in missing:
                    out[i] = err
                return out
            for i, item in zip(missing, reply.items):
                if item.code:
                    out[i] = StoreError(item.code, f"{keys[i]!r}: no readable replica")
                    continue
                ordered = order_replicas(item.replicas, self._local_segments, self._host)
                self.locations.put(keys[i], ordered, reply.lease_ttl_ms)
                out[i] = ordered
        return out

    def value_size(self, replica: ReplicaDesc) -> int:
        return replica.size - (TRAILER_SIZE if self.checksum else 0)

    async def get_pieces(self, keys: Sequence[str], dests: Sequence[Sequence[Piece]] | None,
                         found: list[list[ReplicaDesc] | StoreError] | None = None
                         ) -> list[int | StoreError]:
        """Read each object into registered ``dests`` (whose total length must hold it).
        Returns the value size or the error per key. Falls back replica by replica."""
        self._check_open()
        if dests is not None and len(dests) != len(keys):
            raise StoreError(MasterErrorCode.INVALID_PARAMS,
                             f"{len(keys)} keys but {len(dests)} buffers")
        found = found if found is not None else await self.replicas(keys)
        out: list[int | StoreError] = [0] * len(keys)
        plan: dict[int, tuple[list[ReplicaDesc], list[Piece]]] = {}
        for i, reps in enumerate(found):
            if isinstance(reps, StoreError):
                out[i] = reps
                continue
            assert dests is not None
            size = self.value_size(reps[0])
            parts = list(dests[i])
            room = sum(p[1] for p in parts)
            try:
                if room < size:
                    raise StoreError(MasterErrorCode.INVALID_PARAMS,
                                     f"buffer of {room} bytes cannot hold {keys[i]!r} "
                                     f"({size} bytes)")
                self.check_registered([p for p in parts if p[1] > 0])
            except StoreError as e:
                out[i] = e
                continue
            plan[i] = (reps, _clip(parts, size))
            out[i] = size
        if not plan:
            return out
        async with self.scratch(TRAILER_SIZE * len(keys) if self.checksum else 0) as trailers:
            attempt = 0
            pending = set(plan)
            errors: dict[int, str] = {}
            while pending:
                reads = []
                for i in sorted(pending):
                    reps, parts = plan[i]
                    if attempt >= len(reps):
                        continue
                    if self.checksum:
                        parts = [*parts, (trailers + i * TRAILER_SIZE, TRAILER_SIZE)]
                    reads.append((i, reps[attempt], parts))
                if not reads:
                    break
                failed = await move(self, "read", reads)
                for i, rep, parts in reads:
                    why = failed.get(i)
                    if why is None and self.checksum:
                        why = check_trailer(self._gather(parts[:-1]),
                                            memory_at(trailers + i * TRAILER_SIZE, TRAILER_SIZE))
                    if why is None:
                        pending.discard(i)
                    else:
                        errors[i] = f"{rep.segment}: {why}"
                        self.locations.invalidate(keys[i])
                attempt += 1
            for i in pending:
                code = CHECKSUM_MISMATCH if "checksum" in errors.get(i, "") else TRANSFER_FAIL
                out[i] = StoreError(code, f"no replica of {keys[i]!r} could be read "
                                          f"(last: {errors.get(i, 'none')})")
        return out

    async def get_bytes(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        """Read whole values as ``bytes`` through the staging buffer."""
        found = await self.replicas(keys)
        sizes = [0 if isinstance(r, StoreError) else self.value_size(r[0]) for r in found]
        total = sum((s + 63) & ~63 for s in sizes)
        out: list[bytes | StoreError] = []
        async with self.scratch(total) as base:
            dests, offset = [], 0
            for size in sizes:
                dests.append([(base + offset, size)] if size else [])
                offset += (size + 63) & ~63
            got = await self.get_pieces(keys, dests, found)
            for r, d in zip(got, dests):
                out.append(r if isinstance(r, StoreError) else bytes(memory_at(d[0][0], r)))
        return out

    # -- existence and removal ----------------------------------------------------------------

    async def exists(self, keys: Sequence[str], grant_lease: bool = False) -> list[bool]:
        """Existence of complete objects; ``grant_lease`` makes "exists, then load" race-free."""
        self._check_open()
        for key in keys:
            err = _check_key(key)
            if err is not None:
                raise err
        try:
            return await self.master.batch_exists(list(keys), grant_lease)
        except Exception as e:
            raise as_store_error(e) from None

    async def remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        """Remove objects; per-key codes (0 = removed). ``force`` removes leased objects too."""
        self._check_open()
        for key in keys:
            self.locations.invalidate(key)
        try:
            if force or len(keys) == 1:
                codes = []
                for key in keys:
                    try:
                        await self.master.remove(key, force)
                        codes.append(0)
                    except Exception as e:
                        codes.append(as_store_error(e).code)
                return codes
            return await self.master.batch_remove(list(keys))
        except Exception as e:
            raise as_store_error(e) from None

    async def replicate(self, keys: Sequence[str], segment: str) -> list[int]:
        """Add a replica of each complete object on ``segment`` (see :mod:`.replicate`);
        per-key codes, 0 = published there. Invalid keys get INVALID_KEY without a call."""
        self._check_open()
        check_segment(segment)
        codes = [0] * len(keys)
        valid = []
        for i, key in enumerate(keys):
            err = _check_key(key)
            if err is None:
                valid.append(i)
            else:
                codes[i] = err.code
        got = await replicate(self, [keys[i] for i in valid], segment)
        for i, code in zip(valid, got):
            codes[i] = code
        return codes

    async def remove_all(self, force: bool = False) -> int:
        self._check_open()
        self.locations.clear()
        try:
            return await self.master.remove_all(force)
        except Exception as e:
            raise as_store_error(e) from None

    def _check_open(self) -> None:
        if not self._started or self._closed:
            raise StoreError(MasterErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                             "store client is not running (start() it; closed clients stay closed)")


def _check_key(key: object) -> StoreError | None:
    if not isinstance(key, str):
        return StoreError(MasterErrorCode.INVALID_KEY, f"key must be a str, got {type(key).__name__}")
    try:
        validate_key(key)
    except ValueError as e:
        return StoreError(MasterErrorCode.INVALID_KEY, str(e))
    return None


def _clip(parts: list[Piece], size: int) -> list[Piece]:
    """The prefix of ``parts`` covering exactly ``size`` bytes."""
    out, left = [], size
    for addr, length in parts:
        if left <= 0:
            break
        take = min(length, left)
        if take > 0:
            out.append((addr, take))
        left -= take
    return out



