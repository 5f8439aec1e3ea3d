"""The master as a real process: ``--help``, embedded defaults (RPC + metadata + metrics),
``/metrics`` and ``/health`` over real HTTP, clean SIGTERM exit."""
from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from store.master import SegmentDesc, SyncMasterClient
from transfer.testing import free_port, stop_process, wait_for_port

pytestmark = pytest.mark.timeout(30)


def test_help_explains_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "store.master", "--help"], capture_output=True,
                         text=True, timeout=20, check=True).stdout
    for flag in ("--rpc_port", "--rpc-port", "--enable_http_metadata_server",
                 "--http_metadata_server_port", "--http_metadata_server_host", "--metrics_port",
                 "--default_kv_lease_ttl", "--default_kv_soft_pin_ttl",
                 "--eviction_high_watermark_ratio", "--eviction_ratio", "--client_ttl",
                 "--etcd_endpoints", "--enable_ha", "--rpc_address"):
        assert flag in out, flag


def test_bad_flag_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "store.master", "--eviction_ratio", "2"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert "eviction" in proc.stderr


@pytest.fixture
def master_process() -> Iterator[tuple[int, int, int, subprocess.Popen[bytes]]]:
    rpc, metrics, meta = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "store.master", "--rpc_port", str(rpc),
         "--metrics-port", str(metrics), "--http_metadata_server_port", str(meta)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for port in (rpc, metrics, meta):
            wait_for_port("127.0.0.1", port, timeout=20)
        yield rpc, metrics, meta, proc
    finally:
        stop_process(proc)
        if proc.stderr:
            proc.stderr.close()


def test_embedded_mode_serves_metadata_metrics_and_rpc(
        master_process: tuple[int, int, int, subprocess.Popen[bytes]]) -> None:
    rpc, metrics, meta, proc = master_process
    url = f"http://127.0.0.1:{meta}/metadata"
    assert httpx.put(url, params={"key": "mooncake/ram/n1"}, content=b"desc").status_code == 200
    assert httpx.get(url, params={"key": "mooncake/ram/n1"}).content == b"desc"
    assert httpx.get(url, params={"key": "absent"}).status_code == 404

    with SyncMasterClient(f"127.0.0.1:{rpc}", retry_timeout=2.0) as client:
        client.mount_segment(SegmentDesc(name="n1", base=4096, size=1 << 20, client_id="c1"))
        client.put_start("c1", "k", 4096)
        client.put_end("c1", "k")
        assert client.get_replica_list("k").replicas[0].address == 4096

    health = httpx.get(f"http://127.0.0.1:{metrics}/health")
    assert health.status_code == 200 and health.json()["role"] == "leader"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "mooncake_master_objects 1.0" in text
    assert "mooncake_master_reserved_bytes 0.0" in text
    assert "mooncake_master_reserved_puts_total 0.0" in text
    assert "mooncake_master_stored_bytes 4096.0" in text
    assert 'mooncake_master_segment_used_bytes{segment="n1",tier="memory"} 4096.0' in text
    assert 'mooncake_master_op_latency_seconds_count{op="put_start"} 1.0' in text
    assert "mooncake_master_evicted_objects_total 0.0" in text

    proc.terminate()
    assert proc.wait(timeout=10) == 0
