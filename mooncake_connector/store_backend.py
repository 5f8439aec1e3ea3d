"""The connector's view of the KV store: one small adapter over the Mooncake-compatible client API.

Why an adapter: two stores speak the same API (``setup``, ``register_buffer``, ``batch_is_exist``,
``batch_put_from_multi_buffers``, ``batch_get_into_multi_buffers``...) - ours (``store``) and the
real C++ Mooncake (``mooncake.store``), which is useful side by side in benchmarks. The connector
picks one with ``store_impl`` and never touches the client directly, so return codes are
interpreted in exactly one place and a dead store turns into ``StoreError`` / misses, never a crash.
"""
from __future__ import annotations

import enum
import importlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["STORE_IMPLS", "StagedOutcome", "StoreBackend", "StoreError", "StoreSettings"]

logger = logging.getLogger(__name__)

# store_impl -> module exporting MooncakeDistributedStore and ReplicateConfig.
STORE_IMPLS: dict[str, str] = {"store": "store", "mooncake": "mooncake.store"}
_MAX_KEYS_PER_CALL = 4096
# Mooncake codes at or below this are transfer/RPC/metadata failures (TRANSFER_FAIL -800,
# RPC_FAIL -900, ETCD -1000...): the store is unreachable. Above it (OBJECT_NOT_FOUND -704...)
# it answered, so the store is up.
_UNREACHABLE_RC = -800


class StoreError(RuntimeError):
    """The store could not be set up or answered a call with an error."""


class StagedOutcome(enum.IntEnum):
    """What became of one object of a staged put (see :meth:`StoreBackend.stage_commit`)."""

    SAVED = 0
    PRESENT = 1
    """Another writer had stored (or was storing) it: nothing to do for a cache."""
    FAILED = 2


@dataclass(frozen=True)
class StoreSettings:
    """Client settings in Mooncake's JSON vocabulary (the file ``MOONCAKE_CONFIG_PATH`` names)."""

    master_server_address: str = "127.0.0.1:50051"
    metadata_server: str = "P2PHANDSHAKE"
    local_hostname: str = "127.0.0.1"
    protocol: str = "tcp"
    device_name: str = ""
    global_segment_size: int = 0
    local_buffer_size: int = 64 << 20
    replica_num: int = 1

    @classmethod
    def from_sources(cls, inline: Mapping[str, Any] | None = None,
                     path: str | os.PathLike | None = None) -> "StoreSettings":
        """Merge, later wins: defaults < JSON file (``path`` or ``$MOONCAKE_CONFIG_PATH``) < inline.

        Mooncake keys this client does not use (``mode``, ``tenant_id``...) are ignored, as in
        Mooncake's own loader; sizes accept ``"4GB"`` strings via :func:`transfer.config.parse_size`.
        """
        from transfer.config import parse_size

        data: dict[str, Any] = {}
        path = path or os.environ.get("MOONCAKE_CONFIG_PATH")
        if path:
            try:
                loaded = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"cannot read store config {path}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise StoreError(f"store config {path} must hold a JSON object")
            data.update(_normalise(loaded))
        data.update(_normalise(inline or {}))
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for size_key in ("global_segment_size", "local_buffer_size"):
            if size_key in values:
                values[size_key] = parse_size(values[size_key])
        if "replica_num" in values:
            values["replica_num"] = int(values["replica_num"])
        return cls(**values)


def _normalise(layer: Mapping[str, Any]) -> dict[str, Any]:
    """One source's keys with Mooncake's alias ``master_server_addr`` spelled out, so a later
    source's alias overrides an earlier source's full name."""
    out = dict(layer)
    if "master_server_addr" in out:
        out.setdefault("master_server_address", out["master_server_addr"])
        del out["master_server_addr"]
    return out


class StoreBackend:
    """A connected store client plus the buffers registered with it (thread-safe calls).

    Why a health gate: a store client rides out a dead master by retrying for many seconds
    (ours: 15 s), and the scheduler must not stall that long per lookup. So ``exists`` can be
    bounded by a timeout, and a call that fails or times out marks the store *down* for
    ``retry_interval_s``: until then lookups answer "miss", loads fail and saves are skipped
    at once, and vLLM recomputes. The first call after the interval probes the store again.
    """

    def __init__(self, impl: str, settings: StoreSettings, *, retry_interval_s: float = 5.0) -> None:
        if impl not in STORE_IMPLS:
            raise StoreError(f"store_impl {impl!r}: allowed {sorted(STORE_IMPLS)}")
        try:
            module = importlib.import_module(STORE_IMPLS[impl])
            store_cls = module.MooncakeDistributedStore
        except (ImportError, AttributeError) as exc:
            raise StoreError(
                f"store_impl {impl!r} needs {STORE_IMPLS[impl]}.MooncakeDistributedStore, "
                f"which is not importable: {exc}") from exc
        self.impl = impl
        self.settings = settings
        self._client = store_cls()
        self._replicate = module.ReplicateConfig()
        self._replicate.replica_num = settings.replica_num
        rc = self._client.setup(settings.local_hostname, settings.metadata_server,
                                settings.global_segment_size, settings.local_buffer_size,
                                settings.protocol, settings.device_name,
                                settings.master_server_address)
        if rc != 0:
            raise StoreError(f"store setup failed (rc={rc}) for master {settings.master_server_address}")
        self._closed = False
        self.retry_interval_s = retry_interval_s
        self._down_until = 0.0
        self._gate = threading.Lock()
        self._probe: Future | None = None
        self._lookup_pool: ThreadPoolExecutor | None = None
        self._staged: Any = None

    # -- staged puts (ours only) ---------------------------------------------------------------
    def enable_staged_puts(self, window_s: float | None = None) -> bool:
        """Turn on :meth:`stage_begin` & co. (``store.client.staged``); ``False`` when this
        store cannot write an object in pieces (the real Mooncake's client has no such call)."""
        if self.impl != "store":
            return False
        from store.client.staged import StagedPut  # noqa: PLC0415 - ours only

        self._staged = StagedPut(self._client._c(), window_s=window_s,
                                 config=self._replicate.to_wire())
        return True

    def stage_begin(self, keys: Sequence[str], size: int) -> Any:
        """Reserve one object of ``size`` bytes per key; returns a handle at once (the master
        call runs in the background and writes queue behind it)."""
        if self._staged is None:
            raise StoreError("staged puts are not enabled")
        if not self.healthy:
            raise StoreError("store is down")
        try:
            return self._staged.begin(keys, [size] * len(keys))
        except Exception as exc:  # noqa: BLE001 - one error type for the connector
            raise StoreError(f"staged put refused: {exc}") from exc

    def stage_write(self, handle: Any, items: Sequence[tuple[str, int, Sequence[tuple[int, int]]]]) -> None:
        """Queue ``(key, offset, [(address, length)...])`` writes; returns at once."""
        try:
            self._staged.write_many(handle, items)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"staged write refused: {exc}") from exc

    def stage_commit(self, handle: Any) -> list[StagedOutcome]:
        """Wait for the writes and publish; per key what happened (failed objects are revoked)."""
        from store.client.staged import staged_error_is_exists  # noqa: PLC0415

        try:
            errors = self._staged.commit(handle)
        except Exception as exc:  # noqa: BLE001 - a broken store: every object failed
            self.mark_down(f"staged commit failed: {exc}")
            return [StagedOutcome.FAILED] * len(handle.keys)
        # Per-key failures (an incomplete object, a write that failed) do not mark the store
        # down: the connector puts those objects whole next, and that put judges the store.
        return [StagedOutcome.SAVED if e is None else
                StagedOutcome.PRESENT if staged_error_is_exists(e) else StagedOutcome.FAILED
                for e in errors]

    def stage_abort(self, handle: Any) -> None:
        """Give the reservation back (after in-flight writes end); errors are only logged."""
        try:
            self._staged.abort(handle)
        except Exception as exc:  # noqa: BLE001 - the master reclaims it after its timeout
            logger.debug("staged abort failed: %s", exc)

    @property
    def healthy(self) -> bool:
        """False while a recent failure holds the store down (see the class docstring)."""
        return time.monotonic() >= self._down_until

    def mark_down(self, reason: str) -> None:
        with self._gate:
            if self.healthy:
                logger.warning("store %s unavailable for %.1fs: %s", self.impl,
                               self.retry_interval_s, reason)
            self._down_until = time.monotonic() + self.retry_interval_s

    def register_buffer(self, ptr: int, size: int) -> None:
        """Register memory the store reads from / writes into directly (zero-copy)."""
        rc = self._client.register_buffer(ptr, size)
        if rc != 0:
            raise StoreError(f"register_buffer({ptr:#x}, {size}) failed: rc={rc}")

    def exists(self, keys: Sequence[str], timeout: float | None = None) -> list[bool]:
        """Which keys exist; an error or a store down counts as absent (a miss is always safe).

        With ``timeout`` the call is bounded: a store that does not answer in time is marked
        down and the keys count as absent (the late answer is dropped).
        """
        if not keys:
            return []
        if not self.healthy:
            return [False] * len(keys)
        if timeout is None:
            return self._exists(keys)
        with self._gate:
            if self._probe is not None and not self._probe.done():
                return [False] * len(keys)  # an earlier lookup is still stuck in the client
            if self._lookup_pool is None:
                self._lookup_pool = ThreadPoolExecutor(1, thread_name_prefix="store-lookup")
            self._probe = fut = self._lookup_pool.submit(self._exists, list(keys))
        try:
            return fut.result(timeout)
        except FutureTimeout:
            self.mark_down(f"batch_is_exist took over {timeout:.2f}s")
            return [False] * len(keys)

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        out: list[bool] = []
        try:
            for i in range(0, len(keys), _MAX_KEYS_PER_CALL):
                chunk = list(keys[i:i + _MAX_KEYS_PER_CALL])
                res = list(self._client.batch_is_exist(chunk))
                if len(res) != len(chunk):
                    raise StoreError(f"batch_is_exist returned {len(res)} results "
                                     f"for {len(chunk)} keys")
                if res and all(r < 0 for r in res):
                    raise StoreError(f"batch_is_exist failed (rc={res[0]})")
                out += [r == 1 for r in res]
        except Exception as exc:  # noqa: BLE001 - a broken store is a miss, never a crash
            self.mark_down(str(exc))
            return [False] * len(keys)
        return out

    def put_multi(self, keys: Sequence[str], ptrs: Sequence[Sequence[int]],
                  sizes: Sequence[Sequence[int]]) -> list[int]:
        """Store each key's object from its list of registered segments; per-key return codes."""
        if not keys:
            return []
        if not self.healthy:
            raise StoreError("store is down")
        res = list(self._client.batch_put_from_multi_buffers(
            list(keys), [list(p) for p in ptrs], [list(s) for s in sizes], self._replicate))
        if res and all(r <= _UNREACHABLE_RC for r in res):
            self.mark_down(f"batch_put_from_multi_buffers failed (rc={res[0]})")
        return res

    def get_multi(self, keys: Sequence[str], ptrs: Sequence[Sequence[int]],
                  sizes: Sequence[Sequence[int]]) -> list[int]:
        """Read each key's object into its segments; per key: bytes read (>= 0) or error (< 0)."""
        if not keys:
            return []
        if not self.healthy:
            raise StoreError("store is down")
        res = list(self._client.batch_get_into_multi_buffers(
            list(keys), [list(p) for p in ptrs], [list(s) for s in sizes]))
        if res and all(r <= _UNREACHABLE_RC for r in res):
            self.mark_down(f"batch_get_into_multi_buffers failed (rc={res[0]})")
        return res

    def remove(self, key: str) -> int:
        return int(self._client.remove(key))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._lookup_pool is not None:
                self._lookup_pool.shutdown(wait=False, cancel_futures=True)
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a dead store must not raise
                logger.debug("store close failed", exc_info=True)
