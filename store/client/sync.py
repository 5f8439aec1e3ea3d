"""The blocking store client, usable from any thread (vLLM workers are not async).

Every call runs the async core on the transfer engine's background loop, in exactly one hop per
operation. The hop is a lean one (:class:`_Hop`): ``call_soon_threadsafe`` starts the task and its
done-callback releases a plain lock the caller blocks on - about 5-10 us cheaper per call than
``asyncio.run_coroutine_threadsafe``, whose ``concurrent.futures`` chaining is built for more
than a blocking wait needs, and small-object latency is dominated by such fixed costs. Single-object methods
raise :class:`~store.client.errors.StoreError`; batch methods return one result per key (``None``
or a size on success, the error otherwise) so one bad key never fails its neighbours.
"""
from __future__ import annotations

import _thread
import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

from store.master import ReplicateConfig
from transfer.config import MooncakeConfig
from transfer.engine import Engine, get_engine

from .core import AsyncStoreClient
from .direct import FALLBACK, CallerThreadPath
from .errors import MasterErrorCode, StoreError
from .tensors import tensor_from_bytes, tensor_parts

__all__ = ["StoreClient"]

_DEFAULT = ReplicateConfig()


async def _loop_and_thread() -> tuple[asyncio.AbstractEventLoop, int]:
    return asyncio.get_running_loop(), threading.get_ident()


class _Hop:
    """Runs a coroutine on ``loop`` (owned by another thread) and blocks for its result."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread_id: int) -> None:
        self.loop = loop
        self.thread_id = thread_id

    def __call__(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        if threading.get_ident() == self.thread_id:
            coro.close()
            raise RuntimeError("a blocking StoreClient call from the engine's own loop thread "
                               "would deadlock; use the AsyncStoreClient (client.core) there")
        lock = _thread.allocate_lock()
        lock.acquire()
        box: list[asyncio.Task[Any]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            box.append(task)
            task.add_done_callback(lambda _t: lock.release())

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise
        if not lock.acquire(timeout=-1 if timeout is None else timeout):
            self.loop.call_soon_threadsafe(lambda: box[0].cancel() if box else coro.close())
            raise TimeoutError(f"store operation did not finish within {timeout}s")
        return box[0].result()


class StoreClient:
    """Blocking facade over :class:`AsyncStoreClient` (see :mod:`store.client.core`).

    ``engine`` defaults to the process-wide engine (:func:`transfer.engine.get_engine`), which
    the client does not close. Keyword arguments go to :class:`AsyncStoreClient`
    (``global_segment_size``, ``local_buffer_size``, ``master_address``, ``etcd_endpoints``,
    ``checksum``, ``heartbeat_interval``...).

    Single-object ``get``/``get_into``/``put``/``put_from`` run on the calling thread
    (:mod:`.direct`) when they can, skipping the loop hop; ``caller_thread=False`` sends every
    call through the loop.
    """

    def __init__(self, config: MooncakeConfig | None = None, *, engine: Engine | None = None,
                 own_engine: bool = False, timeout: float = 120.0, caller_thread: bool = True,
                 **kwargs: Any) -> None:
        if engine is None:
            engine = Engine(config).start_in() if own_engine else get_engine(config)
        self.engine = engine
        self._own_engine = own_engine
        self.timeout = timeout
        self.core = AsyncStoreClient(engine, config, **kwargs)
        try:
            self._hop = _Hop(*engine.run(_loop_and_thread(), timeout))
            engine.run(self.core.start(), timeout)
            self.direct: CallerThreadPath | None = (
                CallerThreadPath(self.core, self._hop.loop, self._hop.thread_id, timeout)
                if caller_thread else None)
        except BaseException:
            if own_engine:
                engine.close_in()
            raise

    def _run(self, coro: Any) -> Any:
        return self._hop(coro, self.timeout)

    @property
    def segment_name(self) -> str:
        """This client's transfer-engine segment name (what ``preferred_segment`` names)."""
        return self.engine.name

    def close(self) -> None:
        """Unmount contributed memory (its objects are lost) and stop; idempotent."""
        direct, self.direct = self.direct, None
        if direct is not None:
            direct.close()
        self._run(self.core.close())
        if self._own_engine:
            self.engine.close_in()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes --------------------------------------------------------------------------------

    def put(self, key: str, value: Any, config: ReplicateConfig = _DEFAULT) -> None:
        """Store a bytes-like ``value`` under ``key`` (copied through the staging buffer)."""
        if self.direct is not None and self.direct.put(key, value, config) is not FALLBACK:
            return
        _raise(self._run(self.core.put_bytes([key], [[value]], config))[0])

    def put_parts(self, key: str, *parts: Any, config: ReplicateConfig = _DEFAULT) -> None:
        """Store the concatenation of ``parts`` without joining them first."""
        _raise(self._run(self.core.put_bytes([key], [list(parts)], config))[0])

    def put_batch(self, keys: Sequence[str], values: Sequence[Any],
                  config: ReplicateConfig = _DEFAULT) -> list[StoreError | None]:
        if len(keys) != len(values):
            raise StoreError(MasterErrorCode.INVALID_PARAMS,
                             f"{len(keys)} keys but {len(values)} values")
        if len(keys) == 1 and self.direct is not None:  # compat's single-key puts land here
            got = _one(self.direct.put, keys[0], values[0], config)
            if got is not FALLBACK:
                return [got]
        return self._run(self.core.put_bytes(list(keys), [[v] for v in values], config))

    def get(self, key: str) -> bytes:
        """The value of ``key``; :class:`StoreError` (``not_found``...) if it cannot be read."""
        if self.direct is not None:
            got = self.direct.get(key)
            if got is not FALLBACK:
                return got  # type: ignore[no-any-return]
        return _value(self._run(self.core.get_bytes([key]))[0])

    def get_batch(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        if len(keys) == 1 and self.direct is not None:
            got = _one(self.direct.get, keys[0])
            if got is not FALLBACK:
                return [got]
        return self._run(self.core.get_bytes(list(keys)))

    # -- zero copy ----------------------------------------------------------------------------

    def register(self, buffer: Any, length: int | None = None) -> int:
        """Register memory for ``put_from``/``get_into``; returns its address."""
        return int(self._run(self.engine.register(buffer, length)))

    def unregister(self, address: int) -> None:
        self._run(self.engine.unregister(address))

    def put_from(self, key: str, address: int, size: int,
                 config: ReplicateConfig = _DEFAULT) -> None:
        """Store ``size`` bytes of registered memory at ``address``, written straight from it."""
        if (self.direct is not None
                and self.direct.put_from(key, address, size, config) is not FALLBACK):
            return
        _raise(self._run(self.core.put_pieces([key], [[(address, size)]], config))[0])

    def batch_put_from(self, keys: Sequence[str], addresses: Sequence[int], sizes: Sequence[int],
                       config: ReplicateConfig = _DEFAULT) -> list[StoreError | None]:
        _check_lengths(keys, addresses, sizes)
        if len(keys) == 1 and self.direct is not None:  # compat's put_from lands here
            got = _one(self.direct.put_from, keys[0], addresses[0], sizes[0], config)
            if got is not FALLBACK:
                return [got]
        return self._run(self.core.put_pieces(
            list(keys), [[(a, n)] for a, n in zip(addresses, sizes)], config))

    def batch_put_from_multi_buffers(self, keys: Sequence[str],
                                     addresses: Sequence[Sequence[int]],
                                     sizes: Sequence[Sequence[int]],
                                     config: ReplicateConfig = _DEFAULT) -> list[StoreError | None]:
        """Each object is the concatenation of several registered buffers."""
        _check_lengths(keys, addresses, sizes)
        return self._run(self.core.put_pieces(list(keys), _multi(addresses, sizes), config))

    def get_into(self, key: str, address: int, size: int) -> int:
        """Read ``key`` into registered memory of ``size`` bytes; returns the value's size."""
        if self.direct is not None:
            got = self.direct.get_into(key, address, size)
            if got is not FALLBACK:
                return int(got)
        return _value(self._run(self.core.get_pieces([key], [[(address, size)]]))[0])

    def batch_get_into(self, keys: Sequence[str], addresses: Sequence[int],
                       sizes: Sequence[int]) -> list[int | StoreError]:
        _check_lengths(keys, addresses, sizes)
        if len(keys) == 1 and self.direct is not None:  # compat's get_into lands here
            got = _one(self.direct.get_into, keys[0], addresses[0], sizes[0])
            if got is not FALLBACK:
                return [got]
        return self._run(self.core.get_pieces(list(keys),
                                              [[(a, n)] for a, n in zip(addresses, sizes)]))

    def batch_get_into_multi_buffers(self, keys: Sequence[str],
                                     addresses: Sequence[Sequence[int]],
                                     sizes: Sequence[Sequence[int]]) -> list[int | StoreError]:
        _check_lengths(keys, addresses, sizes)
        return self._run(self.core.get_pieces(list(keys), _multi(addresses, sizes)))

    # -- tensors ------------------------------------------------------------------------------

    def put_tensor(self, key: str, tensor: Any, config: ReplicateConfig = _DEFAULT) -> None:
        """Store a torch tensor (dtype and shape travel in a small header)."""
        _raise(self._run(self.core.put_bytes([key], [tensor_parts(tensor)], config))[0])

    def get_tensor(self, key: str) -> Any:
        """The tensor stored under ``key`` (a CPU tensor)."""
        return tensor_from_bytes(self.get(key))

    # -- metadata -----------------------------------------------------------------------------

    def exists(self, key: str, grant_lease: bool = False) -> bool:
        return self.batch_exists([key], grant_lease)[0]

    def batch_exists(self, keys: Sequence[str], grant_lease: bool = False) -> list[bool]:
        keys = list(keys)
        if self.direct is not None:
            got = self.direct.exists(keys, grant_lease)
            if got is not FALLBACK:
                return got
        return list(self._run(self.core.exists(keys, grant_lease)))

    def get_size(self, key: str) -> int:
        """The value's size in bytes (also grants the read lease, like a get)."""
        found = _value(self._run(self.core.replicas([key]))[0])
        return self.core.value_size(found[0])

    def remove(self, key: str, force: bool = False) -> None:
        code = self._run(self.core.remove([key], force))[0]
        if code:
            raise StoreError(code, f"cannot remove {key!r}")

    def batch_remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        return list(self._run(self.core.remove(list(keys), force)))

    def replicate(self, keys: Sequence[str], segment: str) -> list[int]:
        """Add a replica of each complete object on ``segment``; per-key codes (0 = added).
        What the Conductor calls to make a hot prefix local to the instance it chose."""
        return list(self._run(self.core.replicate(list(keys), segment)))

    def remove_all(self, force: bool = False) -> int:
        return int(self._run(self.core.remove_all(force)))


def _one(op: Any, *args: Any) -> Any:
    """A caller-thread op's result as a batch entry: the value, the error, or FALLBACK."""
    try:
        return op(*args)
    except StoreError as e:
        return e


def _raise(result: StoreError | None) -> None:
    if result is not None:
        raise result


def _value(result: Any) -> Any:
    if isinstance(result, StoreError):
        raise result
    return result


def _check_lengths(keys: Sequence[Any], *others: Sequence[Any]) -> None:
    for other in others:
        if len(other) != len(keys):
            raise StoreError(MasterErrorCode.INVALID_PARAMS,
                             f"{len(keys)} keys but {len(other)} buffers/sizes")


def _multi(addresses: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]
           ) -> list[list[tuple[int, int]]]:
    out = []
    for addrs, lens in zip(addresses, sizes):
        if len(addrs) != len(lens):
            raise StoreError(MasterErrorCode.INVALID_PARAMS,
                             f"{len(addrs)} buffers but {len(lens)} sizes")
        out.append(list(zip(addrs, lens)))
    return out
