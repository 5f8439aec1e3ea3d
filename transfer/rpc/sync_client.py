"""A thread-safe blocking client, for code that is not async (vLLM workers, sync APIs).

:class:`SyncRpcClient` owns an :class:`~transfer.rpc.RpcClient` living on a
:class:`~transfer.rpc.BackgroundLoop`. Why not ``run_coroutine_threadsafe(client.call(...))``:
that costs a Task, two chained futures and their callbacks per call. Instead the calling
thread hands the loop one callback (``call_soon_threadsafe``) that encodes and writes the
frame and files a tiny :class:`_Slot` in the connection's pending table; the loop completes
the slot directly from ``data_received`` and the caller wakes on a plain lock. Only when the
client is not connected yet (or the socket is backed up) does the call go through a Task.
"""
from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from typing import Any, TypeVar

import msgspec

from .client import RpcClient, _ClientConnection
from .errors import RpcConnectionError, RpcTimeoutError
from .loop import BackgroundLoop, get_background_loop
from .wire import DEFAULT_MAX_FRAME_SIZE

__all__ = ["SyncRpcClient"]

R = TypeVar("R")
_POLL_S = 1.0  # how often a long wait checks that the loop is still alive


class _Slot:
    """One blocking call's rendezvous: completed on the loop thread, read by the caller.

    The lock starts held; completing releases it, so the caller's ``acquire`` is the wait.
    """

    __slots__ = ("_done", "conn", "exc", "lock", "request_id", "result", "task")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.result: Any = None
        self.exc: BaseException | None = None
        self._done = False
        self.conn: _ClientConnection | None = None
        self.request_id = 0
        self.task: asyncio.Task[Any] | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        if not self._done:
            self._done = True
            self.result = result
            self.lock.release()

    def set_exception(self, exc: BaseException) -> None:
        if not self._done:
            self._done = True
            self.exc = exc
            self.lock.release()

    def complete_from(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.set_exception(RpcConnectionError("call cancelled (client closing)"))
        elif task.exception() is not None:
            self.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            self.set_result(task.result())


class SyncRpcClient:
    """Blocking, thread-safe RPC client; any number of threads may call concurrently.

    All calls share one connection (and one :class:`RpcClient`) on ``loop``, by default the
    process-wide :func:`~transfer.rpc.get_background_loop`. Do not call it from the loop's
    own thread (a sync handler on the same loop): that would deadlock, so it raises.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        secret: bytes | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        connect_timeout: float = 5.0,
        loop: BackgroundLoop | None = None,
        tls: ssl.SSLContext | None = None,
        identity: str | None = None,
    ) -> None:
        self._background = loop if loop is not None else get_background_loop()
        self._client = RpcClient(host, port, secret=secret, max_frame_size=max_frame_size,
                                 connect_timeout=connect_timeout, tls=tls, identity=identity)
        self._pid = os.getpid()
        self._closed = False
        self._background.on_stop(self._client.close)

    @property
    def address(self) -> str:
        return self._client.address

    @property
    def connected(self) -> bool:
        return self._client.connected

    def _check(self) -> None:
        if self._pid != os.getpid():
            raise RuntimeError("SyncRpcClient cannot be used across fork(); create a new one "
                               "in the child process")
        if self._closed:
            raise RpcConnectionError(f"client for {self._client.address} is closed")
        if not self._background.is_running:
            raise RpcConnectionError(
                f"client for {self._client.address}: its background loop is stopped")
        if self._background.in_loop_thread():
            raise RuntimeError("SyncRpcClient called from its own event loop thread would "
                               "deadlock; use RpcClient there")

    def connect(self) -> None:
        """Connect and handshake now (otherwise the first call does)."""
        self._check()
        self._background.run(self._client.connect())

    def call(
        self,
        method: str,
        request: msgspec.Struct,
        response_type: type[R],
        timeout: float | None = 30.0,
    ) -> R:
        """Blocking :meth:`RpcClient.call`; same errors, same ``timeout`` meaning."""
        self._check()
        slot = _Slot()
        connected = self._client.connected
        self._background.loop.call_soon_threadsafe(
            self._start, slot, method, request, response_type, timeout)
        # Connecting is bounded separately by connect_timeout, as in RpcClient.call.
        wait = None if timeout is None else (
            timeout if connected else timeout + self._client.connect_timeout)
        if not slot.lock.acquire(timeout=_POLL_S if wait is None else min(wait, _POLL_S)):
            self._wait_long(slot, method, timeout, wait)
        if slot.exc is not None:
            raise slot.exc
        return slot.result  # type: ignore[no-any-return]

    def _wait_long(self, slot: _Slot, method: str, timeout: float | None,
                   wait: float | None) -> None:
        """Keep waiting in slices, so a stopped loop (which would never complete the slot)
        is noticed even when there is no timeout."""
        deadline = None if wait is None else time.monotonic() + wait - _POLL_S
        while True:
            if not self._background.is_running:
                raise RpcConnectionError(
                    f"{method!r} on {self._client.address}: the background loop stopped")
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if left <= 0:
                try:
                    self._background.loop.call_soon_threadsafe(self._withdraw, slot)
                except RuntimeError:  # the loop closed in the meantime: nothing to withdraw
                    pass
                raise RpcTimeoutError(
                    f"{method!r} on {self._client.address}: no response within {timeout}s")
            if slot.lock.acquire(timeout=left):
                return

    def _start(self, slot: _Slot, method: str, request: msgspec.Struct,
               response_type: type[Any], timeout: float | None) -> None:
        """Loop thread: send directly when connected, else run a full async call."""
        try:
            sent = self._client.start_call(slot, method, request, response_type)
        except BaseException as e:  # encoding error, frame too large
            slot.set_exception(e)
            return
        if sent is not None:
            slot.conn, slot.request_id = sent
            return
        task = asyncio.ensure_future(self._client.call(method, request, response_type, timeout))
        slot.task = task
        task.add_done_callback(slot.complete_from)

    @staticmethod
    def _withdraw(slot: _Slot) -> None:
        """Loop thread: forget a call whose caller stopped waiting."""
        slot._done = True
        if slot.conn is not None:
            slot.conn.pending.pop(slot.request_id, None)
        if slot.task is not None:
            slot.task.cancel()

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection; calls in flight fail with :class:`RpcConnectionError`."""
        if self._closed:
            return
        self._closed = True
        if self._pid == os.getpid() and self._background.is_running:
            self._background.run(self._client.close(), timeout)

    def __enter__(self) -> SyncRpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

