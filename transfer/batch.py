"""Batches: requests, per-request status, and the slicing/retry loop that runs them.

Why slices and paths: a large request is cut into ``slice_size`` pieces spread over
``streams_per_peer`` paths (tcp streams, copy threads, NICs) so one request uses every path at
once. A path that fails has its slices retried on the next path; after ``max_retries`` failed
attempts the requests those slices belong to fail with the cause of the last one. Requests whose
slices all landed complete even when a neighbour in the batch failed.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transfer.errors import TransferFailedError
from transfer.transports.base import Opcode, Slice, Transport, TransportError

__all__ = ["Batch", "RequestResult", "RequestStatus", "Route", "TransferRequest", "run_routes"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """Move ``length`` bytes between ``local_addr`` and ``remote_addr`` of ``segment``."""

    opcode: Opcode
    local_addr: int
    segment: str
    remote_addr: int
    length: int


class RequestStatus(enum.IntEnum):
    PENDING = 0
    COMPLETED = 1
    FAILED = 2


@dataclass(slots=True)
class RequestResult:
    status: RequestStatus = RequestStatus.PENDING
    transferred: int = 0
    error: str | None = None


class Batch:
    """A submitted batch; status is readable from any thread, :meth:`wait` from the loop."""

    __slots__ = ("_done", "_lengths", "_results", "id", "requests", "task")

    def __init__(self, batch_id: int, requests: Sequence[TransferRequest]) -> None:
        self.id = batch_id
        self.requests = requests if type(requests) is tuple else tuple(requests)
        self._results: list[RequestResult] | None = [RequestResult() for _ in requests]
        #: Set instead of ``_results`` by :meth:`completed`: per-request objects are only
        #: built if somebody asks for them (the shm fast path finishes most batches in submit).
        self._lengths: Sequence[int] | None = None
        self._done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def completed(cls, batch_id: int, requests: Sequence[TransferRequest],
                  lengths: Sequence[int]) -> Batch:
        """A batch whose every request already moved its ``lengths[i]`` bytes."""
        batch = cls.__new__(cls)
        batch.id = batch_id
        batch.requests = requests if type(requests) is tuple else tuple(requests)
        batch._results = None
        batch._lengths = lengths
        batch._done = asyncio.Event()
        batch._done.set()
        batch.task = None
        return batch

    @property
    def results(self) -> list[RequestResult]:
        """The live per-request results (mutated by the engine until :attr:`done`)."""
        if self._results is None:
            done = RequestStatus.COMPLETED
            self._results = [RequestResult(done, n) for n in self._lengths or ()]
        return self._results

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def status(self) -> list[RequestResult]:
        """A copy of every request's status, bytes moved and error."""
        if self._results is None:
            done = RequestStatus.COMPLETED
            return [RequestResult(done, n) for n in self._lengths or ()]
        return [RequestResult(r.status, r.transferred, r.error) for r in self._results]

    @property
    def ok(self) -> bool:
        if self._results is None:
            return True
        return all(r.status is RequestStatus.COMPLETED for r in self._results)

    async def wait(self, timeout: float | None = None) -> list[RequestResult]:
        """Wait until every request completed or failed; ``TimeoutError`` after ``timeout``."""
        if not self._done.is_set():
            await asyncio.wait_for(self._done.wait(), timeout)
        return self.status()

    def raise_for_status(self) -> None:
        """Raise :class:`TransferFailedError` naming the first failed request, if any."""
        if self._results is None:
            return
        for i, r in enumerate(self._results):
            if r.status is RequestStatus.FAILED:
                raise TransferFailedError(f"request {i} of batch {self.id} failed: {r.error}")
            if r.status is RequestStatus.PENDING:
                raise TransferFailedError(f"request {i} of batch {self.id} is still pending")

    def _finish(self) -> None:
        for r in self.results:
            if r.status is RequestStatus.PENDING:
                r.status, r.error = RequestStatus.FAILED, r.error or "batch ended early"
        self._done.set()


Owners = tuple[tuple[int, int], ...]  # (request index, bytes of this slice it owns)


@dataclass(slots=True)
class _Run:
    opcode: Opcode
    remote: int
    length: int
    owners: list[tuple[int, int]]
    parts: list[list[int]]  # local [address, length] pieces, in order


@dataclass(slots=True)
class Route:
    """Requests of one batch going to one peer over one transport.

    Requests that continue each other on both sides (same direction, local and remote both
    contiguous - e.g. consecutive KV blocks) are coalesced into one run before slicing, so a
    batch of many small requests costs a few large slices, not one round trip per request. On a
    transport that gathers (``Transport.gather``), requests that continue each other only on
    the remote side join the run too, as further local pieces: an object put from one page per
    layer into one replica.
    """

    transport: Transport
    peer_name: str
    peer_entry: dict[str, Any]
    peer_buffers: list[dict[str, Any]]
    on_failure: Callable[[], None]
    runs: list[_Run] = field(default_factory=list)
    items: list[tuple[Owners, Slice]] = field(default_factory=list)

    def add(self, index: int, opcode: Opcode, local: int, remote: int, length: int) -> None:
        if self.runs:
            run = self.runs[-1]
            if run.opcode == opcode and run.remote + run.length == remote:
                last = run.parts[-1]
                if last[0] + last[1] == local:
                    last[1] += length
                elif self.transport.gather:
                    run.parts.append([local, length])
                else:
                    self.runs.append(_Run(opcode, remote, length, [(index, length)],
                                          [[local, length]]))
                    return
                run.owners.append((index, length))
                run.length += length
                return
        self.runs.append(_Run(opcode, remote, length, [(index, length)], [[local, length]]))

    def cut(self, slice_size: int) -> None:
        """Cut every run into slices of at most ``slice_size`` bytes."""
        for run in self.runs:
            owners = _chunks(run.owners, run.length, slice_size, addresses=False)
            local = _chunks(run.parts, run.length, slice_size, addresses=True)
            for off, parts, pieces in zip(range(0, run.length, slice_size), owners, local):
                self.items.append((parts, Slice(run.opcode, pieces[0][0], run.remote + off,
                                                sum(n for _, n in pieces),
                                                pieces if len(pieces) > 1 else ())))
        self.runs.clear()


def _chunks(spans: Sequence[Sequence[int]], total: int, size: int,
            addresses: bool) -> list[tuple[tuple[int, int], ...]]:
    """``(key, length)`` spans covering ``total`` bytes, regrouped into chunks of ``size``
    bytes: request owners (the key stays the request index) or local pieces (``addresses``:
    the key is an address, which moves on with the bytes taken)."""
    out: list[tuple[tuple[int, int], ...]] = []
    it = iter(spans)
    key, left = next(it)
    for off in range(0, total, size):
        need = min(size, total - off)
        got: list[tuple[int, int]] = []
        while need:
            take = min(need, left)
            got.append((key, take))
            need -= take
            left -= take
            if addresses:
                key += take
            if left == 0:
                key, left = next(it, (0, 0))
        out.append(tuple(got))
    return out


async def run_routes(batch: Batch, routes: Sequence[Route], *, paths: int, max_retries: int,
                     after: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run every route's slices over ``paths`` parallel paths with retries; fill ``batch``."""
    failed: dict[int, str] = {}
    groups = []
    for route in routes:
        n = max(1, min(paths, len(route.items)))
        for p in range(n):
            groups.append(_run_group(batch, route, route.items[p::n], p, max_retries, failed))
    try:
        await asyncio.gather(*groups)
        for i, r in enumerate(batch.results):
            if i in failed:
                r.status, r.error = RequestStatus.FAILED, failed[i]
            elif r.transferred >= batch.requests[i].length:
                r.status = RequestStatus.COMPLETED
        if after is not None:
            await after()
    except asyncio.CancelledError:
        for r in batch.results:
            if r.status is RequestStatus.PENDING:
                r.status, r.error = RequestStatus.FAILED, "cancelled (engine closed)"
        raise
    finally:
        batch._finish()


async def _run_group(batch: Batch, route: Route, items: list[tuple[Owners, Slice]], path: int,
                     max_retries: int, failed: dict[int, str]) -> None:
    slices = [s for _, s in items]
    error = "no attempt made"
    for attempt in range(max_retries + 1):
        try:
            await route.transport.execute(route.peer_name, route.peer_entry, route.peer_buffers,
                                          slices, path=path + attempt)
        except TransportError as e:
            error = f"{route.transport.name}: {e}"
            logger.debug("batch %d: path %d attempt %d failed: %s", batch.id, path + attempt,
                         attempt, e)
            route.on_failure()
            if not e.retryable:
                break
            continue
        except Exception as e:  # a transport bug must fail the requests, not hang the batch
            logger.exception("transport %s raised unexpectedly", route.transport.name)
            error = f"{route.transport.name}: internal error: {e!r}"
            break
        for owners, _ in items:
            for index, n in owners:
                batch.results[index].transferred += n
        return
    for owners, _ in items:
        for index, _ in owners:
            failed.setdefault(index, error)
