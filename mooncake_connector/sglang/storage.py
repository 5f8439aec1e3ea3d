"""SGLang HiCache storage backend (the L3 tier) on our pooled store.

Why this shape: SGLang's own Mooncake backend (``sglang.srt.mem_cache.storage.mooncake_store``)
drives ``mooncake.store.MooncakeDistributedStore``; we drive our drop-in of that class
(:class:`store.MooncakeDistributedStore`) the same way, so a deployment swaps Mooncake for this
store by changing the backend flags only. Loaded through SGLang's ``dynamic`` backend::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
      '{"backend_name": "mooncake_py", "module_path": "mooncake_connector.sglang",
        "class_name": "MooncakeHiCacheStorage", "interface_v1": 1,
        "master_server_address": "10.0.0.1:50051"}'

Contract kept with SGLang's cache controller:

* ``batch_exists`` returns the number of *leading* keys present (SGLang stops its prefetch at the
  first miss); ``batch_get_v1``/``batch_set_v1`` return one bool per key; ``batch_get`` returns
  one tensor or ``None`` per key; ``batch_set`` one bool for the batch.
* The store is a cache: any store failure (master or node down, timeout, bad reply) is logged
  and reported as a miss / ``False``. Nothing raises into SGLang's prefetch/backup threads.
* Keys are ``mc1/<tenant>/<namespace id>/<SGLang page hash>``; the namespace
  (:class:`store.keys.KeyNamespace`) covers model, KV dtype, host layout, page size and TP/PP
  rank, so ranks and incompatible deployments never read each other's bytes. MLA KV is the same
  on every TP rank, so MLA pages are shared across ranks (TP rank 0, size 1 in the namespace).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from store.compat import MooncakeDistributedStore, ReplicateConfig
from store.keys import KeyNamespace

from .config import HiCacheStoreConfig
from .pages import PageGeometry, page_pieces, host_pool_buffers

__all__ = ["MooncakeHiCacheStorage", "StorageStats"]

logger = logging.getLogger(__name__)
#: Mooncake's RPC_FAIL: the master could not be reached (after the client's failover retries).
_RPC_FAIL = -900


@dataclass
class StorageStats:
    """Same fields as SGLang's ``StorageMetrics`` (used when that class cannot be imported)."""

    prefetch_pgs: list[int] = field(default_factory=list)
    backup_pgs: list[int] = field(default_factory=list)
    prefetch_bandwidth: list[float] = field(default_factory=list)
    backup_bandwidth: list[float] = field(default_factory=list)


class MooncakeHiCacheStorage(HiCacheStorage):
    """``HiCacheStorage`` over :class:`store.MooncakeDistributedStore`; see the module docstring."""

    def __init__(self, storage_config: HiCacheStorageConfig,
                 kwargs: Mapping[str, Any] | None = None, *,
                 store: MooncakeDistributedStore | None = None) -> None:
        """SGLang's dynamic factory calls ``cls(storage_config, kwargs)``, passing its ``**kwargs``
        dict positionally (empty today). ``store`` lets a caller share an already set-up client.

        The master is not contacted here: if it is down at startup, SGLang still starts and the
        L3 tier answers misses (see ``outage_backoff_s``) until it is reachable."""
        self.storage_config = storage_config
        self.config = HiCacheStoreConfig.from_extra_config(storage_config.extra_config)
        if storage_config.dcp_size > 1 or storage_config.attn_cp_size > 1:
            raise NotImplementedError(
                "our HiCache backend does not support decode/attention context parallelism yet")
        self.is_mla = bool(storage_config.is_mla_model)
        self.model_name = self.config.model_name or storage_config.model_name or ""
        if not self.model_name:
            raise ValueError("HiCache storage needs a model name (SGLang's model_name or our "
                             "'model_name' extra config key) to namespace its keys")
        self.enable_metrics = bool(storage_config.enable_storage_metrics)
        self._replicate = ReplicateConfig()
        self._replicate.replica_num = self.config.replica_num
        self._lock = threading.Lock()
        self._stats = StorageStats()
        self.counters = {"hits": 0, "misses": 0, "writes": 0, "write_failures": 0, "errors": 0}
        self.geometry: PageGeometry | None = None
        self.namespace: KeyNamespace | None = None
        self._owns_store = store is None
        if store is None:
            store = MooncakeDistributedStore()
            ranks = max(1, storage_config.tp_size * storage_config.pp_size)
            rc = store.setup({
                "local_hostname": self.config.local_hostname,
                "metadata_server": self.config.metadata_server,
                "global_segment_size": self.config.global_segment_size // ranks,
                "local_buffer_size": self.config.local_buffer_size,
                "protocol": self.config.protocol, "rdma_devices": self.config.device_name,
                "master_server_addr": self.config.master_server_address})
            if rc != 0:  # bad settings; an unreachable master is not detected here
                raise RuntimeError(f"cannot set up the store client for master "
                                   f"{self.config.master_server_address} (setup returned {rc})")
        self.store = store
        self._registered: list[int] = []
        self._outage_until = 0.0

    # -- host pool -------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Learn the page geometry (it names the keys) and register the pool for zero copy.

        Raises at attach time, when SGLang can still refuse the backend cleanly, if the pool's
        layout is unsupported or its memory cannot be registered.
        """
        super().register_mem_pool_host(mem_pool_host)
        self.geometry = PageGeometry.of(mem_pool_host, self.is_mla)
        sc = self.storage_config
        self.namespace = KeyNamespace(
            model=self.model_name, kv_dtype=self.geometry.dtype,
            kv_layout=f"sglang-{self.geometry.layout}-{'mla' if self.is_mla else 'mha'}",
            block_size=self.geometry.page_size,
            tp_size=1 if self.is_mla else sc.tp_size, tp_rank=0 if self.is_mla else sc.tp_rank,
            pp_rank=sc.pp_rank, tenant=self.config.tenant)
        for buf in host_pool_buffers(mem_pool_host):
            ptr, size = buf.data_ptr(), buf.numel() * buf.element_size()
            if ptr in self._registered:
                continue
            rc = self.store.register_buffer(ptr, size)
            if rc != 0:
                raise RuntimeError(f"cannot register {size} bytes of host KV pool memory with "
                                   f"the store (code {rc})")
            self._registered.append(ptr)
        logger.info("HiCache storage on our store: namespace %s (%s), page %d bytes",
                    self.namespace.key_prefix, self.namespace.kv_layout, self.geometry.page_bytes)

    def store_key(self, key: str) -> str:
        """The store key of SGLang page hash ``key`` (namespaced by model, layout and rank)."""
        if self.namespace is None:
            raise RuntimeError("register_mem_pool_host() must be called before any page I/O")
        return self.namespace.key_prefix + key

    # -- existence ---------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many keys, from the first, are stored (SGLang prefetches exactly that prefix)."""
        if not keys or self._in_outage():
            return 0
        try:
            skeys = [self.store_key(k) for k in keys]
        except RuntimeError as e:
            return self._rejected("batch_exists", e, 0)
        try:
            found = self.store.batch_is_exist(skeys)
        except Exception as e:
            return self._failed("batch_exists", e, 0)
        if any(flag < 0 for flag in found):
            return self._failed("batch_exists", "the store could not be queried", 0)
        for i, flag in enumerate(found):
            if flag != 1:
                return i
        return len(keys)

    # -- zero-copy page I/O (SGLang's "interface_v1": 1) ------------------------------------

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Write whole pages straight from the host pool; one bool per key."""
        return self._page_io("batch_set_v1", keys, host_indices, write=True)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Read whole pages straight into the host pool; one bool per key (False = miss)."""
        return self._page_io("batch_get_v1", keys, host_indices, write=False)

    def _page_io(self, op: str, keys: list[str], host_indices: torch.Tensor, *,
                 write: bool) -> list[bool]:
        """The zero-copy page transfer both ``_v1`` calls are: the outage gate, the pages'
        pieces in the host pool, one batch call to the store, per-key outcome and stats.
        A page is a single piece (MLA, or one buffer per page) or one piece per layer buffer."""
        if not keys or self._in_outage():
            return [False] * len(keys)
        start = time.perf_counter()
        try:
            pieces = self._pieces(keys, host_indices)
            skeys = [self.store_key(k) for k in keys]
        except Exception as e:  # bad indices, no pool registered yet
            return self._rejected(op, e, [False] * len(keys))
        store = self.store
        try:
            if pieces.single:
                ptrs, sizes = [p[0] for p in pieces.ptrs], [s[0] for s in pieces.sizes]
                result = (store.batch_put_from(skeys, ptrs, sizes, self._replicate) if write
                          else store.batch_get_into(skeys, ptrs, sizes))
            elif write:
                result = store.batch_put_from_multi_buffers(skeys, pieces.ptrs, pieces.sizes,
                                                            self._replicate)
            else:
                result = store.batch_get_into_multi_buffers(skeys, pieces.ptrs, pieces.sizes)
        except Exception as e:
            return self._failed(op, e, [False] * len(keys))
        self._note_codes(op, result)
        if write:
            ok = [c == 0 for c in result]
            self._record_write(ok, start)
        else:
            page_bytes = self._page_bytes()
            ok = [n == page_bytes for n in result]
            self._record_read(ok, start)
        return ok

    def _pieces(self, keys: Sequence[str], host_indices: torch.Tensor):  # type: ignore[no-untyped-def]
        return page_pieces(self.mem_pool_host, host_indices, len(keys), self.is_mla,
                           self._page_bytes())

    def _page_bytes(self) -> int:
        if self.geometry is None:
            raise RuntimeError("register_mem_pool_host() must be called before any page I/O")
        return self.geometry.page_bytes

    # -- generic page I/O (flat page tensors; SGLang's default for dynamic backends) ---------

    def get(self, key: str, target_location: Any = None,
            target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        """Fill each target flat page with its stored bytes; ``None`` where the page is missing,
        has another size, or the store failed."""
        if not keys or self._in_outage():
            return [None] * len(keys)
        start = time.perf_counter()
        try:
            skeys = [self.store_key(k) for k in keys]
        except RuntimeError as e:
            return self._rejected("batch_get", e, [None] * len(keys))
        try:
            values = self.store.get_batch(skeys)
        except Exception as e:
            return self._failed("batch_get", e, [None] * len(keys))
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        out: list[torch.Tensor | None] = []
        for value, target in zip(values, targets):
            out.append(_fill(value, target, self._page_bytes()) if value else None)
        self._record_read([t is not None for t in out], start)
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        """Store each flat page tensor; True only if every page is stored (or already was)."""
        if not keys or values is None or len(values) != len(keys):
            logger.error("batch_set needs one page tensor per key (%d keys)", len(keys))
            return False
        if self._in_outage():
            return False
        start = time.perf_counter()
        try:
            blobs = [_as_bytes(v) for v in values]
            bad = [len(b) for b in blobs if len(b) != self._page_bytes()]
            if bad:
                raise ValueError(f"page tensors of {bad[:3]} bytes; a page is "
                                 f"{self._page_bytes()}")
            skeys = [self.store_key(k) for k in keys]
        except (ValueError, TypeError, RuntimeError) as e:
            return self._rejected("batch_set", e, False)
        try:
            codes = [self.store.put_batch(skeys, blobs, self._replicate)]
        except Exception as e:
            return self._failed("batch_set", e, False)
        self._note_codes("batch_set", codes)
        ok = codes[0] == 0
        self._record_write([ok] * len(keys), start)
        return ok

    # -- lifecycle and stats -----------------------------------------------------------------

    def clear(self) -> bool:
        """Remove every object in the store, as SGLang's Mooncake backend does (the store has no
        per-namespace listing), leased ones included: an explicit flush must not leave pages
        that were just read. Meant for a store dedicated to one deployment."""
        if self._in_outage():
            return False
        try:
            code = self.store.remove_all(force=True)
        except Exception as e:
            return self._failed("clear", e, False)
        self._note_codes("clear", [code])
        return code >= 0

    def get_stats(self) -> Any:
        """Page counts and GB/s per batch since the last call, as SGLang's metrics expect."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
            out: Any = StorageMetrics()
        except Exception:  # the module imports torchvision; not always importable
            out = StorageStats()
        with self._lock:
            stats, self._stats = self._stats, StorageStats()
        for name in ("prefetch_pgs", "backup_pgs", "prefetch_bandwidth", "backup_bandwidth"):
            getattr(out, name).extend(getattr(stats, name))
        return out

    def close(self) -> None:
        for ptr in self._registered:
            try:
                self.store.unregister_buffer(ptr)
            except Exception as e:
                logger.warning("unregister of host pool memory failed: %s", e)
        self._registered.clear()
        if self._owns_store:
            self.store.close()

    # -- bookkeeping -------------------------------------------------------------------------

    def _failed(self, op: str, error: BaseException | str, result: Any) -> Any:
        """Log a failed store call, start an outage backoff, and return ``result`` (a miss)."""
        self._count("errors")
        backoff = self.config.outage_backoff_s
        with self._lock:
            self._outage_until = time.monotonic() + backoff
        logger.warning("HiCache storage %s failed; reporting misses%s: %s", op,
                       f" for the next {backoff:g} s" if backoff else "", error)
        return result

    def _rejected(self, op: str, error: BaseException, result: Any) -> Any:
        """A call SGLang made wrongly (bad indices, a page of the wrong size): a miss, no backoff."""
        self._count("errors")
        logger.error("HiCache storage %s refused: %s", op, error)
        return result

    def _note_codes(self, op: str, codes: Sequence[int]) -> None:
        """Per-key codes: RPC_FAIL means the master is unreachable, so back off."""
        if any(c == _RPC_FAIL for c in codes):
            self._failed(op, "the store master is unreachable (RPC_FAIL)", None)

    def _in_outage(self) -> bool:
        """True while backing off after an outage: answer misses without touching the store."""
        with self._lock:
            return time.monotonic() < self._outage_until

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _record_read(self, ok: list[bool], start: float) -> None:
        hits = sum(ok)
        with self._lock:
            self.counters["hits"] += hits
            self.counters["misses"] += len(ok) - hits
            if self.enable_metrics and hits:
                self._stats.prefetch_pgs.append(hits)
                self._stats.prefetch_bandwidth.append(self._gbps(hits, start))

    def _record_write(self, ok: list[bool], start: float) -> None:
        done = sum(ok)
        with self._lock:
            self.counters["writes"] += done
            self.counters["write_failures"] += len(ok) - done
            if self.enable_metrics and done:
                self._stats.backup_pgs.append(done)
                self._stats.backup_bandwidth.append(self._gbps(done, start))

    def _gbps(self, pages: int, start: float) -> float:
        seconds = max(time.perf_counter() - start, 1e-9)
        return pages * self._page_bytes() / seconds / 1e9


def _as_bytes(value: Any) -> memoryview:
    """A page tensor's raw bytes (any dtype, including bfloat16, which numpy lacks)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"page must be a torch.Tensor, got {type(value).__name__}")
    flat = value.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.cpu().numpy())


def _fill(value: bytes, target: torch.Tensor | None, page_bytes: int) -> torch.Tensor | None:
    """Copy a stored page into ``target`` (or a new uint8 tensor); None on a size mismatch."""
    if len(value) != page_bytes:
        logger.warning("stored page has %d bytes, expected %d; treating it as a miss",
                       len(value), page_bytes)
        return None
    src = torch.from_numpy(np.frombuffer(value, dtype=np.uint8).copy())
    if target is None:
        return src
    if target.numel() * target.element_size() != page_bytes or not target.is_contiguous():
        logger.warning("target page tensor does not hold one contiguous page; miss")
        return None
    target.view(-1).view(torch.uint8).copy_(src)
    return target
