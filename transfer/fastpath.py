"""The shm fast path: a whole batch checked with a few numpy operations and copied as merged runs.

Why a separate path: on the same host a 64 KiB x 128 batch copies in ~250 us, while the general
planner (per-request region lookups, routes, slices, one task per path, per-request status
objects) costs more than that. When every request of a batch goes to one shm-reachable peer and
both sides are plain host memory, this path instead

- checks types and lengths of the whole batch with C-level passes (``map``/``set``/``min``),
- merges requests that continue each other on both sides into runs (KV blocks usually do),
  range-checks each run once by bisection over the sorted buffers of both sides, and copies
  it with one ``ctypes.memmove`` (which releases the GIL),
- copies inline in ``submit`` when the batch is small (a thread hand-off costs more than the
  copy), else on the shm transport's threads, split evenly over them, in one task,
- and records completion as one lengths sequence, not one object per request.

A blocking caller (``Engine.transfer_blocking``) runs all of it on its own thread
(:meth:`ShmFastPath.run_blocking`): no hop to the loop and back.

CUDA local memory qualifies too. Its runs are cut at the staging chunk size and packed into
pinned chunks: one batched device copy fills (or drains) them all, and the chunks move to or
from the peer's pages as merged runs, like host memory. On an H200 host 512 pieces of 32 KiB
(a KV block per layer, as the connector puts them) took 6.7-10.2 ms as one synchronous copy
each and 1.5-3.0 ms batched into pinned memory; batched straight into the peer's (pageable)
pages, 8.5 ms. A run that finds no free chunk is copied straight to or from the peer's pages.

Anything unusual - another transport, file buffers, a bad address, a peer file that cannot be
mapped - returns ``None`` and the batch takes the general path, which produces the precise
per-request error or status. So this path decides no failure on its own, except a device copy
failing on the loop's path (a CUDA error), which fails the batch.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from itertools import islice
from operator import add, attrgetter, eq
from typing import TYPE_CHECKING

from transfer.batch import Batch, RequestStatus, TransferRequest
from transfer.errors import AddressError
from transfer.memory import MemoryRegistry, Region, memory_at
from transfer.staging import BatchStaging, Staging, copy_regions, load_region, store_region
from transfer.transports.base import Opcode
from transfer.transports.shm import ShmTransport, copy_runs

if TYPE_CHECKING:
    from transfer.descriptor import PeerSegment

__all__ = ["CopyPlan", "ShmFastPath"]

logger = logging.getLogger(__name__)

_local_addr = attrgetter("local_addr")
_remote_addr = attrgetter("remote_addr")
_length = attrgetter("length")
_opcode = attrgetter("opcode")
_segment = attrgetter("segment")
#: Batches up to this size are copied on the loop inside ``submit``: a hand-off to a copy
#: thread and back costs more than copying this much (~0.3 ms at memcpy speed).
INLINE_COPY_BYTES = 8 << 20

#: ``(destination, source, length)`` runs, addresses in this process.
Runs = list[tuple[int, int, int]]


class CopyPlan:
    """A validated batch: its merged copy runs and the per-request lengths for status.
    ``device``: runs whose local side is CUDA memory, ``(opcode, region, local address, mapped
    peer address, length)``, staged through pinned chunks (:meth:`ShmFastPath.copy_device`)."""

    __slots__ = ("device", "lengths", "runs", "total")

    def __init__(self, runs: Runs, lengths: list[int], total: int,
                 device: list[tuple[Opcode, Region, int, int, int]] | None = None) -> None:
        self.runs = runs
        self.lengths = lengths
        self.total = total
        self.device = device or []

    def parts(self, n: int) -> list[Runs]:
        """The runs cut into ``n`` pieces of nearly equal bytes (for parallel copy threads)."""
        return split_runs(self.runs, self.total, n)


def split_runs(runs: Runs, total: int, n: int) -> list[Runs]:
    """``runs`` (``total`` bytes) cut into ``n`` pieces of nearly equal bytes, or left whole
    when there is less than 1 MiB per piece."""
    if n <= 1 or total < n * (1 << 20):
        return [runs]
    share = -(-total // n)
    parts: list[Runs] = [[]]
    room = share
    for dst, src, length in runs:
        off = 0
        while off < length:
            if room == 0:
                parts.append([])
                room = share
            take = min(room, length - off)
            parts[-1].append((dst + off, src + off, take))
            off += take
            room -= take
    return parts


class ShmFastPath:
    """Plans batches for the shm fast path; one per engine."""

    def __init__(self, registry: MemoryRegistry, transport: ShmTransport,
                 staging: Staging | None = None) -> None:
        self._registry = registry
        self._transport = transport
        self._staging = staging

    def plan(self, requests: Sequence[TransferRequest], peer: PeerSegment) -> CopyPlan | None:
        """The copy plan of ``requests`` (all to ``peer``), or None to use the general path."""
        # Whole-batch checks first, each one C-level pass over the batch.
        if set(map(type, requests)) != {TransferRequest} \
                or set(map(_segment, requests)) != {peer.name}:
            return None
        ops = list(map(_opcode, requests))
        la = list(map(_local_addr, requests))
        ra = list(map(_remote_addr, requests))
        lengths = list(map(_length, requests))
        if set(map(type, la)) != {int} or set(map(type, ra)) != {int} \
                or set(map(type, lengths)) != {int} or min(lengths) <= 0:
            return None
        # Merge requests that continue each other on both sides into runs (the common case,
        # one contiguous run, is recognised with C-level passes)...
        total = sum(lengths)
        if len(set(ops)) == 1 and all(map(eq, islice(la, 1, None), map(add, la, lengths))) \
                and all(map(eq, islice(ra, 1, None), map(add, ra, lengths))):
            spans = [(ops[0], la[0], ra[0], total)]
        else:
            spans = _merge(ops, la, ra, lengths)
        # ... and range-check each run: a run inside one registered buffer on both sides has
        # every one of its (positive-length) requests inside it too.
        runs: Runs = []
        staged: list[tuple[Opcode, Region, int, int, int]] = []
        bases: dict[int, int] = {}
        find_local, find_remote = self._registry.find, peer.find
        for op, lo, ro, n in spans:
            if op is not Opcode.WRITE and op is not Opcode.READ:
                return None
            try:
                local = find_local(lo, n)
                remote = find_remote(ro, n)
            except AddressError:
                return None
            if (not local.direct and not local.is_cuda) \
                    or remote.shm_name is None or not remote.location.startswith("cpu:"):
                return None
            base = bases.get(remote.address)
            if base is None:
                try:
                    base = self._transport.map_range(remote.shm_name, remote.shm_offset,
                                                     remote.length)
                except (AddressError, OSError, ValueError):
                    return None  # the general path reports (and retries) mapping failures
                bases[remote.address] = base
            mapped = base + (ro - remote.address)
            if not local.direct:
                staged.append((op, local, lo, mapped, n))
                continue
            runs.append((mapped, lo, n) if op is Opcode.WRITE else (lo, mapped, n))
        return CopyPlan(runs, lengths, total, staged)

    def execute(self, batch_id: int, requests: Sequence[TransferRequest],
                plan: CopyPlan) -> Batch:
        """Start (or, when small and host-only, finish) copying ``plan``; returns the batch."""
        if not plan.device and plan.total <= INLINE_COPY_BYTES:
            copy_runs(plan.runs)
            return Batch.completed(batch_id, requests, plan.lengths)
        batch = Batch(batch_id, requests)
        batch.task = asyncio.create_task(self._run(batch, plan))
        return batch

    def run_blocking(self, requests: Sequence[TransferRequest],
                     peer: PeerSegment) -> CopyPlan | None:
        """Plan and copy ``requests`` on the calling thread (never the loop's); returns the
        finished plan, or None (nothing copied) to use the general path.

        For a blocking caller the hop to the loop and back costs about as much as copying a
        64 KiB x 128 batch, so the whole batch runs here; big ones also borrow the transport's
        copy threads.
        """
        plan = self.plan(requests, peer)
        if plan is None:
            return None
        self._copy_host(plan.runs, plan.total)
        if plan.device:
            try:
                self.copy_device(plan.device)
            except Exception:  # noqa: BLE001 - the general path redoes it and reports why
                logger.warning("device copy on the shm fast path failed; the general path "
                               "takes over", exc_info=True)
                return None
        return plan

    def _copy_host(self, runs: Runs, total: int) -> None:
        """Copy host runs on this thread (not the loop's), big ones split over the transport's
        copy threads too."""
        if total <= INLINE_COPY_BYTES:
            copy_runs(runs)
        else:
            self._transport.copy_runs_blocking(split_runs(runs, total, self._transport.workers))

    def copy_device(self, device: Sequence[tuple[Opcode, Region, int, int, int]]) -> None:
        """Copy a plan's CUDA runs on this thread (not the loop's, nor a transport copy thread).

        Runs are cut at the chunk size and packed into pinned chunks: one batched device copy
        (:func:`transfer.cuda.copy_many`) fills the chunks of WRITEs, merged memmoves carry
        them to the peer's pages (and READs back), one batched copy drains the READs' chunks.
        A piece that finds no free chunk is copied straight to or from the peer's pages."""
        staged = BatchStaging(self._staging)
        loads: list[tuple[Region, int, memoryview]] = []
        stores: list[tuple[Region, int, memoryview]] = []
        runs: Runs = []
        direct: list[tuple[Opcode, Region, int, int, int]] = []
        try:
            for op, region, local, mapped, n in device:
                step = self._staging.chunk_size if self._staging is not None else n
                for off in range(0, n, step):
                    k = min(step, n - off)
                    got = staged.pinned(region, k)
                    if got is None:
                        direct.append((op, region, local + off, mapped + off, k))
                    elif op is Opcode.WRITE:
                        loads.append((region, local + off, got[0]))
                        runs.append((mapped + off, got[1], k))
                    else:
                        runs.append((got[1], mapped + off, k))
                        stores.append((region, local + off, got[0]))
            copy_regions(loads, load=True)
            runs = merge_runs(runs)
            self._copy_host(runs, sum(n for _, _, n in runs))
            copy_regions(stores, load=False)
            for op, region, local, mapped, n in direct:
                copy = load_region if op is Opcode.WRITE else store_region
                copy(region, local, memory_at(mapped, n))
        finally:
            staged.release()

    async def _run(self, batch: Batch, plan: CopyPlan) -> None:
        loop = asyncio.get_running_loop()
        try:
            work = [self._transport.copy_runs(plan.parts(self._transport.workers))]
            if plan.device:  # on the default executor: it uses the transport's copy threads
                work.append(loop.run_in_executor(None, self.copy_device, plan.device))
            for outcome in await asyncio.gather(*work, return_exceptions=True):
                if isinstance(outcome, BaseException):  # raised once both copies are over
                    raise outcome
            done = RequestStatus.COMPLETED
            for r, n in zip(batch.results, plan.lengths):
                r.status, r.transferred = done, n
        except asyncio.CancelledError:
            for r in batch.results:
                r.status, r.error = RequestStatus.FAILED, "cancelled (engine closed)"
            raise
        except (OSError, RuntimeError, ImportError) as e:  # a device copy failed
            for r in batch.results:
                r.status, r.error = RequestStatus.FAILED, f"copy failed: {e}"
        finally:
            batch._finish()


def merge_runs(runs: Runs) -> Runs:
    """``(dst, src, length)`` runs with each one that continues the previous on both sides
    joined to it (staged pieces of one object are contiguous in their chunk and at the peer)."""
    out: Runs = []
    for dst, src, n in runs:
        if out and out[-1][0] + out[-1][2] == dst and out[-1][1] + out[-1][2] == src:
            d0, s0, n0 = out[-1]
            out[-1] = (d0, s0, n0 + n)
        else:
            out.append((dst, src, n))
    return out


def _merge(ops: list[Opcode], la: list[int], ra: list[int],
           lengths: list[int]) -> list[tuple[Opcode, int, int, int]]:
    """``(opcode, local, remote, length)`` runs of requests that continue each other."""
    spans: list[tuple[Opcode, int, int, int]] = []
    op0, l0, r0, n0 = ops[0], la[0], ra[0], 0
    for op, lo, ro, n in zip(ops, la, ra, lengths):
        if op is op0 and lo == l0 + n0 and ro == r0 + n0:
            n0 += n
        else:
            spans.append((op0, l0, r0, n0))
            op0, l0, r0, n0 = op, lo, ro, n
    spans.append((op0, l0, r0, n0))
    return spans
