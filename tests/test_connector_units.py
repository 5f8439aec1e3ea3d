"""PyMooncakeConnector pieces that need no engine: settings, version gate, lazy import, plugin,
block layout and key namespace, and the store adapter's health gate (against a real store)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mooncake_connector.store_backend import StoreBackend, StoreError, StoreSettings
from mooncake_connector.vllm.compat import check_vllm_version
from mooncake_connector.vllm.config import ConnectorSettings

pytestmark = pytest.mark.timeout(60)


# -- settings ----------------------------------------------------------------------------------

def test_defaults_use_our_store_and_async_loads() -> None:
    s = ConnectorSettings.from_extra_config(None)
    assert (s.store_impl, s.load_async, s.save_policy, s.remote_prefill_wait_s) == \
        ("store", True, "auto", 5.0)


def test_save_mode_defaults_to_step_and_layer_is_accepted() -> None:
    assert ConnectorSettings.from_extra_config(None).save_mode == "step"
    s = ConnectorSettings.from_extra_config({"save_mode": "layer", "save_window_s": 2})
    assert (s.save_mode, s.save_window_s) == ("layer", 2.0)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config keys \['load_asnyc'\]"):
        ConnectorSettings.from_extra_config({"load_asnyc": False})


@pytest.mark.parametrize("extra, match", [
    ({"store_impl": "redis"}, "store_impl"),
    ({"save_policy": "sometimes"}, "save_policy"),
    ({"load_async": "yes"}, "load_async"),
    ({"remote_prefill_wait_s": -1}, "remote_prefill_wait_s"),
    ({"remote_prefill_wait_s": "5"}, "remote_prefill_wait_s"),
    ({"lookup_timeout_s": 0}, "lookup_timeout_s"),
    ({"exists_poll_interval_s": True}, "exists_poll_interval_s"),
    ({"hash_algo": "md5"}, "hash_algo"),
    ({"store": "127.0.0.1:50051"}, "store"),
    ({"tenant": 7}, "tenant"),
    ({"store_config_path": 1}, "store_config_path"),
    ({"save_mode": "block"}, "save_mode"),
    ({"save_mode": 1}, "save_mode"),
    ({"save_window_s": 0}, "save_window_s"),
    ({"save_window_s": "2"}, "save_window_s"),
])
def test_bad_values_are_refused(extra: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConnectorSettings.from_extra_config(extra)


def test_store_settings_file_env_and_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "mc.json"
    cfg.write_text(json.dumps({"mode": "standalone-store", "master_server_address": "10.0.0.1:1",
                               "local_buffer_size": "32MB", "protocol": "tcp"}))
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(cfg))
    from_env = ConnectorSettings.from_extra_config({}).store_settings()
    assert from_env.master_server_address == "10.0.0.1:1"
    assert from_env.local_buffer_size == 32 << 20
    inline = ConnectorSettings.from_extra_config(
        {"store": {"master_server_addr": "10.0.0.2:2"}}).store_settings()
    assert inline.master_server_address == "10.0.0.2:2"  # inline wins over the file
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(StoreError, match="JSON object"):
        StoreSettings.from_sources(path=bad)


# -- version gate, lazy import, plugin -----------------------------------------------------------

@pytest.mark.parametrize("version", ["0.32.0", "0.32.1rc2", "0.32.0+cpu"])
def test_supported_versions_pass(version: str) -> None:
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_unsupported_version_fails_clearly(version: str) -> None:
    with pytest.raises(RuntimeError, match=rf"supports vLLM >= 0\.32, < 0\.33; found {version}"):
        check_vllm_version(version)


def test_cpu_core_reservation_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from mooncake_connector.vllm.compat import RESERVED_CPU_ENV, cpu_core_reservation_warning

    monkeypatch.delenv(RESERVED_CPU_ENV, raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    # The worker's OpenMP threads took every core: vLLM reserved none (the 2-core case).
    assert RESERVED_CPU_ENV in cpu_core_reservation_warning(num_threads=2, cpu_count=2)
    # A core left for the engine core: vLLM's binding without a connector.
    assert cpu_core_reservation_warning(num_threads=1, cpu_count=2) is None
    assert cpu_core_reservation_warning(num_threads=14, cpu_count=16) is None
    monkeypatch.setenv(RESERVED_CPU_ENV, "1")
    assert cpu_core_reservation_warning(num_threads=2, cpu_count=2) is None


def test_installed_vllm_is_supported() -> None:
    check_vllm_version()


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_is_lazy_and_vllm_resolves_the_module_path() -> None:
    out = _python(
        "import sys, mooncake_connector\n"
        "print('heavy', sorted(m for m in ('vllm', 'torch') if m in sys.modules))\n"
        "from vllm.config import KVTransferConfig\n"
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory\n"
        "cfg = KVTransferConfig(kv_connector='PyMooncakeConnector', kv_role='kv_both',\n"
        "                       kv_connector_module_path='mooncake_connector')\n"
        "print('class', KVConnectorFactory.get_connector_class(cfg).__qualname__)\n")
    assert "heavy []" in out
    assert "class PyMooncakeConnector" in out


def test_plugin_registers_once_by_name() -> None:
    out = _python(
        "from importlib.metadata import entry_points\n"
        "ep, = [e for e in entry_points(group='vllm.general_plugins') if e.name == 'mooncake_connector']\n"
        "register = ep.load()\n"
        "register(); register()  # vLLM loads plugins in every process: must be idempotent\n"
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F\n"
        "print('class', F.get_connector_class_by_name('PyMooncakeConnector').__qualname__)\n")
    assert "class PyMooncakeConnector" in out


# -- layout and namespace ------------------------------------------------------------------------

def test_cpu_block_layout_addresses_each_block() -> None:
    import torch

    from mooncake_connector.vllm.layout import BlockLayout

    num_blocks, kvh, bs, hd = 6, 2, 16, 8
    layers = [torch.zeros(num_blocks, kvh, bs, 2 * hd, dtype=torch.bfloat16) for _ in range(3)]
    layout = BlockLayout.from_tensors(layers, num_blocks)
    per_layer = kvh * bs * 2 * hd * 2
    assert layout.block_bytes == 3 * per_layer
    ptrs, sizes = layout.block_buffers(4)
    assert ptrs == [t[4].data_ptr() for t in layers] and sizes == [per_layer] * 3


def test_gpu_style_kv_first_layout_has_two_segments_per_layer() -> None:
    import torch

    from mooncake_connector.vllm.layout import BlockLayout

    t = torch.zeros(2, 5, 16, 2, 8)  # [K/V, num_blocks, block_size, heads, head_size]
    layout = BlockLayout.from_tensors([t], 5)
    ptrs, sizes = layout.block_buffers(3)
    assert ptrs == [t[0, 3].data_ptr(), t[1, 3].data_ptr()]
    assert sizes == [16 * 2 * 8 * 4] * 2


def test_layer_pieces_concatenate_to_the_whole_block() -> None:
    import torch

    from mooncake_connector.vllm.layout import BlockLayout

    cpu = BlockLayout.from_tensors([torch.zeros(6, 2, 16, 16) for _ in range(3)], 6)
    gpu = BlockLayout.from_tensors([torch.zeros(2, 5, 16, 2, 8) for _ in range(2)], 5)
    for layout, block in ((cpu, 4), (gpu, 3)):
        ptrs, sizes = layout.block_buffers(block)
        pieces = [p for layer in range(len(layout.bases)) for p in layout.layer_pieces(layer, block)]
        assert pieces == list(zip(ptrs, sizes))
        offsets = layout.layer_offsets
        assert offsets[0] == 0 and len(offsets) == len(layout.bases)
        assert all(offsets[i + 1] - offsets[i] == sum(n for _, n in layout.layer_pieces(i, block))
                   for i in range(len(offsets) - 1))


def test_unsupported_layout_is_refused() -> None:
    import torch

    from mooncake_connector.vllm.layout import BlockLayout

    with pytest.raises(ValueError, match="unsupported KV cache tensor shape"):
        BlockLayout.from_tensors([torch.zeros(3, 7, 4)], 5)


def _kv_config(groups: int):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=64, num_kv_heads=4, head_size=64, dtype=torch.bfloat16)
    return KVCacheConfig(num_blocks=10, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([f"layers.{g}.attn"], spec) for g in range(groups)])


def test_layout_name_and_hybrid_kv_is_refused() -> None:
    from mooncake_connector.vllm.layout import kv_layout_name

    assert kv_layout_name(None, _kv_config(1)) == "cpu/FullAttentionSpec/kvh4/hd64/l1"
    with pytest.raises(ValueError, match="one KV cache group, got 2"):
        kv_layout_name(None, _kv_config(2))


def test_layout_and_shard_separate_namespaces() -> None:
    from store.keys import KeyNamespace, block_keys

    base = dict(model="m", revision="", kv_dtype="bfloat16", block_size=64, tp_size=1,
                tp_rank=0, pp_rank=0, tenant="", hash_algo="sha256")
    cpu = KeyNamespace(kv_layout="cpu/FullAttentionSpec/kvh4/hd64/l8", **base)
    gpu = KeyNamespace(kv_layout="cuda/FullAttentionSpec/kvh4/hd64/l8", **base)
    rank1 = KeyNamespace(kv_layout=cpu.kv_layout, **{**base, "tp_size": 2, "tp_rank": 1})
    tokens = list(range(128))
    keys = {ns.namespace_id: block_keys(ns, tokens)[-1] for ns in (cpu, gpu, rank1)}
    assert len(set(keys)) == 3 and len(set(keys.values())) == 3


# -- the store adapter against a real store -----------------------------------------------------

def test_dead_master_answers_misses_fast_and_marks_store_down(tmp_path: Path) -> None:
    from mooncake_connector.testing.store_cluster import StoreCluster

    with StoreCluster(segment_size=16 << 20, workdir=tmp_path) as cluster:
        backend = StoreBackend("store", StoreSettings.from_sources(path=cluster.config_path),
                               retry_interval_s=30.0)
        try:
            assert backend.exists(["a", "b"], timeout=1.0) == [False, False]
            assert backend.healthy
            cluster.kill_master()
            start = time.monotonic()
            assert backend.exists(["a"], timeout=0.5) == [False]
            assert backend.exists(["a"], timeout=0.5) == [False]
            assert time.monotonic() - start < 1.5
            assert not backend.healthy
            with pytest.raises(StoreError, match="down"):
                backend.get_multi(["a"], [[0]], [[1]])
        finally:
            backend.close()


def _kv(num_blocks: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.attn": torch.randint(
        -100, 100, (num_blocks, 2, 64, 32), generator=g).to(torch.bfloat16) for i in range(3)}


def _worker(cluster, **kw):
    from mooncake_connector.vllm.worker import WorkerSide

    backend = StoreBackend("store", StoreSettings.from_sources(path=cluster.config_path))
    return WorkerSide(backend, load_async=False, **kw)


@pytest.mark.parametrize("missing_layer", [False, True])
def test_layer_wise_save_stores_the_same_bytes_as_whole_block_puts(tmp_path: Path,
                                                                    missing_layer: bool) -> None:
    """save_mode=layer against a real store: each layer's pages are written as vLLM reports
    the layer; another worker loads them back intact. A layer that is never reported leaves
    the staged objects incomplete: they are put whole after the commit instead."""
    from mooncake_connector.testing.store_cluster import StoreCluster
    from mooncake_connector.vllm.metadata import BlockTransfer, PyMooncakeMetadata

    with StoreCluster(segment_size=64 << 20, workdir=tmp_path) as cluster:
        saver, loader = _worker(cluster, save_mode="layer", save_window_s=2.0), _worker(cluster)
        try:
            src, dst = _kv(8, seed=1), _kv(8, seed=2)
            saver.register_kv_caches(src, 8)
            loader.register_kv_caches(dst, 8)
            keys = [f"layerwise/{missing_layer}/{i}" for i in range(3)]
            meta = PyMooncakeMetadata(saves=[BlockTransfer("r1", keys[:2], [1, 3]),
                                             BlockTransfer("r2", keys[2:] + keys[:1], [6, 1])])
            saver.begin_step(meta)
            for i, name in enumerate(src):
                if not (missing_layer and i == 1):
                    saver.save_layer(name)
            saver.submit_saves(meta)
            saver.wait_for_inflight_saves()
            stats = saver.take_stats().reduce()
            assert stats["saved_blocks"] == 3 and stats["save_errors"] == 0
            assert stats["save_skipped_blocks"] == 1  # keys[0] twice in one step
            assert stats["layer_saved_blocks"] == (0 if missing_layer else 3)
            assert saver.get_finished({"r1", "r2"})[0] == {"r1", "r2"}
            loader.start_load(PyMooncakeMetadata(loads=[BlockTransfer("r3", keys, [0, 2, 5])]))
            assert loader.take_error_blocks() == set()
            for name in src:
                for s_block, d_block in ((1, 0), (3, 2), (6, 5)):
                    assert src[name][s_block].equal(dst[name][d_block])
        finally:
            saver.shutdown()
            loader.shutdown()


def test_unknown_store_impl_and_unreachable_master() -> None:
    with pytest.raises(StoreError, match="store_impl"):
        StoreBackend("redis", StoreSettings())


# -- connector stats and their Prometheus metrics -------------------------------------------------

def _prom_metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from mooncake_connector.vllm.stats import PyMooncakePromMetrics

    registry = CollectorRegistry()

    def bound(cls):
        return lambda *a, **kw: cls(*a, registry=registry, **kw)

    types = {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)}

    class _Cfg:
        kv_transfer_config = None

    prom = PyMooncakePromMetrics(_Cfg(), types, ["model_name", "engine"],
                                 {0: ["m", "0"], 1: ["m", "1"]})
    return prom, registry


def test_stats_aggregate_counters_and_capped_durations() -> None:
    from mooncake_connector.vllm.stats import MAX_DURATIONS, PyMooncakeStats

    a, b = PyMooncakeStats(), PyMooncakeStats()
    a.add(loaded_blocks=2, loaded_bytes=100, load_time_s=0.5)
    a.observe("load_durations_s", 0.5)
    for _ in range(MAX_DURATIONS + 5):
        b.observe("save_durations_s", 0.01)
    b.add(saved_blocks=3, lookups=1, lookup_hit_blocks=2)
    a.aggregate(b)
    assert a.reduce()["loaded_blocks"] == 2 and a.reduce()["saved_blocks"] == 3
    assert a.data["load_durations_s"] == [0.5]
    assert len(a.data["save_durations_s"]) == MAX_DURATIONS
    # What crosses the process boundary is the plain dict; rebuilding it keeps everything.
    again = PyMooncakeStats(data=a.to_dict())
    assert again.reduce() == a.reduce() and not again.is_empty()
    assert PyMooncakeStats().is_empty()
    with pytest.raises(KeyError, match="bogus"):
        a.add(bogus=1)


def test_prom_metrics_count_and_ignore_malformed_payloads() -> None:
    prom, registry = _prom_metrics()
    prom.observe({"loaded_blocks": 3, "loaded_bytes": 3072, "lookups": 2, "lookup_hit_blocks": 3,
                  "load_durations_s": [0.002, 0.2], "save_durations_s": []}, engine_idx=1)
    prom.observe({"loaded_blocks": "many", "saved_blocks": True, "loaded_bytes": -5,
                  "load_durations_s": "x", "save_durations_s": [None, -1.0, 0.03]}, engine_idx=1)
    prom.observe(None)
    labels = {"model_name": "m", "engine": "1"}
    value = registry.get_sample_value
    assert value("vllm:pymooncake_loaded_blocks_total", labels) == 3
    assert value("vllm:pymooncake_loaded_bytes_total", labels) == 3072
    assert value("vllm:pymooncake_lookup_hit_blocks_total", labels) == 3
    assert value("vllm:pymooncake_saved_blocks_total", labels) == 0
    assert value("vllm:pymooncake_load_time_seconds_count", labels) == 2
    assert value("vllm:pymooncake_load_time_seconds_bucket", {**labels, "le": "0.0025"}) == 1
    assert value("vllm:pymooncake_save_time_seconds_count", labels) == 1
    assert value("vllm:pymooncake_loaded_blocks_total", {"model_name": "m", "engine": "0"}) is None


# -- scheduler side bookkeeping with vLLM's own request/output types (no engine) ---------------

def _sched_output(new=(), cached=(), tokens=None):
    """A real vLLM ``SchedulerOutput``: ``new`` NewRequestData, ``cached`` (req_id, new block
    ids or None, num_computed_tokens) triples, ``tokens`` req_id -> tokens scheduled."""
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    c = CachedRequestData(req_ids=[r for r, _, _ in cached], resumed_req_ids=set(),
                          new_token_ids=[], all_token_ids={},
                          new_block_ids=[(b,) if b is not None else None for _, b, _ in cached],
                          num_computed_tokens=[n for _, _, n in cached],
                          num_output_tokens=[0] * len(cached))
    tokens = tokens or {}
    return SchedulerOutput(scheduled_new_reqs=list(new), scheduled_cached_reqs=c,
                           num_scheduled_tokens=tokens,
                           total_num_scheduled_tokens=sum(tokens.values()),
                           scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                           finished_req_ids=set(), free_encoder_mm_hashes=[])


def test_scheduler_saves_prompt_blocks_once_then_decode_steps_are_empty() -> None:
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.request import Request

    from mooncake_connector.vllm.scheduler import SchedulerSide
    from store.keys import KeyNamespace

    ns = KeyNamespace(model="m", revision="", kv_dtype="bfloat16", kv_layout="cpu/x", block_size=64,
                      tp_size=1, tp_rank=0, pp_rank=0, tenant="", hash_algo="sha256")
    side = SchedulerSide(ConnectorSettings.from_extra_config({}), ns, block_size=64,
                         can_load=True, can_save=True, store=None)
    req = Request("r1", list(range(3 * 64 + 5)), SamplingParams(max_tokens=4), None)
    req.kv_transfer_params = {"do_remote_decode": True}
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)  # no store: a miss

    # Chunked prefill: 128 tokens, then the remaining 69 (the third block completes).
    first = side.build_connector_meta(_sched_output(
        new=[NewRequestData.from_request(req, ([7, 8],))], tokens={"r1": 128}))
    assert [(t.block_ids, len(t.keys)) for t in first.saves] == [([7, 8], 2)] and not first.loads
    second = side.build_connector_meta(_sched_output(cached=[("r1", [9, 10], 128)],
                                                     tokens={"r1": 69}))
    assert [t.block_ids for t in second.saves] == [[9]]
    # Every prompt block is on its way: decode steps do no per-request work and save nothing.
    for step in range(3):
        meta = side.build_connector_meta(_sched_output(cached=[("r1", None, 197 + step)],
                                                       tokens={"r1": 1}))
        assert not meta.saves and not meta.loads
    assert side.take_stats() is not None and side.take_stats() is None  # one lookup, drained

    delay_free, params = side.request_finished(req, [7, 8, 9, 10])
    assert delay_free and params["num_tokens"] == 3 * 64 and params["do_remote_prefill"]
    assert params["last_block_key"] == second.saves[0].keys[-1]
