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


def test_unknown_store_impl_and_unreachable_master() -> None:
    with pytest.raises(StoreError, match="store_impl"):
        StoreBackend("redis", StoreSettings())
