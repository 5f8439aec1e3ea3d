"""Routing of RDMA work completions from a NIC's CQ to the asyncio futures awaiting them.

Why a dedicated thread per NIC: ``ibv_poll_cq`` is a non-blocking call on a ring in user memory;
calling it from the event loop would either busy-spin the loop or add a timer tick of latency to
every transfer. One poller thread per NIC spins only while work is outstanding (with a short
sleep so that two cores are not burnt on one idle CQ) and parks on a condition variable when
nothing is pending. Completions are handed to the loop in batches with
``call_soon_threadsafe``; a bad status becomes a :class:`TransportError` naming the status.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time

from transfer.transports.base import TransportError
from transfer.transports.rdma.verbs import Completion, NicDevice

__all__ = ["CompletionPoller", "WcError"]

logger = logging.getLogger(__name__)

POLL_BATCH = 64
IDLE_SLEEP_S = 20e-6


class WcError(TransportError):
    """A work request completed with an error status (``status_name``, e.g.
    ``IBV_WC_REM_ACCESS_ERR``)."""

    def __init__(self, message: str, status_name: str) -> None:
        super().__init__(message)
        self.status_name = status_name


class CompletionPoller:
    """Owns one NIC's CQ: hands out work-request ids and resolves their futures."""

    def __init__(self, nic: NicDevice) -> None:
        self._nic = nic
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"rdma-cq-{nic.name}",
                                        daemon=True)
        self._thread.start()

    def expect(self) -> tuple[int, asyncio.Future[None]]:
        """A fresh wr_id and the future its completion resolves. Call before posting so that a
        completion can never arrive for an id nobody waits on."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        wr_id = next(self._ids)
        with self._cond:
            if self._stopped:
                raise TransportError(f"{self._nic.name}: transport is closed", retryable=False)
            self._pending[wr_id] = (loop, future)
            self._cond.notify()
        return wr_id, future

    def forget(self, wr_id: int) -> None:
        """Stop waiting for ``wr_id`` (its post failed, or its QP was destroyed)."""
        with self._cond:
            self._pending.pop(wr_id, None)

    @property
    def outstanding(self) -> int:
        with self._cond:
            return len(self._pending)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
            try:
                completions = self._nic.poll(POLL_BATCH)
            except Exception as exc:  # a dead device: fail everyone instead of hanging
                logger.exception("%s: polling the CQ failed", self._nic.name)
                self._fail_all(TransportError(f"{self._nic.name}: CQ poll failed: {exc}"))
                time.sleep(0.01)
                continue
            if not completions:
                time.sleep(IDLE_SLEEP_S)
                continue
            self._dispatch(completions)

    def _dispatch(self, completions: list[Completion]) -> None:
        ready: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Completion]]] = {}
        with self._cond:
            for completion in completions:
                entry = self._pending.pop(completion.wr_id, None)
                if entry is None:
                    # Flushed WRs of a QP we already gave up on: nobody waits any more.
                    logger.debug("%s: completion for unknown wr_id %d (%s)", self._nic.name,
                                 completion.wr_id, completion.status_name)
                    continue
                loop, future = entry
                ready.setdefault(loop, []).append((future, completion))
        for loop, batch in ready.items():
            try:
                loop.call_soon_threadsafe(self._resolve, batch)
            except RuntimeError:
                pass  # the loop is closed; its awaiters are gone

    def _resolve(self, batch: list[tuple[asyncio.Future[None], Completion]]) -> None:
        for future, completion in batch:
            if future.done():
                continue
            if completion.ok:
                future.set_result(None)
            else:
                future.set_exception(WcError(
                    f"{self._nic.name}: work request failed with {completion.status_name} "
                    f"(vendor_err {completion.vendor_err:#x})", completion.status_name))

    def _fail_all(self, error: TransportError) -> None:
        with self._cond:
            pending = list(self._pending.values())
            self._pending.clear()
        for loop, future in pending:
            try:
                loop.call_soon_threadsafe(_fail, future, error)
            except RuntimeError:
                pass

    def close(self) -> None:
        """Stop the thread and fail whatever still waits. Idempotent."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._fail_all(TransportError(f"{self._nic.name}: transport closed", retryable=False))


def _fail(future: asyncio.Future[None], error: TransportError) -> None:
    if not future.done():
        future.set_exception(error)
