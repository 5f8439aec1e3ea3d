"""SGLang HiCache L3 backend on our store, built by SGLang's own StorageBackendFactory.

Real parts: SGLang 0.5.23's ``HiCacheStorage``/``HiCacheStorageConfig``/``StorageBackendFactory``,
a real master process and a real store node holding the pages. The host KV pool is the stand-in
of ``_sglang_host_pool`` (SGLang's own page-layout methods; the pool class itself cannot be
imported here, see that module).
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

from _sglang_host_pool import MHAHostPoolStandIn, MLAHostPoolStandIn
from _store_util import NodeProcess, master_process
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from mooncake_connector.sglang import HiCacheStoreConfig, MooncakeHiCacheStorage

pytestmark = pytest.mark.timeout(60)
MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


@pytest.fixture(scope="module")
def cluster():
    with master_process() as master:
        node = NodeProcess(master)
        try:
            yield master
        finally:
            node.stop()


def storage_config(master: str, *, model: str, tp_rank: int = 0, tp_size: int = 1,
                   mla: bool = False, metrics: bool = False, **extra: Any) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
        attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=metrics,
        is_page_first_layout=True, model_name=model,
        extra_config={"backend_name": "ours", "module_path": "mooncake_connector.sglang",
                      "class_name": "MooncakeHiCacheStorage", "interface_v1": 1,
                      "master_server_address": master, "global_segment_size": 0, **extra})


def make_backend(master: str, pool: Any, **kw: Any) -> MooncakeHiCacheStorage:
    """As SGLang's cache controller does: factory, then register_mem_pool_host."""
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(master, **kw), pool)
    assert isinstance(backend, MooncakeHiCacheStorage) and isinstance(backend, HiCacheStorage)
    backend.register_mem_pool_host(pool)
    return backend


def mha_pool(layout: str = "page_first", seed: int | None = None) -> MHAHostPoolStandIn:
    pool = MHAHostPoolStandIn(layout=layout, page_size=4, pages=6, layer_num=3,
                              dtype=torch.bfloat16)
    pool.kv_buffer.zero_() if seed is None else pool.fill_random(seed)
    return pool


def page_keys(n: int) -> list[str]:
    return [uuid.uuid4().hex * 2 for _ in range(n)]  # SGLang's page hashes: 64 hex digits


@pytest.mark.parametrize("mla,layout", [(False, x) for x in MHA_LAYOUTS]
                         + [(True, x) for x in MLA_LAYOUTS])
def test_zero_copy_round_trip_exact_bytes(cluster, mla, layout):
    cls = MLAHostPoolStandIn if mla else MHAHostPoolStandIn
    src = cls(layout=layout, page_size=4, pages=6, layer_num=3, dtype=torch.bfloat16)
    dst = cls(layout=layout, page_size=4, pages=6, layer_num=3, dtype=torch.bfloat16)
    src.fill_random(7)
    dst.kv_buffer.zero_()
    model = f"m-{uuid.uuid4().hex[:8]}"
    writer = make_backend(cluster, src, model=model, mla=mla)
    reader = make_backend(cluster, dst, model=model, mla=mla)
    try:
        keys = page_keys(3)
        assert writer.batch_set_v1(keys, src.indices([1, 4, 2])) == [True] * 3
        assert reader.batch_exists(keys) == 3
        assert reader.batch_get_v1(keys, dst.indices([0, 5, 3])) == [True] * 3
        for s, d in ((1, 0), (4, 5), (2, 3)):
            assert dst.page_bytes(d * 4) == src.page_bytes(s * 4)
        assert dst.page_bytes(4) == bytes(len(dst.page_bytes(4)))  # untouched page stays zero
        # The generic path reads the same object: one byte format whichever path wrote it.
        pages = reader.batch_get(keys[:1], [dst.get_dummy_flat_data_page()])
        assert pages[0] is not None
        assert pages[0].view(torch.uint8).numpy().tobytes() == src.page_bytes(4)
    finally:
        writer.close()
        reader.close()


def test_generic_path_round_trip_and_cross_path(cluster):
    src, dst = mha_pool("layer_first", seed=3), mha_pool("layer_first")
    backend = make_backend(cluster, src, model=f"m-{uuid.uuid4().hex[:8]}")
    try:
        keys = page_keys(2)
        # What SGLang's _generic_page_set passes: get_data_page(index) (flat by default).
        assert backend.batch_set(keys, [src.get_data_page(8), src.get_data_page(12)])
        targets = [dst.get_dummy_flat_data_page() for _ in keys]
        got = backend.batch_get(keys, targets)
        assert got[0] is targets[0] and got[1] is targets[1]
        for index, page in ((0, got[0]), (16, got[1])):
            dst.set_from_flat_data_page(index, page)  # what _generic_page_get does next
        assert dst.page_bytes(0) == src.page_bytes(8) and dst.page_bytes(16) == src.page_bytes(12)
    finally:
        backend.close()
    # Written generically, read zero-copy by another backend into its own pool.
    dst.kv_buffer.zero_()
    reader = make_backend(cluster, dst, model=backend.model_name)
    try:
        assert reader.batch_get_v1(keys, dst.indices([2, 1])) == [True, True]
        assert dst.page_bytes(8) == src.page_bytes(8) and dst.page_bytes(4) == src.page_bytes(12)
        assert reader.exists(keys[0]) and reader.set(keys[0], src.get_data_page(8))
        assert reader.get(keys[1], dst.get_dummy_flat_data_page()) is not None
    finally:
        reader.close()


def test_misses_and_partial_hits(cluster):
    src, dst = mha_pool(seed=11), mha_pool()
    backend = make_backend(cluster, src, model=f"m-{uuid.uuid4().hex[:8]}")
    reader = make_backend(cluster, dst, model=backend.model_name)
    try:
        k = page_keys(4)
        assert backend.batch_set_v1(k[:2], src.indices([0, 1])) == [True, True]
        assert reader.batch_exists(k) == 2            # leading hits, as SGLang expects
        assert reader.batch_exists([k[2], k[0]]) == 0  # a hit after a miss does not count
        assert reader.batch_exists([]) == 0 and not reader.exists(k[3])
        assert reader.batch_get_v1([k[0], k[2], k[1]], dst.indices([3, 4, 5])) == \
            [True, False, True]
        assert dst.page_bytes(12) == src.page_bytes(0) and dst.page_bytes(20) == src.page_bytes(4)
        assert reader.batch_get([k[3], k[1]], [dst.get_dummy_flat_data_page()] * 2)[0] is None
        # Writing an existing page succeeds and keeps the first value (Mooncake semantics).
        assert reader.batch_set_v1(k[:1], dst.indices([4])) == [True]
        assert reader.batch_get_v1(k[:1], dst.indices([4])) == [True]
        assert dst.page_bytes(16) == src.page_bytes(0)
        # Wrong host index count: every page refused, nothing raised.
        assert reader.batch_get_v1(k[:2], dst.indices([0])) == [False, False]
        assert reader.batch_set(k[:1], [torch.zeros(3)]) is False  # not a page
        assert reader.counters["misses"] >= 2 and reader.counters["errors"] >= 1
    finally:
        backend.close()
        reader.close()


def test_keys_are_namespaced_by_model_and_tp_rank(cluster):
    pool0, pool1 = mha_pool(seed=1), mha_pool()
    model = f"m-{uuid.uuid4().hex[:8]}"
    rank0 = make_backend(cluster, pool0, model=model, tp_rank=0, tp_size=2)
    rank1 = make_backend(cluster, pool1, model=model, tp_rank=1, tp_size=2)
    other = make_backend(cluster, mha_pool(), model=model + "-other", tp_rank=0, tp_size=2)
    try:
        keys = page_keys(2)
        assert rank0.batch_set_v1(keys, pool0.indices([0, 1])) == [True, True]
        assert rank0.batch_exists(keys) == 2
        assert rank1.batch_exists(keys) == 0 and other.batch_exists(keys) == 0
        assert rank0.store_key(keys[0]) != rank1.store_key(keys[0])
        assert rank0.store_key(keys[0]).endswith(keys[0])
    finally:
        for b in (rank0, rank1, other):
            b.close()
    # MLA KV is replicated across TP ranks: ranks share one object per page.
    src = MLAHostPoolStandIn(layout="page_first", page_size=4, pages=4, layer_num=2,
                             dtype=torch.float16)
    dst = MLAHostPoolStandIn(layout="page_first", page_size=4, pages=4, layer_num=2,
                             dtype=torch.float16)
    src.fill_random(5)
    mla0 = make_backend(cluster, src, model=model, mla=True, tp_rank=0, tp_size=2)
    mla1 = make_backend(cluster, dst, model=model, mla=True, tp_rank=1, tp_size=2)
    try:
        keys = page_keys(1)
        assert mla0.batch_set_v1(keys, src.indices([2])) == [True]
        assert mla1.batch_get_v1(keys, dst.indices([1])) == [True]
        assert dst.page_bytes(4) == src.page_bytes(8)
    finally:
        mla0.close()
        mla1.close()


@pytest.mark.timeout(90)
def test_store_outage_reports_misses_never_raises():
    with master_process() as master:
        node = NodeProcess(master)
        src, dst = mha_pool(seed=9), mha_pool()
        backend = make_backend(master, src, model=f"m-{uuid.uuid4().hex[:8]}")
        reader = make_backend(master, dst, model=backend.model_name, outage_backoff_s=60)
        keys = page_keys(2)
        assert backend.batch_set_v1(keys, src.indices([0, 1])) == [True, True]
        node.kill9()  # the only node holding the pages dies
        assert reader.batch_get_v1(keys, dst.indices([2, 3])) == [False, False]
        assert reader.batch_get(keys, [dst.get_dummy_flat_data_page()] * 2) == [None, None]
        # A write may still land in the dead node's segment until the master expires it;
        # either way it is answered with one bool, never an exception.
        assert backend.batch_set_v1(page_keys(1), src.indices([2])) in ([True], [False])
        backend.close()
    # The master is gone too now. The first call waits out the client's failover retries
    # (~15 s, the store client's window); the backoff then answers misses at once.
    try:
        start = time.monotonic()
        assert reader.batch_exists(keys) == 0
        first = time.monotonic() - start
        start = time.monotonic()
        assert reader.batch_get_v1(keys, dst.indices([2, 3])) == [False, False]
        assert reader.batch_get(keys, [dst.get_dummy_flat_data_page()] * 2) == [None, None]
        assert reader.batch_exists(keys) == 0 and not reader.exists(keys[0])
        assert reader.batch_set_v1(page_keys(1), dst.indices([2])) == [False]
        assert reader.batch_set(page_keys(1), [dst.get_data_page(0)]) is False
        assert reader.clear() is False
        assert time.monotonic() - start < 1.0, "calls during the backoff must not block"
        assert first < 25 and reader.counters["errors"] > 0
    finally:
        reader.close()


def test_stats_and_clear(cluster):
    pool = mha_pool(seed=2)
    backend = make_backend(cluster, pool, model=f"m-{uuid.uuid4().hex[:8]}", metrics=True)
    try:
        keys = page_keys(2)
        assert backend.batch_set_v1(keys, pool.indices([0, 1])) == [True, True]
        assert backend.batch_get_v1(keys, pool.indices([2, 3])) == [True, True]
        stats = backend.get_stats()
        assert stats.backup_pgs == [2] and stats.prefetch_pgs == [2]
        assert stats.backup_bandwidth[0] > 0 and stats.prefetch_bandwidth[0] > 0
        assert backend.get_stats().backup_pgs == []  # drained, as SGLang's Mooncake backend does
        assert backend.clear() is True and backend.batch_exists(keys) == 0
    finally:
        backend.close()


def test_config_keys_and_factory_errors(cluster, caplog):
    cfg = HiCacheStoreConfig.from_extra_config(
        {"backend_name": "x", "interface_v1": 1, "master_server_address": "h:1",
         "global_segment_size": "1GB", "replica_num": 2, "tenant": "t1", "model_name": "m"})
    assert cfg.global_segment_size == 1 << 30 and cfg.replica_num == 2 and cfg.tenant == "t1"
    with caplog.at_level(logging.WARNING):
        HiCacheStoreConfig.from_extra_config({"master_server_adress": "typo:1"})
    assert "master_server_adress" in caplog.text
    for bad in ({"replica_num": 0}, {"outage_backoff_s": -1}, {"global_segment_size": "lots"}, {"protocol": 5},
                {"master_server_address": ""}):
        with pytest.raises(ValueError, match="hicache extra config"):
            HiCacheStoreConfig.from_extra_config(bad)
    config = storage_config(cluster, model="m")
    del config.extra_config["class_name"]
    with pytest.raises(ValueError, match="class_name"):
        StorageBackendFactory.create_backend("dynamic", config, None)
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(cluster, model="m"),
                                                   None)
    try:
        assert backend.batch_exists(["k"]) == 0  # before register_mem_pool_host: a miss
        with pytest.raises(NotImplementedError, match="layout"):
            backend.register_mem_pool_host(_OddLayout())
    finally:
        backend.close()


class _OddLayout:
    """A pool in a layout we do not move (page_unified interleaves K and V per head group)."""

    layout = "page_unified"
    page_size = 4
