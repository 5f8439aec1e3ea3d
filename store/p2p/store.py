"""The P2P store: publish objects from this node's memory and fetch them from every holder.

There is no data server. :meth:`P2PStore.register` publishes buffers (or files) where they are -
nothing is copied - and :meth:`P2PStore.get` pulls an object's chunks in parallel from every node
that holds it (:mod:`store.p2p.fetch`), then makes this node a holder too, so each getter adds
upload capacity for the next. Object records and per-holder leases live in the transfer engine's
metadata store (etcd or the HTTP metadata server; see :mod:`store.p2p.records`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from store.p2p.chunks import DEFAULT_CHUNK_SIZE, ObjectView, checksums_of
from store.p2p.fetch import ChunkFetcher, NoSourceError, ProgressFn, SourceStats
from store.p2p.records import (
    LEASES_PREFIX,
    OBJECTS_PREFIX,
    Extent,
    Holder,
    ObjectRecord,
    Partial,
    RecordError,
    check_name,
    decode_object,
    decode_partial,
    encode_object,
    encode_partial,
    lease_key,
    lease_prefix,
    object_key,
    partial_prefix,
)
from transfer.engine import Engine
from transfer.errors import AddressError
from transfer.memory import address_of
from transfer.metadata import (MetadataError, MetadataStore, open_metadata_store,
                               parse_metadata_server)
from transfer.shm import SharedBuffer

__all__ = ["GetResult", "NoSourceError", "ObjectExistsError", "ObjectInfo",
           "ObjectNotFoundError", "P2PStore"]

logger = logging.getLogger(__name__)
Source = Any  # a writable buffer object or a file path (str / os.PathLike)


class ObjectNotFoundError(LookupError):
    """No object of that name is published (or none of its holders is alive)."""


class ObjectExistsError(ValueError):
    """An object of that name with different content is already published."""


@dataclass(frozen=True)
class ObjectInfo:
    """An object as :meth:`P2PStore.list` reports it: size, chunking and live holders."""

    name: str
    size: int
    chunk_size: int
    num_chunks: int
    holders: tuple[str, ...]


@dataclass
class GetResult:
    """Outcome of a get: per-source counters show who served what."""

    name: str
    size: int
    seconds: float
    sources: dict[str, SourceStats]
    refetches: int

    @property
    def throughput(self) -> float:
        """Bytes per second."""
        return self.size / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class _Held:
    """An object this node serves."""

    record: ObjectRecord
    extents: list[Extent]
    view: ObjectView
    origin: bool
    registered: list[int] = field(default_factory=list)  # addresses we registered
    shared: SharedBuffer | None = None


class P2PStore:
    """Register, get, list and stop serving objects; see the module docstring.

    All methods are coroutines for the engine's event loop. ``lease_ttl`` is how long a holder
    stays listed after it died without unregistering.
    """

    def __init__(self, engine: Engine, metadata: MetadataStore | None = None, *,
                 lease_ttl: float = 10.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 per_source: int = 2, max_inflight: int = 16, timeout: float = 60.0,
                 owns_engine: bool = False) -> None:
        server = engine.config.metadata_server
        if metadata is None:
            if parse_metadata_server(server).kind == "p2p":
                raise ValueError("the P2P store needs a shared metadata store (etcd:// or "
                                 "http://), not P2PHANDSHAKE: objects are found through it")
            kind = parse_metadata_server(server).kind
            metadata = open_metadata_store(  # the cluster secret is the HTTP server's token
                server, secret=engine.config.auth_secret if kind == "http" else None)
        self.engine = engine
        self._metadata = metadata
        self._lease_ttl = lease_ttl
        self._chunk_size = chunk_size
        self._per_source = per_source
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._owns_engine = owns_engine
        self._held: dict[str, _Held] = {}
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, metadata_server: str, *, local_hostname: str = "127.0.0.1",
                   engine_options: dict[str, Any] | None = None, **kwargs: Any) -> P2PStore:
        """Start an engine of its own (closed by :meth:`close`) and the store on top of it."""
        engine = Engine(**{"metadata_server": metadata_server, "local_hostname": local_hostname,
                           **(engine_options or {})})
        await engine.start()
        try:
            return cls(engine, owns_engine=True, **kwargs)
        except BaseException:
            await engine.close()
            raise

    @property
    def segment(self) -> str:
        return self.engine.name

    def held(self) -> list[str]:
        """Names of the objects this node serves."""
        return sorted(self._held)

    def view(self, name: str) -> ObjectView:
        """Read access to the local copy of a held object."""
        return self._held[name].view

    async def close(self) -> None:
        """Stop serving everything (best effort), then close the metadata store (and engine)."""
        for name in list(self._held):
            with contextlib.suppress(MetadataError, OSError, ValueError):
                await self._drop(name)
        await self._metadata.close()
        if self._owns_engine:
            await self.engine.close()

    async def __aenter__(self) -> P2PStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- register ------------------------------------------------------------------------------

    async def register(self, name: str, data: Source | Sequence[Source], *,
                       chunk_size: int | None = None) -> ObjectInfo:
        """Publish ``data`` (a buffer, a file path, or a sequence of them, concatenated) as
        ``name``, served from where it lies. Registering content identical to an existing
        object's makes this node one more holder; different content raises
        :class:`ObjectExistsError` while any holder of the old object is alive."""
        check_name(name)
        if name in self._held:
            raise ObjectExistsError(f"this node already serves {name!r}")
        items = list(data) if isinstance(data, (list, tuple)) else [data]
        if not items:
            raise ValueError("register needs at least one buffer or file")
        chunk = chunk_size or self._chunk_size
        held = await self._attach(items)
        try:
            checksums = await asyncio.to_thread(checksums_of, held.view, chunk)
            record = ObjectRecord(name, held.view.size, chunk, checksums)
            encode_object(record)  # validate (sizes, chunk count) before publishing anything
            held.record, held.origin = record, True
            me = Holder(self.segment, held.extents, origin=True)

            def add(cur: ObjectRecord | None, live: set[str]) -> ObjectRecord:
                if cur is None or not any(h.segment in live for h in cur.holders):
                    return record.with_holders([me])
                if not cur.same_content(record):
                    raise ObjectExistsError(
                        f"{name!r} is already published with different content "
                        f"({cur.size} bytes, held by {', '.join(h.segment for h in cur.holders)})")
                return cur.with_holders(
                    [h for h in cur.holders if h.segment in live and h.segment != me.segment]
                    + [me])

            await self._become_holder(name, add)
        except BaseException:
            await self._abandon(name, held)
            raise
        self._held[name] = held
        return _info(held.record, [self.segment])

    # -- get -----------------------------------------------------------------------------------

    async def get(self, name: str, into: Source | Sequence[Source] | None = None, *,
                  progress: ProgressFn | None = None) -> GetResult:
        """Fetch ``name`` into ``into`` (buffers or a file path; default: new shared memory),
        verify every chunk, and become a holder of it."""
        check_name(name)
        if name in self._held:
            raise ObjectExistsError(f"this node already holds {name!r}")
        record, _, live = await self._live_holders(name)
        if record is None:
            raise ObjectNotFoundError(f"no object named {name!r} is published")
        held = await self._attach_destination(record, into)
        start = time.perf_counter()
        try:
            fetcher = ChunkFetcher(
                self.engine, record, held.extents, held.view,
                [h for h in live if h.segment != self.segment], refresh=lambda: self._sources(name),
                per_source=self._per_source, max_inflight=self._max_inflight,
                timeout=self._timeout, progress=progress,
                publish=lambda have: self._metadata.put(
                    partial_prefix(name) + self.segment,
                    encode_partial(Partial(self.segment, held.extents, have)),
                    ttl=self._lease_ttl))
            stats = await fetcher.run()
            seconds = time.perf_counter() - start
            me = Holder(self.segment, held.extents)

            def add(cur: ObjectRecord | None, live: set[str]) -> ObjectRecord:
                if cur is None or not cur.same_content(record):
                    raise ObjectNotFoundError(f"{name!r} was deleted or replaced during the get")
                return cur.with_holders([h for h in cur.holders if h.segment != me.segment]
                                        + [me])

            await self._become_holder(name, add)
        except BaseException:
            await self._abandon(name, held)
            raise
        finally:
            with contextlib.suppress(MetadataError, OSError, ValueError):
                await self._metadata.delete(partial_prefix(name) + self.segment)
        self._held[name] = held
        return GetResult(name, record.size, seconds, stats, fetcher.refetches)

    async def _become_holder(
        self, name: str, add: Callable[[ObjectRecord | None, set[str]], ObjectRecord | None]
    ) -> None:
        """Take this node's lease on ``name``, then add it to the record's holders (``add``
        computes the new record from the current one; applied by compare-and-set)."""
        await self._metadata.put(lease_key(name, self.segment), b"1", ttl=self._lease_ttl)
        await self._update(name, add)

    async def _abandon(self, name: str, held: _Held) -> None:
        """Undo a register or get that failed: release the memory and drop the lease."""
        await self._detach(held)
        with contextlib.suppress(MetadataError, OSError, ValueError):
            await self._metadata.delete(lease_key(name, self.segment))

    async def _sources(self, name: str) -> tuple[list[Holder], list[tuple[Holder, bytes]]]:
        record, _, live = await self._live_holders(name, prune=False)
        partials: list[tuple[Holder, bytes]] = []
        if record is not None:
            prefix = partial_prefix(name)
            for key, value in (await self._metadata.list(prefix)).items():
                if key[len(prefix):] == self.segment or "/" in key[len(prefix):]:
                    continue
                try:
                    p = decode_partial(value, record)
                except RecordError as e:
                    logger.warning("ignoring bad progress entry %s: %s", key, e)
                    continue
                partials.append((Holder(p.segment, p.extents), p.have))
        return [h for h in live if h.segment != self.segment], partials

    # -- list / unregister ---------------------------------------------------------------------

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose name starts with ``prefix`` and that have at least one live holder."""
        records = await self._metadata.list(OBJECTS_PREFIX + prefix)
        leases = await self._metadata.list(LEASES_PREFIX + prefix)
        out: list[ObjectInfo] = []
        for key, value in sorted(records.items()):
            name = key[len(OBJECTS_PREFIX):]
            try:
                record = decode_object(value, expected_name=name)
            except RecordError as e:
                logger.warning("skipping bad record %s: %s", key, e)
                continue
            live = [h.segment for h in record.holders if _lease_of(name, h.segment) in leases]
            if live:
                out.append(_info(record, live))
        return out

    async def unregister(self, name: str) -> None:
        """Stop serving an object this node registered (its buffers stay the caller's)."""
        held = self._held.get(name)
        if held is None or not held.origin:
            raise ObjectNotFoundError(f"this node did not register {name!r}"
                                      + (" (it holds a replica: delete_replica)" if held else ""))
        await self._drop(name)

    async def delete_replica(self, name: str) -> None:
        """Stop serving a replica this node got, and free the memory it allocated for it."""
        held = self._held.get(name)
        if held is None or held.origin:
            raise ObjectNotFoundError(f"this node holds no replica of {name!r}"
                                      + (" (it registered it: unregister)" if held else ""))
        await self._drop(name)

    async def remove_holder(self, name: str, segment: str) -> bool:
        """Administrative: delist ``segment`` as a holder of ``name`` (e.g. a wedged node)."""
        removed = False

        def drop(cur: ObjectRecord | None, live: set[str]) -> ObjectRecord | None:
            nonlocal removed
            if cur is None or all(h.segment != segment for h in cur.holders):
                return None
            removed = True
            return cur.with_holders([h for h in cur.holders if h.segment != segment])

        await self._update(name, drop)
        with contextlib.suppress(MetadataError, OSError, ValueError):
            await self._metadata.delete(lease_key(name, segment))
        return removed

    async def delete_object(self, name: str) -> bool:
        """Administrative: delist the whole object (its holders' memory is untouched)."""
        return await self._metadata.delete(object_key(name))

    async def _drop(self, name: str) -> None:
        held = self._held.pop(name)
        try:
            def drop(cur: ObjectRecord | None, live: set[str]) -> ObjectRecord | None:
                if cur is None or all(h.segment != self.segment for h in cur.holders):
                    return None
                return cur.with_holders([h for h in cur.holders if h.segment != self.segment])

            await self._update(name, drop)
            await self._metadata.delete(lease_key(name, self.segment))
        finally:
            await self._detach(held)

    # -- metadata ------------------------------------------------------------------------------

    async def _live_holders(self, name: str, *, prune: bool = True
                            ) -> tuple[ObjectRecord | None, int | None, list[Holder]]:
        got = await self._metadata.get_with_version(object_key(name))
        if got is None:
            return None, None, []
        record = decode_object(got[0], expected_name=name)
        live_set = await self._leases(name)
        live = [h for h in record.holders if h.segment in live_set]
        if prune and len(live) < len(record.holders):
            # Holders without a lease died without unregistering: delist them (best effort; a
            # lost race just means somebody else changed the record, which they may redo).
            with contextlib.suppress(MetadataError, OSError, ValueError):
                await self._metadata.compare_and_set(
                    object_key(name), encode_object(record.with_holders(live)), got[1])
        return record, got[1], live

    async def _leases(self, name: str) -> set[str]:
        prefix = lease_prefix(name)
        return {k[len(prefix):] for k in await self._metadata.list(prefix)
                if "/" not in k[len(prefix):]}

    async def _update(self, name: str,
                      change: Callable[[ObjectRecord | None, set[str]], ObjectRecord | None],
                      attempts: int = 200) -> None:
        """Read-modify-write the record with compare-and-set until it sticks; ``change`` gets
        the current record and the live holders and returns the new record (None: no write)."""
        key = object_key(name)
        for attempt in range(attempts):
            got = await self._metadata.get_with_version(key)
            cur = None if got is None else decode_object(got[0], expected_name=name)
            new = change(cur, await self._leases(name))
            if new is None:
                return
            if await self._metadata.compare_and_set(key, encode_object(new),
                                                    None if got is None else got[1]):
                return
            await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * (attempt + 1))))
        raise MetadataError(f"could not update {key} after {attempts} attempts (contention)")

    # -- local buffers -------------------------------------------------------------------------

    async def _attach(self, items: list[Source]) -> _Held:
        """Register ``items`` with the engine (unless already registered) as one object."""
        held = _Held(record=None, extents=[], view=ObjectView([]), origin=False)  # type: ignore[arg-type]
        parts: list[memoryview | tuple[str, int, int]] = []
        try:
            for item in items:
                if isinstance(item, (str, os.PathLike)):
                    path = os.path.realpath(os.fspath(item))
                    size = os.path.getsize(path)
                    if size == 0:
                        raise ValueError(f"{path} is empty")
                    address = await self.engine.register_file(path)
                    held.registered.append(address)
                    parts.append((path, 0, size))
                    held.extents.append(Extent(address, size))
                    continue
                view = _byte_view(item)
                address = address_of(view)[0]
                try:
                    self.engine.registry.find(address, view.nbytes)
                except AddressError:
                    await self.engine.register(view)
                    held.registered.append(address)
                parts.append(view)
                held.extents.append(Extent(address, view.nbytes))
        except BaseException:
            await self._detach(held)
            raise
        held.view = ObjectView(parts)
        return held

    async def _attach_destination(self, record: ObjectRecord,
                                  into: Source | Sequence[Source] | None) -> _Held:
        if into is None:
            buf = await self.engine.allocate_shared(record.size)
            held = _Held(record, [Extent(buf.address, record.size)], ObjectView([buf.view]),
                         origin=False, shared=buf)
            return held
        if isinstance(into, (str, os.PathLike)):
            path = os.fspath(into)
            with open(path, "wb") as f:
                f.truncate(record.size)
            items: list[Source] = [path]
        else:
            items = list(into) if isinstance(into, (list, tuple)) else [into]
        held = await self._attach(items)
        if held.view.size != record.size:
            await self._detach(held)
            raise ValueError(f"destination holds {held.view.size} bytes, {record.name!r} "
                             f"is {record.size}")
        held.record = record
        return held

    async def _detach(self, held: _Held) -> None:
        for address in held.registered:
            with contextlib.suppress(AddressError, RuntimeError):
                await self.engine.unregister(address)
        held.registered.clear()
        if held.shared is not None:
            with contextlib.suppress(Exception):
                await self.engine.free_shared(held.shared)
            held.shared = None


def _byte_view(obj: Any) -> memoryview:
    if isinstance(obj, SharedBuffer):
        return obj.view
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"cannot use a {type(obj).__name__} as object data: not a buffer "
                        "or a file path") from None
    if not view.c_contiguous:
        raise ValueError("object buffers must be contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if view.nbytes == 0:
        raise ValueError("object buffers must not be empty")
    return view


def _lease_of(name: str, segment: str) -> str:
    return lease_key(name, segment)


def _info(record: ObjectRecord, holders: list[str]) -> ObjectInfo:
    return ObjectInfo(record.name, record.size, record.chunk_size, record.num_chunks,
                      tuple(holders))
