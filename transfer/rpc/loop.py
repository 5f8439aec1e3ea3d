"""An event loop on a daemon thread, for sync code that needs async clients and servers.

vLLM workers and the sync transfer-engine API are plain threads; the RPC layer is asyncio.
:class:`BackgroundLoop` bridges the two: one daemon thread runs a (uvloop, when installed)
event loop forever, and any thread submits coroutines to it with :meth:`BackgroundLoop.run`.
:func:`get_background_loop` hands out one lazily created loop per process, and makes a new
one in a forked child (the parent's loop thread does not exist there).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["BackgroundLoop", "get_background_loop", "new_event_loop"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_uvloop: Any
try:  # uvloop is a core dependency off Windows; fall back to asyncio where it is missing.
    import uvloop as _uvloop
except ImportError:  # pragma: no cover - exercised only where uvloop is absent
    _uvloop = None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new uvloop event loop if uvloop is installed, else the default asyncio loop."""
    if _uvloop is not None:
        loop: asyncio.AbstractEventLoop = _uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


class BackgroundLoop:
    """A daemon thread running an event loop until :meth:`stop`.

    Thread-safe: :meth:`run` and :meth:`call_soon` may be called from any thread except the
    loop's own (where waiting for the loop would deadlock, so :meth:`run` refuses).
    """

    def __init__(self, name: str = "mooncake-rpc-loop") -> None:
        self._pid = os.getpid()
        self._loop = new_event_loop()
        self._started = threading.Event()
        self._stopped = False
        self._hooks: list[Callable[[], Callable[[], Awaitable[object]] | None]] = []
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=30.0):  # pragma: no cover - thread start failure
            raise RuntimeError(f"background loop thread {name!r} did not start")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop; schedule onto it only with thread-safe calls."""
        return self._loop

    @property
    def thread_id(self) -> int | None:
        """``threading.get_ident()`` of the loop thread."""
        return self._thread.ident

    @property
    def is_running(self) -> bool:
        """True while the loop thread is alive in this process."""
        return not self._stopped and self._pid == os.getpid() and self._thread.is_alive()

    def in_loop_thread(self) -> bool:
        """True when called from the loop's own thread."""
        return threading.get_ident() == self._thread.ident

    def _check_usable(self) -> None:
        if self._pid != os.getpid():
            raise RuntimeError(
                "this BackgroundLoop was created in another process (before a fork); "
                "create a new one in this process or use get_background_loop()"
            )
        if self._stopped or not self._thread.is_alive():
            raise RuntimeError("BackgroundLoop is stopped")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block until it finishes; return its result.

        On ``timeout`` the coroutine is cancelled and ``TimeoutError`` raised. Exceptions
        from the coroutine propagate unchanged.
        """
        try:
            self._check_usable()
            if self.in_loop_thread():
                raise RuntimeError(
                    "BackgroundLoop.run() called from the loop's own thread would deadlock; "
                    "await the coroutine instead"
                )
        except BaseException:
            coro.close()
            raise
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if fut.cancel() or not fut.done():
                raise TimeoutError(f"coroutine did not finish within {timeout}s") from None
            return fut.result()  # finished just as we timed out

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Schedule ``callback(*args)`` on the loop thread (thread-safe, does not wait)."""
        self._check_usable()
        self._loop.call_soon_threadsafe(callback, *args)

    def on_stop(self, hook: Callable[[], Awaitable[object]]) -> None:
        """Await ``hook()`` on the loop when it stops, before remaining tasks are cancelled.

        Clients and servers on this loop register their ``close``/``stop`` here, so stopping
        the loop closes their sockets (and fails their pending calls) instead of leaking
        them. Bound methods are held weakly: registering does not keep an object alive.
        """
        ref: Callable[[], Callable[[], Awaitable[object]] | None]
        if inspect.ismethod(hook):
            ref = weakref.WeakMethod(hook)
        else:
            def ref() -> Callable[[], Awaitable[object]]:
                return hook
        if len(self._hooks) > 64:
            self._hooks = [r for r in self._hooks if r() is not None]
        self._hooks.append(ref)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel outstanding tasks, stop the loop and join the thread. Idempotent."""
        if self._stopped or self._pid != os.getpid():
            self._stopped = True
            return
        self._stopped = True
        if self._thread.is_alive():
            if self.in_loop_thread():
                raise RuntimeError("BackgroundLoop.stop() called from the loop's own thread")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - a task refusing to die
                logger.warning("background loop thread did not exit within %.1fs", timeout)

    def __enter__(self) -> BackgroundLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._started.set)
        try:
            loop.run_forever()
        finally:
            try:
                for ref in self._hooks:
                    hook = ref()
                    if hook is None:
                        continue
                    try:
                        loop.run_until_complete(asyncio.wait_for(hook(), 5.0))
                    except Exception:
                        logger.exception("stop hook %r of background loop failed", hook)
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in tasks:
                    t.cancel()
                if tasks:
                    loop.run_until_complete(
                        asyncio.wait(tasks, timeout=5.0)
                    )
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                try:
                    loop.close()
                except OSError as e:  # uvloop: transports nobody closed are still open
                    logger.warning("background loop closed with open transports: %s", e)


_global_lock = threading.Lock()
_global: BackgroundLoop | None = None
_abandoned: list[BackgroundLoop] = []


def get_background_loop() -> BackgroundLoop:
    """The process-wide :class:`BackgroundLoop`, created on first use.

    Fork-safe: in a child process the parent's loop thread is gone, so a new loop (and
    thread) is created there on first use.
    """
    global _global
    inst = _global
    if inst is not None and inst.is_running:
        return inst
    with _global_lock:
        inst = _global
        if inst is None or not inst.is_running:
            if inst is not None and inst._pid != os.getpid():
                # Keep the parent's loop object alive: tearing down a loop that believes it
                # is running (it was, in the parent) is not safe.
                _abandoned.append(inst)
            inst = _global = BackgroundLoop(name="mooncake-rpc-global-loop")
        return inst


def _after_fork_in_child() -> None:
    global _global_lock
    # The parent may have held the lock while forking; a fresh one is safe in the child.
    _global_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
