"""The caller-thread path of the blocking client: small single-object ops with no loop hop.

Why: a 4 KiB get through the event loop costs two thread switches (caller -> loop -> caller)
plus the loop's own scheduling, about as much as the master and holder round trips themselves.
Here a single-key ``get``/``get_into``/``put``/``put_from`` runs wholly on the calling thread:
master calls over a :class:`~transfer.rpc.BlockingRpcClient` (one connection per thread), bytes
through :meth:`Engine.transfer_blocking` (the small TCP path on this thread).

It never decides a hard case. Anything unusual - a bad key or buffer, a replica in this client's
own segment, a read that fails or does not verify, a lost master connection before anything was
reserved - returns :data:`FALLBACK` and the caller takes the loop path, which retries replica by
replica and reports the precise error. Master calls that lose their connection *after* a put was
reserved are finished through the loop's :class:`~store.master.MasterClient` (reconnect, leader
lookup and retry within ``retry_timeout``). Bookkeeping owned by the loop (holdings, write
announcements, the staging allocator) is never touched here: a put's record is appended to
``core.direct_puts`` (a deque, no loop wake-up) for the loop's next heartbeat tick, and scratch
memory is a per-thread registered buffer.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final, TypeVar

import msgspec

from store.master import ReplicaDesc, ReplicateConfig
from store.master.messages import (BatchExistsReply, BatchGetReplicaListReply,
                                   BatchKeysRequest, BatchPutStartReply, BatchPutStartRequest,
                                   CodesReply, KeysRequest, OkReply, OwnedKeysRequest,
                                   PutCommitRequest, ReserveReply, ReserveRequest)
from store.master.tenants import master_credentials
from transfer.batch import TransferRequest
from transfer.config import split_address
from transfer.errors import AddressError
from transfer.memory import memory_at
from transfer.polling import usable_cores
from transfer.rpc import BlockingRpcClient, ErrorCode, RpcConnectionError, RpcError
from transfer.smallpath import SMALL_BATCH_BYTES
from transfer.transports.base import Opcode

from .core import AsyncStoreClient, _check_key
from .errors import TRANSFER_FAIL, MasterErrorCode, StoreError, as_store_error
from .integrity import TRAILER_SIZE, check_trailer, make_trailer
from .locations import order_replicas
from .reserved import MAX_RESERVED_OBJECT, Held, eligible
from .transfers import plan

__all__ = ["FALLBACK", "CallerThreadPath"]

R = TypeVar("R")
FALLBACK: Final = object()
"""Returned when the operation must take the loop path instead (nothing was changed)."""
_NOT_LEADER = int(MasterErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
_SCRATCH = SMALL_BATCH_BYTES + 64
_MAX_SCRATCH_THREADS = 16
_SPLIT_MAX = 4 << 20
"""Writes above :data:`SMALL_BATCH_BYTES` and up to this size are split into small-path pieces
run side by side (see :meth:`CallerThreadPath._transfer`); larger ones take the engine's general
path, whose parallel streams and slicing win there."""
_KEY_REFUSALS = (MasterErrorCode.OBJECT_ALREADY_EXISTS, MasterErrorCode.OBJECT_PUT_IN_PROGRESS,
                 MasterErrorCode.INVALID_KEY)
_WRITERS = 3
"""Helper threads for split writes: with the caller, one per stream of the tcp transport."""
_FEW_CORES = usable_cores() < 4
"""Whether splitting a mid-size value over streams costs more than it brings here. Each
stream keeps a sending thread here and a receiving one at the peer busy: with two cores, two
streams put four busy threads (plus the kernel's loopback work) on them, and a 1 MiB write
measured ~430 us split in two against ~350 us as one exchange. With the data server polling
(``transfer.serve_poll_us``) one exchange also beats the general path's parallel streams
higher up: 16 MiB puts took 4.1-5.0 ms against 5.5-5.9 ms. Values above
:data:`_FEW_CORES_ONE_STREAM_MAX` take the general path."""
_FEW_CORES_ONE_STREAM_MAX = 32 << 20


def one_stream_bytes(total: int) -> int:
    """The ``one_stream_bytes`` for a caller-thread transfer of ``total`` bytes."""
    return total if _FEW_CORES and total <= _FEW_CORES_ONE_STREAM_MAX else SMALL_BATCH_BYTES


class _Unreachable(Exception):
    """The blocking master call could not be made; nothing is known to have happened."""


class CallerThreadPath:
    """Single-object store ops on the calling thread; see the module docstring."""

    def __init__(self, core: AsyncStoreClient, loop: asyncio.AbstractEventLoop,
                 loop_thread: int, timeout: float) -> None:
        self.core = core
        self.engine = core.engine
        self.loop = loop
        self.loop_thread = loop_thread
        self.timeout = timeout
        self.hits = 0
        """Operations completed here (not handed to the loop path); for tests and stats."""
        self._rpc: BlockingRpcClient | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._scratch: list[Any] = []
        self._writers: ThreadPoolExecutor | None = None
        self._reserve_ahead = core.config.store.reserve_ahead
        """Bytes asked for ahead of puts (0: every put is two-phase); see :mod:`.reserved`."""
        self._reserve_after = 0.0
        """When a master with no space to spare may be asked again (monotonic)."""

    # -- plumbing -----------------------------------------------------------------------------

    def usable(self) -> bool:
        core = self.core
        return (core._started and not core._closed and core.master.address is not None
                and threading.get_ident() != self.loop_thread)

    def _client(self) -> BlockingRpcClient:
        address = self.core.master.address
        rpc = self._rpc
        if rpc is None or rpc.address != address:
            with self._lock:
                rpc = self._rpc
                if rpc is None or rpc.address != address:
                    assert address is not None
                    host, port = split_address(address)
                    cfg = self.core.config
                    if rpc is not None:
                        rpc.close()
                    rpc = self._rpc = BlockingRpcClient(
                        host, port, **master_credentials(cfg),
                        max_frame_size=cfg.rpc.max_frame_size,
                        connect_timeout=cfg.rpc.connect_timeout,
                        busy_poll=cfg.transfer.busy_poll_us / 1e6)
        return rpc

    def _master(self, method: str, request: msgspec.Struct, reply: type[R], *,
                must_finish: bool) -> R:
        """One master call on this thread. If the connection is lost or the master is not the
        leader: ``must_finish`` retries through the loop's MasterClient, else raises
        :class:`_Unreachable` (the caller falls back)."""
        try:
            return self._client().call(method, request, reply, self.core.master.timeout)
        except RpcError as e:
            if not (isinstance(e, RpcConnectionError) or e.code == _NOT_LEADER):
                raise
            if not must_finish:
                raise _Unreachable(str(e)) from None
        return self.engine.run(self.core.master.call(method, request, reply), self.timeout)

    def _scratch_address(self) -> int | None:
        """This thread's registered scratch buffer (made on first use; a bounded number)."""
        buf = getattr(self._local, "scratch", None)
        if buf is None:
            with self._lock:
                if len(self._scratch) >= _MAX_SCRATCH_THREADS:
                    return None
            buf = self.engine.run(self.engine.allocate_shared(_SCRATCH), self.timeout)
            with self._lock:
                self._scratch.append(buf)
            self._local.scratch = buf
        return int(buf.address)

    def close(self) -> None:
        """Drop the master connections and free the scratch buffers (from a non-loop thread)."""
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            rpc.close()
        writers, self._writers = self._writers, None
        if writers is not None:
            writers.shutdown(wait=True)
        with self._lock:
            bufs, self._scratch = self._scratch, []
        for buf in bufs:
            try:
                self.engine.run(self.engine.free_shared(buf), 10.0)
            except Exception:  # noqa: BLE001 - the engine may already be closing
                pass

    def _transfer(self, reqs: list[TransferRequest]) -> None:
        """Write or read ``reqs``; raises if any byte may not have moved.

        Why split: one blocking small-path exchange (up to :data:`SMALL_BATCH_BYTES`) runs on
        this thread with the GIL released in its syscalls, while a larger batch hops to the loop
        and a stream thread and back - a 1 MiB write took ~870 us that way against ~460 us as two
        512 KiB halves sent side by side over two streams. Each piece that finds no idle stream
        simply takes the general path inside ``transfer_blocking``. On a host with few cores
        (:data:`_FEW_CORES`) one stream beats the split, so a value up to
        :data:`_FEW_CORES_ONE_STREAM_MAX` is one exchange there. Reads split the same way: on
        a 16-core host, 1 MiB gets that took the general path ran at half Mooncake's rate.
        A holder on the same host is a memory copy (the shm fast path), never split: there 1
        MiB puts of CUDA memory took 315-341 us as one copy against 400-509 us split, host
        memory 225-236 against 248-276 us (H200 host)."""
        timeout = self.core.transfer_timeout
        total = sum(r.length for r in reqs)
        if total <= SMALL_BATCH_BYTES or total > _SPLIT_MAX or _FEW_CORES \
                or self.engine.copies_to(reqs[0].segment):
            self.engine.transfer_blocking(reqs, timeout=timeout,
                                          one_stream_bytes=one_stream_bytes(total))
            return
        groups = _split(reqs, SMALL_BATCH_BYTES)
        with self._lock:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(_WRITERS, thread_name_prefix="store-write")
            writers = self._writers
        futures: list[Future[Any]] = [writers.submit(self.engine.transfer_blocking, g,
                                                     timeout=timeout) for g in groups[1:]]
        error: BaseException | None = None
        try:
            self.engine.transfer_blocking(groups[0], timeout=timeout)
        except Exception as e:  # noqa: BLE001 - wait for the others before reporting
            error = e
        for f in futures:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                error = error or e
        if error is not None:
            raise error

    def _registered(self, address: int, size: int) -> bool:
        try:
            self.engine.registry.find(address, size)
        except AddressError:
            return False
        return True

    # -- metadata -----------------------------------------------------------------------------

    def exists(self, keys: list[str], grant_lease: bool) -> Any:
        """Per-key existence of complete objects (one master call), or :data:`FALLBACK`.

        The connector's scheduler asks this once per new request, so the loop hop (two thread
        switches, about as long as the master call itself) is worth skipping here too."""
        if not keys or not self.usable() or any(_check_key(k) is not None for k in keys):
            return FALLBACK
        try:
            reply = self._master("batch_exists", BatchKeysRequest(keys, grant_lease),
                                 BatchExistsReply, must_finish=False)
        except _Unreachable:
            return FALLBACK
        except RpcError as e:
            raise as_store_error(e) from None
        if len(reply.exists) != len(keys):
            raise StoreError(MasterErrorCode.INTERNAL_ERROR,
                             f"the master answered {len(reply.exists)} of {len(keys)} keys")
        self.hits += 1
        return list(reply.exists)

    # -- gets ---------------------------------------------------------------------------------

    def _replica(self, key: str) -> ReplicaDesc | None:
        """The nearest replica if it is remote (cached under its lease or asked for)."""
        core = self.core
        reps = core.locations.get(key)
        if reps is None:
            reply = self._master("batch_get_replica_list", KeysRequest([key]),
                                 BatchGetReplicaListReply, must_finish=False)
            item = reply.items[0]
            if item.code:
                raise StoreError(item.code, f"{key!r}: no readable replica")
            reps = order_replicas(item.replicas, core._local_segments, core._host)
            core.locations.put(key, reps, reply.lease_ttl_ms)
        if not reps or reps[0].segment in core._local_segments:
            return None
        return reps[0]

    def _read(self, key: str, rep: ReplicaDesc, dest: int, size: int, scratch: int | None,
              contiguous: bool) -> bool:
        """Read the value (and trailer) of ``rep``; ``False`` if it failed or did not verify."""
        checksum = self.core.checksum
        if checksum and contiguous:
            reqs = [TransferRequest(Opcode.READ, dest, rep.segment, rep.address,
                                    size + TRAILER_SIZE)]
            trailer = dest + size
        else:
            reqs = [TransferRequest(Opcode.READ, dest, rep.segment, rep.address, size)]
            if checksum:
                assert scratch is not None
                reqs.append(TransferRequest(Opcode.READ, scratch, rep.segment,
                                            rep.address + size, TRAILER_SIZE))
                trailer = scratch
        try:
            self._transfer(reqs)
        except Exception:  # noqa: BLE001 - the loop path retries and reports why
            self.core.locations.invalidate(key)
            return False
        if checksum and check_trailer(self.engine.registry.host_bytes(dest, size),
                                      memory_at(trailer, TRAILER_SIZE)) is not None:
            self.core.locations.invalidate(key)
            return False
        return True

    def get_into(self, key: str, address: int, size: int) -> Any:
        """The value's size, or :data:`FALLBACK`."""
        if _check_key(key) is not None or not self.usable():
            return FALLBACK
        try:
            rep = self._replica(key)
        except _Unreachable:
            return FALLBACK
        except RpcError as e:
            raise as_store_error(e) from None
        if rep is None:
            return FALLBACK
        value = self.core.value_size(rep)
        if value > size or value <= 0 or not self._registered(address, value):
            return FALLBACK
        scratch = self._scratch_address() if self.core.checksum else None
        if self.core.checksum and scratch is None:
            return FALLBACK
        if not self._read(key, rep, address, value, scratch, contiguous=False):
            return FALLBACK
        self.hits += 1
        return value

    def get(self, key: str) -> Any:
        """The value as ``bytes``, or :data:`FALLBACK`. Value and trailer are read in one
        piece into this thread's scratch buffer."""
        if _check_key(key) is not None or not self.usable():
            return FALLBACK
        try:
            rep = self._replica(key)
        except _Unreachable:
            return FALLBACK
        except RpcError as e:
            raise as_store_error(e) from None
        if rep is None or rep.size > _SCRATCH or self.core.value_size(rep) <= 0:
            return FALLBACK
        scratch = self._scratch_address()
        if scratch is None:
            return FALLBACK
        value = self.core.value_size(rep)
        if not self._read(key, rep, scratch, value, None, contiguous=True):
            return FALLBACK
        self.hits += 1
        return bytes(memory_at(scratch, value))

    # -- puts ---------------------------------------------------------------------------------

    def put_from(self, key: str, address: int, size: int, config: ReplicateConfig) -> Any:
        """``None`` once stored, or :data:`FALLBACK`; raises :class:`StoreError` if refused."""
        core = self.core
        if (_check_key(key) is not None or size <= 0 or not self.usable()
                or not self._registered(address, size) or core._local_segments):
            return FALLBACK
        scratch = None
        if core.checksum:
            scratch = self._scratch_address()
            if scratch is None:
                return FALLBACK
            memory_at(scratch, TRAILER_SIZE)[:] = make_trailer(
                self.engine.registry.host_bytes(address, size))
        return self._put(key, [(address, size)], size, scratch, config)

    def put(self, key: str, value: Any, config: ReplicateConfig) -> Any:
        """Store a bytes-like ``value`` staged through this thread's scratch buffer."""
        try:
            view = memoryview(value).cast("B")
        except (TypeError, ValueError):  # not a contiguous bytes-like: the loop path says why
            return FALLBACK
        n = view.nbytes
        if (n <= 0 or n + TRAILER_SIZE > _SCRATCH or _check_key(key) is not None
                or not self.usable() or self.core._local_segments):
            return FALLBACK
        scratch = self._scratch_address()
        if scratch is None:
            return FALLBACK
        memory_at(scratch, n)[:] = view
        trailer = None
        if self.core.checksum:
            trailer = scratch + n
            memory_at(trailer, TRAILER_SIZE)[:] = make_trailer(view)
        return self._put(key, [(scratch, n)], n, trailer, config)

    def _put(self, key: str, pieces: list[tuple[int, int]], size: int, trailer: int | None,
             config: ReplicateConfig) -> Any:
        core = self.core
        if trailer is not None:
            pieces = [*pieces, (trailer, TRAILER_SIZE)]
        stored = size + (TRAILER_SIZE if trailer is not None else 0)
        if self._reserve_ahead and stored <= MAX_RESERVED_OBJECT and eligible(config):
            if self._put_reserved(key, pieces, stored, config):
                return None
        try:
            reply = self._master("batch_put_start", BatchPutStartRequest(
                client_id=core.client_id, keys=[key], sizes=[stored], config=config),
                BatchPutStartReply, must_finish=False)
        except _Unreachable:
            return FALLBACK
        except RpcError as e:
            raise as_store_error(e) from None
        item = reply.items[0]
        if item.code:
            raise StoreError(item.code, f"put of {key!r} refused")
        # A replica in a segment mounted here meanwhile is copied directly.
        reqs, _ = plan(Opcode.WRITE, [(0, rep, 0, pieces) for rep in item.replicas],
                       core._local_segments)
        keys = OwnedKeysRequest(core.client_id, [key])
        try:
            if reqs:
                self._transfer(reqs)
        except Exception as e:  # noqa: BLE001 - reported as the put's error
            try:
                self._master("batch_put_revoke", keys, CodesReply, must_finish=True)
            except Exception:  # noqa: BLE001 - the master reclaims it after its timeout
                pass
            raise StoreError(TRANSFER_FAIL, f"writing {key!r} failed: {e}") from None
        try:
            code = self._master("batch_put_end", keys, CodesReply, must_finish=True).codes[0]
        except Exception as e:  # noqa: BLE001
            raise as_store_error(e) from None
        if code:
            raise StoreError(code, f"publishing {key!r} failed")
        replicas = [(r.segment, r.address, r.size) for r in item.replicas]
        core.direct_puts.append((key, replicas))  # applied by the loop's next heartbeat tick
        self.hits += 1
        return None

    # -- puts from reserved space (see .reserved) ------------------------------------------

    def _put_reserved(self, key: str, pieces: list[tuple[int, int]], stored: int,
                      config: ReplicateConfig) -> bool:
        """Write at the front of this thread's reservation and commit: one master round trip.
        ``False``: nothing was stored and the two-phase put should run (no reservation to be
        had, or the commit was refused as not from a reservation this master knows)."""
        core = self.core
        held: Held | None = getattr(self._local, "held", None)
        rep = held.take(stored) if held is not None else None
        if rep is None:
            held = self._reserve(stored, held.id if held is not None else 0)
            rep = held.take(stored) if held is not None else None
            if rep is None:
                return False
        assert held is not None
        reqs, _ = plan(Opcode.WRITE, [(0, rep, 0, pieces)], core._local_segments)
        try:
            self._transfer(reqs)
        except Exception as e:  # noqa: BLE001 - the space stays ours; the holder may be gone
            self._local.held = None
            raise StoreError(TRANSFER_FAIL, f"writing {key!r} failed: {e}") from None
        request = PutCommitRequest(core.client_id, held.id, key, stored, rep.address, config)
        try:
            self._master("put_commit", request, OkReply, must_finish=True)
        except RpcError as e:
            if e.code not in _KEY_REFUSALS:  # the front is still ours after those
                self._local.held = None
            if e.code == MasterErrorCode.INVALID_PARAMS:  # not a reservation this master knows
                return False
            raise as_store_error(e) from None
        held.advance(stored)
        core.direct_puts.append((key, [(rep.segment, rep.address, stored)]))
        self.hits += 1
        return True

    def _reserve(self, stored: int, release: int) -> Held | None:
        """A new reservation for this thread (handing ``release``'s rest back), or ``None``."""
        self._local.held = None
        if time.monotonic() < self._reserve_after:
            return None
        request = ReserveRequest(self.core.client_id, max(self._reserve_ahead, 4 * stored),
                                 release)
        sent = time.monotonic()
        try:
            reply = self._master("reserve_space", request, ReserveReply, must_finish=False)
        except _Unreachable:
            return None
        except RpcError as e:
            if e.code in (ErrorCode.UNKNOWN_METHOD, MasterErrorCode.PERMISSION_DENIED):
                self._reserve_ahead = 0  # an older or tenant-scoped master: two-phase only
            else:  # no segment can spare the space now: ask again in a while
                self._reserve_after = sent + 1.0
            return None
        held = self._local.held = Held(reply, sent)
        return held


def _split(reqs: list[TransferRequest], limit: int) -> list[list[TransferRequest]]:
    """``reqs`` cut into groups of at most ``limit`` bytes each (requests split as needed)."""
    groups: list[list[TransferRequest]] = [[]]
    room = limit
    for r in reqs:
        done = 0
        while done < r.length:
            if room == 0:
                groups.append([])
                room = limit
            n = min(room, r.length - done)
            groups[-1].append(TransferRequest(r.opcode, r.local_addr + done, r.segment,
                                              r.remote_addr + done, n))
            done += n
            room -= n
    return groups
