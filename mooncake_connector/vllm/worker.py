"""Worker side of :class:`PyMooncakeConnector`: move KV blocks between vLLM's pages and the store.

Why one store object per block holding all layers: a block is gathered straight from the
per-layer pages with ``batch_put_from_multi_buffers`` (zero-copy, no staging buffer) under one
key, so a lookup is one key per block and the master handles L times fewer objects than with
one key per (block, layer). Saves run on a background thread after the step's forward pass
(``wait_for_save`` submits, it does not wait); the scheduler keeps the blocks until the worker
reports them saved. Loads run on another thread; asynchronous ones are reported through
``get_finished``, synchronous ones complete in ``start_load_kv`` before the forward pass.
"""
from __future__ import annotations

from vllm.logger import init_logger
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from mooncake_connector.store_backend import StoreBackend
from mooncake_connector.vllm.layout import BlockLayout
from mooncake_connector.vllm.metadata import BlockTransfer, PyMooncakeMetadata
from mooncake_connector.vllm.stats import PyMooncakeStats

if TYPE_CHECKING:
    import torch

__all__ = ["WorkerSide"]

# Under "vllm." so vLLM's logging configuration (level, format) applies to these records.
logger = init_logger("vllm." + __name__)


class WorkerSide:
    """Executes the scheduler's load/save plans against registered KV tensors."""

    def __init__(self, store: StoreBackend, *, load_async: bool) -> None:
        self.store = store
        self.load_async = load_async
        self.layout: BlockLayout | None = None
        self._save_pool = ThreadPoolExecutor(1, thread_name_prefix="pymooncake-save")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="pymooncake-load")
        self._lock = threading.Lock()
        self._pending_saves: dict[str, int] = defaultdict(int)   # req -> saves in flight
        self._save_futures: set[Future] = set()
        self._finished_reqs: set[str] = set()                    # finished, waiting on saves
        self._done_loads: set[str] = set()
        self._failed_loads: set[str] = set()
        self._error_blocks: set[int] = set()
        self._stats = PyMooncakeStats()
        self._stats_dirty = False

    def register_kv_caches(self, kv_caches: "dict[str, torch.Tensor]", num_blocks: int) -> None:
        tensors = list(kv_caches.values())
        self.layout = BlockLayout.from_tensors(tensors, num_blocks)
        seen: set[int] = set()
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            self.store.register_buffer(storage.data_ptr(), storage.nbytes())
        logger.info("PyMooncakeConnector: %d layers registered, %d bytes per stored block",
                    len(tensors), self.layout.block_bytes)

    def _buffers(self, t: BlockTransfer) -> tuple[list[list[int]], list[list[int]]]:
        assert self.layout is not None, "register_kv_caches was not called"
        ptrs, sizes = [], []
        for b in t.block_ids:
            p, s = self.layout.block_buffers(b)
            ptrs.append(p)
            sizes.append(s)
        return ptrs, sizes

    # -- loads ---------------------------------------------------------------------------------
    def _load(self, t: BlockTransfer) -> bool:
        """Load one request's blocks; on failure record the first failed block and all after it."""
        assert self.layout is not None
        start = time.perf_counter()
        ptrs, sizes = self._buffers(t)
        try:
            res = self.store.get_multi(t.keys, ptrs, sizes)
        except Exception as exc:  # noqa: BLE001 - a store failure is a miss, never a crash
            logger.warning("load of %d blocks for %s failed: %s", len(t.keys), t.req_id, exc)
            res = [-1] * len(t.keys)
        first_bad = next((i for i, r in enumerate(res) if r != self.layout.block_bytes), None)
        ok = first_bad is None
        with self._lock:
            good = len(t.keys) if ok else first_bad
            elapsed = time.perf_counter() - start
            self._stats.add(loaded_blocks=good, loaded_bytes=good * self.layout.block_bytes,
                            load_time_s=elapsed)
            self._stats.observe("load_durations_s", elapsed)
            self._stats_dirty = True
            if not ok:
                # Later blocks depend on the failed one (attention over the prefix): redo them all.
                self._error_blocks.update(t.block_ids[first_bad:])
                self._stats.add(load_errors=len(t.keys) - first_bad)
                logger.warning("request %s: block %d of %d failed to load (rc=%s); recomputing",
                               t.req_id, first_bad, len(t.keys), res[first_bad])
        return ok

    def _load_async(self, t: BlockTransfer) -> None:
        ok = self._load(t)
        with self._lock:
            self._done_loads.add(t.req_id)
            if not ok:
                self._failed_loads.add(t.req_id)

    def start_load(self, meta: PyMooncakeMetadata) -> None:
        for t in meta.loads:  # empty on a steady decode step
            if self.load_async:
                self._load_pool.submit(self._load_async, t)
            else:
                self._load(t)

    # -- saves ---------------------------------------------------------------------------------
    def _save(self, t: BlockTransfer) -> None:
        assert self.layout is not None
        start = time.perf_counter()
        try:
            present = self.store.exists(t.keys)
            todo = [i for i, p in enumerate(present) if not p]
            ptrs, sizes = self._buffers(t)
            res = self.store.put_multi([t.keys[i] for i in todo], [ptrs[i] for i in todo],
                                       [sizes[i] for i in todo])
            errors = sum(1 for r in res if r != 0)
        except Exception as exc:  # noqa: BLE001 - a failed save is a future miss, not an error
            logger.warning("save of %d blocks for %s failed: %s", len(t.keys), t.req_id, exc)
            todo, errors = list(range(len(t.keys))), len(t.keys)
            present = [False] * len(t.keys)
        with self._lock:
            saved = len(todo) - errors
            elapsed = time.perf_counter() - start
            self._stats.add(saved_blocks=saved, saved_bytes=saved * self.layout.block_bytes,
                            save_skipped_blocks=len(t.keys) - len(todo), save_errors=errors,
                            save_time_s=elapsed)
            self._stats.observe("save_durations_s", elapsed)
            self._stats_dirty = True
            self._pending_saves[t.req_id] -= 1
        logger.debug("PyMooncakeConnector saved %s: %d blocks, %d present, %d errors",
                     t.req_id, len(t.keys), len(t.keys) - len(todo), errors)

    def submit_saves(self, meta: PyMooncakeMetadata) -> None:
        for t in meta.saves:
            with self._lock:
                self._pending_saves[t.req_id] += 1
            fut = self._save_pool.submit(self._save, t)
            self._save_futures.add(fut)
            fut.add_done_callback(self._save_futures.discard)

    def wait_for_inflight_saves(self) -> None:
        """Block until every submitted save finished (before vLLM may reuse their blocks)."""
        for fut in list(self._save_futures):
            fut.result()

    # -- completions ---------------------------------------------------------------------------
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """(saves done for finished requests, loads done, loads that failed).

        Called every step: with nothing finished and nothing in flight it returns without
        taking the lock. Reading the containers unlocked is safe under the GIL; an entry a
        transfer thread adds meanwhile is reported on the next step.
        """
        if not (finished_req_ids or self._finished_reqs or self._done_loads or self._failed_loads):
            return set(), set(), set()
        with self._lock:
            self._finished_reqs |= {r for r in finished_req_ids if r in self._pending_saves}
            sent = {r for r in self._finished_reqs if self._pending_saves[r] == 0}
            for r in sent:
                self._finished_reqs.discard(r)
                del self._pending_saves[r]
            recv, failed = self._done_loads, self._failed_loads
            self._done_loads, self._failed_loads = set(), set()
        return sent, recv, failed

    def take_error_blocks(self) -> set[int]:
        if not self._error_blocks:
            return set()
        with self._lock:
            out, self._error_blocks = self._error_blocks, set()
        return out

    def take_stats(self) -> PyMooncakeStats | None:
        if not self._stats_dirty:
            return None
        with self._lock:
            self._stats_dirty = False
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, PyMooncakeStats()
        return out

    def shutdown(self) -> None:
        self._save_pool.shutdown(wait=True)
        self._load_pool.shutdown(wait=True)
        self.store.close()

    def debug_state(self) -> dict[str, Any]:
        with self._lock:
            return {"pending_saves": dict(self._pending_saves), "finished": sorted(self._finished_reqs)}
