"""Worker side of :class:`PyMooncakeConnector`: move KV blocks between vLLM's pages and the store.

Why one store object per block holding all layers: a block is gathered straight from the
per-layer pages (zero-copy, no staging buffer) under one key, so a lookup is one key per block
and the master handles L times fewer objects than with one key per (block, layer).

Two save modes (``save_mode``), same bytes under the same keys:

* ``step``: after the forward pass, ``wait_for_save`` hands the step's blocks to a background
  thread, which asks which exist and puts the others whole (``batch_put_from_multi_buffers``).
* ``layer``: a staged put (``store.client.staged``) reserves the step's blocks when vLLM binds
  the step's metadata, before the forward pass; ``save_kv_layer`` queues each layer's pages as
  the layer finishes (the copy overlaps the rest of the pass); ``wait_for_save`` hands the
  commit to the background thread. Whatever the staged put could not publish (store refused,
  a layer never reported, the window passed) is put whole afterwards, as in ``step`` mode.

Either way ``wait_for_save`` does not wait: the scheduler keeps the blocks until the worker
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

from mooncake_connector.store_backend import StagedOutcome, StoreBackend, StoreError
from mooncake_connector.vllm.layout import BlockLayout
from mooncake_connector.vllm.metadata import BlockTransfer, PyMooncakeMetadata
from mooncake_connector.vllm.stats import PyMooncakeStats

if TYPE_CHECKING:
    import torch

__all__ = ["WorkerSide"]

# Under "vllm." so vLLM's logging configuration (level, format) applies to these records.
logger = init_logger("vllm." + __name__)


class _StagedStep:
    """One step's layer-wise save: the staged put and the blocks it covers, first key wins."""

    def __init__(self, handle: Any, saves: list[BlockTransfer]) -> None:
        self.handle = handle
        self.saves = saves
        self.started = time.perf_counter()
        self.blocks: list[tuple[str, int]] = []   # (key, block id), each key once
        seen: set[str] = set()
        for t in saves:
            for key, block in zip(t.keys, t.block_ids):
                if key not in seen:
                    seen.add(key)
                    self.blocks.append((key, block))
        self.broken = False


class WorkerSide:
    """Executes the scheduler's load/save plans against registered KV tensors."""

    def __init__(self, store: StoreBackend, *, load_async: bool, save_mode: str = "step",
                 save_window_s: float | None = None) -> None:
        self.store = store
        self.load_async = load_async
        self.save_mode = save_mode
        if save_mode == "layer" and not store.enable_staged_puts(save_window_s):
            logger.warning("PyMooncakeConnector: store_impl %r cannot write objects in pieces; "
                           "save_mode \"layer\" falls back to \"step\"", store.impl)
            self.save_mode = "step"
        self.layout: BlockLayout | None = None
        self._layer_index: dict[str, int] = {}
        self._layer_offsets: tuple[int, ...] = ()
        self._step: _StagedStep | None = None
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
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        self._layer_offsets = self.layout.layer_offsets
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
    def _put_whole(self, t: BlockTransfer, *, check: bool = True) -> tuple[int, int, int]:
        """Put ``t``'s blocks whole (those not in the store yet when ``check``); returns
        (saved, already present, errors)."""
        try:
            present = self.store.exists(t.keys) if check else [False] * len(t.keys)
            todo = [i for i, p in enumerate(present) if not p]
            ptrs, sizes = self._buffers(t)
            res = self.store.put_multi([t.keys[i] for i in todo], [ptrs[i] for i in todo],
                                       [sizes[i] for i in todo])
            errors = sum(1 for r in res if r != 0)
        except Exception as exc:  # noqa: BLE001 - a failed save is a future miss, not an error
            logger.warning("save of %d blocks for %s failed: %s", len(t.keys), t.req_id, exc)
            return 0, 0, len(t.keys)
        return len(todo) - errors, len(t.keys) - len(todo), errors

    def _record_save(self, req_ids: list[str], saved: int, present: int, errors: int,
                     start: float, layer_saved: int = 0) -> None:
        assert self.layout is not None
        with self._lock:
            elapsed = time.perf_counter() - start
            self._stats.add(saved_blocks=saved, saved_bytes=saved * self.layout.block_bytes,
                            save_skipped_blocks=present, save_errors=errors, save_time_s=elapsed,
                            layer_saved_blocks=layer_saved)
            self._stats.observe("save_durations_s", elapsed)
            self._stats_dirty = True
            for req_id in req_ids:
                self._pending_saves[req_id] -= 1
        logger.debug("PyMooncakeConnector saved %s: %d blocks, %d present, %d errors",
                     req_ids, saved, present, errors)

    def _save(self, t: BlockTransfer) -> None:
        start = time.perf_counter()
        saved, present, errors = self._put_whole(t)
        self._record_save([t.req_id], saved, present, errors, start)

    def _commit_step(self, step: _StagedStep) -> None:
        """Publish a layer-wise save; put whole whatever it could not publish."""
        saved = layer_saved = present = errors = 0
        try:
            outcomes = self.store.stage_commit(step.handle)
            outcome = dict(zip(step.handle.keys, outcomes))
            saved = layer_saved = sum(1 for o in outcomes if o is StagedOutcome.SAVED)
            present = sum(1 for o in outcomes if o is StagedOutcome.PRESENT)
            retry = [(k, b) for k, b in step.blocks if outcome.get(k) is StagedOutcome.FAILED]
            if retry:
                logger.debug("layer-wise save of %d blocks incomplete; putting them whole",
                             len(retry))
                s, p, errors = self._put_whole(BlockTransfer(
                    "", [k for k, _ in retry], [b for _, b in retry]), check=False)
                saved, present = saved + s, present + p
        except Exception as exc:  # noqa: BLE001 - the requests' blocks must still be released
            logger.warning("layer-wise save of %d blocks failed: %s", len(step.blocks), exc)
            errors = len(step.blocks) - saved - present
        # Duplicate keys of the step (the same prefix twice in one batch) count as present.
        present += sum(len(t.keys) for t in step.saves) - len(step.blocks)
        self._record_save([t.req_id for t in step.saves], saved, present, errors, step.started,
                          layer_saved)

    def begin_step(self, meta: PyMooncakeMetadata) -> None:
        """``save_mode="layer"``: reserve this step's blocks before the forward pass."""
        if self.save_mode != "layer" or not meta.saves or self.layout is None:
            return
        if self._step is not None:  # a step that never reached wait_for_save
            self.store.stage_abort(self._step.handle)
            self._step = None
        step = _StagedStep(None, meta.saves)
        try:
            step.handle = self.store.stage_begin([k for k, _ in step.blocks], self.layout.block_bytes)
        except StoreError as exc:
            logger.debug("layer-wise save not started (%s); saving after the forward pass", exc)
            return
        self._step = step

    def save_layer(self, layer_name: str) -> None:
        """Queue this layer's pages of the step's blocks (returns at once)."""
        step = self._step
        if step is None or step.broken:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        assert self.layout is not None
        base = self._layer_offsets[layer]
        pieces = self.layout.layer_pieces
        try:
            self.store.stage_write(step.handle, [(key, base, pieces(layer, block))
                                                 for key, block in step.blocks])
        except StoreError as exc:  # the commit finds the objects incomplete and puts them whole
            logger.debug("layer-wise write of %s failed: %s", layer_name, exc)
            step.broken = True

    def submit_saves(self, meta: PyMooncakeMetadata) -> None:
        step, self._step = self._step, None
        if step is not None and step.saves is meta.saves:
            self._submit_save([t.req_id for t in step.saves], self._commit_step, step)
            return
        if step is not None:  # not this step's: give its reservation back
            self.store.stage_abort(step.handle)
        for t in meta.saves:
            self._submit_save([t.req_id], self._save, t)

    def _submit_save(self, req_ids: list[str], fn: Any, arg: Any) -> None:
        """Run ``fn(arg)`` on the save thread; ``req_ids`` count it as in flight until it
        reports (``_record_save``)."""
        with self._lock:
            for req_id in req_ids:
                self._pending_saves[req_id] += 1
        fut = self._save_pool.submit(fn, arg)
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
        if self._step is not None:
            self.store.stage_abort(self._step.handle)
            self._step = None
        self._save_pool.shutdown(wait=True)
        self._load_pool.shutdown(wait=True)
        self.store.close()

    def debug_state(self) -> dict[str, Any]:
        with self._lock:
            return {"pending_saves": dict(self._pending_saves), "finished": sorted(self._finished_reqs)}
