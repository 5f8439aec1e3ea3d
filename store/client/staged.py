"""Staged puts: objects written in pieces as the pieces become ready, published once complete.

Why: a producer may create an object's bytes over time - a vLLM worker writes a KV block one
layer at a time during the forward pass. A normal put can only start once every byte exists, so
all the copying waits for the end of the pass. A staged put reserves the replicas up front
(``begin``: the master's ``batch_put_start``), writes each piece into them as soon as it exists
(``write``: queued on the engine's loop, the caller does not wait), and publishes at the end
(``commit``: waits for the writes, then ``batch_put_end``) - or gives the space back (``abort``:
``batch_put_revoke``). Readers never see a staged object before ``commit`` published it: the
master only hands out complete replicas.

Rules that keep it safe:

* ``commit`` publishes an object only if its written pieces cover ``[0, size)`` exactly once;
  anything else (a missing or overlapping piece, a failed write) is revoked and reported.
* The master reclaims a reservation not ended within its ``put_start_timeout`` and may then
  place another object there. So a staged put has a *window*: ``window_s`` if given (else half
  the client's configured timeout), never more than half the timeout the master states in its
  reply to the reservation. No write is issued after it, and a put whose window passed before
  all writes completed is revoked, never published. Keep windows short (one forward pass) and
  the master's timeout long.
* Source memory must stay registered and unchanged until ``commit`` (or ``abort``) returns:
  writes are zero-copy and may still be running, and a checksum trailer is computed at commit.

Everything is driven from caller threads; the work runs on the transfer engine's loop, with the
same master client, transfer batches, failure splitting and bookkeeping as ordinary puts
(:meth:`AsyncStoreClient.put_pieces`).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from store.master import ReplicaDesc, ReplicateConfig
from transfer.errors import RegistrationError
from transfer.memory import address_of, memory_at

from .core import _check_key
from .errors import MasterErrorCode, StoreError, as_store_error
from .integrity import TRAILER_SIZE, make_trailer
from .transfers import Piece, write_at

if TYPE_CHECKING:
    from .core import AsyncStoreClient
    from .sync import StoreClient

__all__ = ["EXISTS", "StagedHandle", "StagedPut", "staged_error_is_exists"]

EXISTS = int(MasterErrorCode.OBJECT_ALREADY_EXISTS)
_IN_PROGRESS = int(MasterErrorCode.OBJECT_PUT_IN_PROGRESS)
_MAX_KEYS = 4096
_LATE = ("not written within the staged put's window (window_s, at most half the master's "
         "put timeout)")


@dataclass(eq=False)
class StagedHandle:
    """One staged put of several objects (opaque to callers but for ``keys``/``sizes``)."""

    keys: list[str]
    sizes: list[int]
    deadline: float
    """``time.monotonic()`` after which no write is issued (see the module docstring)."""
    index: dict[str, int] = field(default_factory=dict)
    reservation: Future[Any] | None = None
    """Resolves on the loop to ``[replicas or StoreError]`` per key."""
    writes: list[Future[Any]] = field(default_factory=list)
    pieces: list[list[tuple[int, Piece]]] = field(default_factory=list)
    """Per key: ``(offset, (address, length))`` of every piece handed to ``write``."""
    failed: dict[int, str] = field(default_factory=dict)
    late: bool = False
    """A write was refused or finished after the window: nothing may be published."""
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class StagedPut:
    """Staged puts through a blocking :class:`~store.client.sync.StoreClient`.

    ``window_s`` bounds how long a staged put may write (default: half the client's configured
    ``master.put_start_timeout``); see the module docstring for why.
    """

    def __init__(self, client: "StoreClient", *, window_s: float | None = None,
                 config: ReplicateConfig | None = None) -> None:
        self.client = client
        self.core: AsyncStoreClient = client.core
        self.loop = client._hop.loop
        self.config = config if config is not None else ReplicateConfig()
        timeout = float(self.core.config.master.put_start_timeout)
        self.window_s = float(window_s) if window_s is not None else timeout / 2
        if not 0 < self.window_s <= 3600:
            raise ValueError(f"window_s must be in (0, 3600], got {self.window_s}")

    # -- caller-thread API --------------------------------------------------------------------

    def begin(self, keys: Sequence[str], sizes: Sequence[int]) -> StagedHandle:
        """Reserve one object of ``sizes[i]`` bytes per key; returns at once (the reservation
        runs on the loop, and writes queue behind it)."""
        keys, sizes = list(keys), [int(s) for s in sizes]
        if len(keys) != len(sizes):
            raise StoreError(MasterErrorCode.INVALID_PARAMS, f"{len(keys)} keys but {len(sizes)} sizes")
        if not keys or len(keys) > _MAX_KEYS:
            raise StoreError(MasterErrorCode.INVALID_PARAMS,
                             f"a staged put holds 1..{_MAX_KEYS} objects, got {len(keys)}")
        index: dict[str, int] = {}
        for i, (key, size) in enumerate(zip(keys, sizes)):
            err = _check_key(key)
            if err is not None:
                raise err
            if key in index:
                raise StoreError(MasterErrorCode.INVALID_PARAMS, f"key {key!r} given twice")
            if size <= 0:
                raise StoreError(MasterErrorCode.INVALID_PARAMS,
                                 f"object {key!r} has size {size}; it must be positive")
            index[key] = i
        self.core._check_open()
        handle = StagedHandle(keys, sizes, time.monotonic() + self.window_s, index,
                              pieces=[[] for _ in keys])
        handle.reservation = asyncio.run_coroutine_threadsafe(self._reserve(handle), self.loop)
        return handle

    def write(self, handle: StagedHandle, key: str, offset: int, view: Any,
              length: int | None = None) -> None:
        """Queue writing ``view`` (registered memory: a buffer, a tensor, or an int address
        with ``length``) at ``offset`` of object ``key``; returns at once."""
        try:
            address, n, _, _ = address_of(view, length)
        except RegistrationError as e:
            raise StoreError(MasterErrorCode.INVALID_PARAMS, f"cannot write from {view!r}: {e}") from None
        self.write_many(handle, [(key, offset, [(address, n)])])

    def write_many(self, handle: StagedHandle,
                   items: Sequence[tuple[str, int, Sequence[Piece]]]) -> None:
        """Queue several writes as one transfer batch: per item, the pieces ``(address,
        length)`` of registered memory that go, in order, at ``offset`` of object ``key``.

        Bad input (unknown key, out-of-range piece, unregistered memory) and a write after
        ``commit``/``abort`` raise :class:`StoreError` before anything is queued. A write after
        the window is dropped, and the put is revoked at commit.
        """
        planned: list[tuple[int, int, list[Piece]]] = []
        for key, offset, pieces in items:
            i = handle.index.get(key)
            if i is None:
                raise StoreError(MasterErrorCode.INVALID_PARAMS, f"{key!r} is not in this staged put")
            offset = int(offset)
            parts = [(int(a), int(n)) for a, n in pieces]
            total = sum(n for _, n in parts)
            if offset < 0 or any(n <= 0 for _, n in parts) or offset + total > handle.sizes[i]:
                raise StoreError(MasterErrorCode.INVALID_PARAMS,
                                 f"pieces of {total} bytes at offset {offset} do not fit "
                                 f"{key!r} ({handle.sizes[i]} bytes)")
            self.core.check_registered(parts)
            planned.append((i, offset, parts))
        if not planned:
            return
        with handle.lock:
            if handle.closed:
                raise StoreError(MasterErrorCode.INVALID_PARAMS, "staged put already committed or aborted")
            if time.monotonic() > handle.deadline:
                handle.late = True
                return
            for i, offset, parts in planned:
                pos = offset
                for piece in parts:
                    handle.pieces[i].append((pos, piece))
                    pos += piece[1]
            handle.writes.append(
                asyncio.run_coroutine_threadsafe(self._write(handle, planned), self.loop))

    def commit(self, handle: StagedHandle, timeout: float | None = None) -> list[StoreError | None]:
        """Wait for the writes, then publish every complete object; per key ``None`` (published)
        or the error (``OBJECT_ALREADY_EXISTS`` when another writer had it: not a failure for a
        cache). Incomplete or failed objects are revoked."""
        self._close(handle)
        fut = asyncio.run_coroutine_threadsafe(self._commit(handle), self.loop)
        return fut.result(timeout if timeout is not None else self.client.timeout)

    def abort(self, handle: StagedHandle, timeout: float | None = None) -> None:
        """Give the reserved space back once in-flight writes ended (never while they run)."""
        self._close(handle)
        fut = asyncio.run_coroutine_threadsafe(self._abort(handle), self.loop)
        fut.result(timeout if timeout is not None else self.client.timeout)

    # -- loop side ----------------------------------------------------------------------------

    async def _reserve(self, handle: StagedHandle) -> list[list[ReplicaDesc] | StoreError]:
        core = self.core
        extra = TRAILER_SIZE if core.checksum else 0
        sent = time.monotonic()
        try:
            items = await core.master.batch_put_start(
                core.client_id, handle.keys, [s + extra for s in handle.sizes], self.config)
        except Exception as e:  # noqa: BLE001 - every key gets the error
            err = as_store_error(e)
            return [err] * len(handle.keys)
        master_timeout = core.master.put_timeout_s
        if master_timeout is not None:
            # The master's own timeout wins over a window configured too long: half of it,
            # counted from before the request left (the master started its clock later).
            handle.deadline = min(handle.deadline, sent + master_timeout / 2)
        out: list[list[ReplicaDesc] | StoreError] = []
        for key, item in zip(handle.keys, items):
            out.append(StoreError(item.code, f"put of {key!r} refused") if item.code
                       else list(item.replicas))
        return out

    async def _write(self, handle: StagedHandle, planned: list[tuple[int, int, list[Piece]]],
                     deadline: float | None = None) -> None:
        assert handle.reservation is not None
        reserved = await asyncio.wrap_future(handle.reservation)
        deadline = handle.deadline if deadline is None else deadline
        if time.monotonic() > deadline:
            handle.late = True
            return
        items = [(i, rep, offset, parts) for i, offset, parts in planned
                 if not isinstance(reserved[i], StoreError)  # refused at begin: commit says so
                 for rep in reserved[i]]
        if items:
            handle.failed.update(await write_at(self.core, items))
        if time.monotonic() > deadline:
            handle.late = True  # bytes may have landed after the reservation could be reclaimed

    async def _settle(self, handle: StagedHandle) -> list[list[ReplicaDesc] | StoreError]:
        """The reservation, once every queued write finished (whatever its outcome)."""
        assert handle.reservation is not None
        reserved = await asyncio.wrap_future(handle.reservation)
        for w in handle.writes:
            try:
                await asyncio.wrap_future(w)
            except Exception as e:  # noqa: BLE001 - a write that raised failed its objects
                for i in range(len(handle.keys)):
                    handle.failed.setdefault(i, f"write failed: {e!r}")
        return reserved

    async def _commit(self, handle: StagedHandle) -> list[StoreError | None]:
        core = self.core
        reserved = await self._settle(handle)
        results: list[StoreError | None] = [None] * len(handle.keys)
        started: list[int] = []
        for i, reps in enumerate(reserved):
            if isinstance(reps, StoreError):
                results[i] = reps
            else:
                started.append(i)
        good: list[int] = []
        for i in started:
            why = handle.failed.get(i)
            if why is None and handle.late:
                why = _LATE
            if why is None:
                why = _coverage_error(handle.pieces[i], handle.sizes[i])
            if why is not None:
                handle.failed[i] = why
            else:
                good.append(i)
        if core.checksum and good:
            await self._write_trailers(handle, reserved, good)
            good = [i for i in good if i not in handle.failed]
        bad = [i for i in started if i not in good]
        await core._finish_puts(handle.keys, good, bad, handle.failed, results)
        for i in good:
            reps = reserved[i]
            assert not isinstance(reps, StoreError)
            if results[i] is None:
                core._record_put(handle.keys[i], [(r.segment, r.address, r.size) for r in reps])
        return results

    async def _write_trailers(self, handle: StagedHandle, reserved: list[Any], good: list[int]) -> None:
        """Checksum trailers (see :mod:`.integrity`) of the objects as written, after them."""
        core = self.core
        async with core.scratch(TRAILER_SIZE * len(good)) as base:
            planned = []
            for j, i in enumerate(good):
                ordered = sorted(handle.pieces[i])
                data = b"".join(core.engine.registry.host_bytes(a, n) for _, (a, n) in ordered)
                addr = base + j * TRAILER_SIZE
                memory_at(addr, TRAILER_SIZE)[:] = make_trailer(data)
                planned.append((i, handle.sizes[i], [(addr, TRAILER_SIZE)]))
            await self._write(handle, planned, deadline=float("inf"))
            if time.monotonic() > handle.deadline:
                handle.late = True
                for i in good:
                    handle.failed.setdefault(i, _LATE)

    async def _abort(self, handle: StagedHandle) -> None:
        reserved = await self._settle(handle)
        keys = [k for k, r in zip(handle.keys, reserved) if not isinstance(r, StoreError)]
        if keys:
            try:
                await self.core.master.batch_put_revoke(self.core.client_id, keys)
            except Exception:  # noqa: BLE001 - the master reclaims it after its timeout
                pass

    # -- helpers ------------------------------------------------------------------------------

    def _close(self, handle: StagedHandle) -> None:
        with handle.lock:
            if handle.closed:
                raise StoreError(MasterErrorCode.INVALID_PARAMS, "staged put already committed or aborted")
            handle.closed = True


def _coverage_error(pieces: list[tuple[int, Piece]], size: int) -> str | None:
    """Why ``pieces`` (``(offset, (address, length))``) do not cover ``[0, size)`` exactly once."""
    pos = 0
    for offset, (_, n) in sorted(pieces):
        if offset != pos:
            return (f"bytes {pos}..{offset} never written" if offset > pos
                    else f"bytes {offset}..{pos} written twice")
        pos += n
    if pos != size:
        return f"bytes {pos}..{size} never written"
    return None


def staged_error_is_exists(err: StoreError | None) -> bool:
    """True for "another writer stored (or is storing) this object": not a failure for a cache."""
    return err is not None and err.code in (EXISTS, _IN_PROGRESS)

