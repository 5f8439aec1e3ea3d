"""Standalone store nodes: clients contributing no memory, the SSD file tier, the CLI."""
from __future__ import annotations

import signal

import pytest

from _store_util import NodeProcess, client_config, master_process, new_client
from store.client import MasterErrorCode, StoreClient, StoreError
from store.master import ReplicateConfig
from store.node import main

pytestmark = pytest.mark.timeout(90)


def test_cache_outlives_client_restart_and_ssd_tier(tmp_path):
    with master_process() as master:
        node = NodeProcess(master, "--ssd-dir", str(tmp_path), "--ssd-size", "16MB")
        try:
            dram, ssd = node.segments
            c = new_client(master, global_segment_size=0)
            c.put("n/dram", b"d" * 100_000)
            c.put("n/ssd", b"s" * 200_000, ReplicateConfig(preferred_segment=ssd))
            replicas = c.engine.run(c.core.replicas(["n/ssd", "n/dram"]))
            assert [r.tier for r in replicas[0]] == ["file"]
            assert replicas[1][0].segment == dram and replicas[1][0].tier == "memory"
            c.close()
            # A new client (an engine restart) still finds everything, from either tier.
            c2 = new_client(master, global_segment_size=0)
            try:
                assert c2.get("n/dram") == b"d" * 100_000
                assert c2.get("n/ssd") == b"s" * 200_000
            finally:
                c2.close()
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(timeout=15) == 0
            c3 = new_client(master, global_segment_size=0)
            try:
                with pytest.raises(StoreError):
                    c3.get("n/dram")  # its node is gone, and said so on the way out
            finally:
                c3.close()
        finally:
            node.stop()


def test_node_cli_rejects_bad_arguments(capsys):
    assert main(["--global-segment-size", "0"]) == 2
    assert "must contribute" in capsys.readouterr().err
    assert main(["--ssd-dir", "/tmp/x"]) == 2
    with pytest.raises(SystemExit):
        main(["--ssd-size", "lots"])


def test_clients_continue_after_master_failover(etcd_server):
    import os
    import subprocess
    import sys
    import time

    from store.master import find_master
    from _store_util import REPO
    from transfer.testing import free_port, stop_process, wait_for_port

    masters = {}
    for _ in range(2):
        port = free_port()
        masters[f"127.0.0.1:{port}"] = subprocess.Popen(
            [sys.executable, "-m", "store.master", "--enable_ha", "--etcd_endpoints",
             etcd_server.endpoint, "--rpc_port", str(port), "--metrics_port", "0",
             "--enable_http_metadata_server", "false", "--leader_lease_ttl", "1",
             "--client_ttl", "5"], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", port, 20)
    node = None
    client = None
    try:
        leader = find_master(etcd_server.endpoint, timeout=15)
        node = NodeProcess("", "--etcd-endpoints", etcd_server.endpoint, "--master-enable-ha")
        client = StoreClient(client_config("127.0.0.1:1", global_segment_size=0),
                             own_engine=True, etcd_endpoints=[etcd_server.endpoint])
        values = {f"ha/{i}": os.urandom(1000 + i) for i in range(20)}
        for k, v in values.items():
            client.put(k, v)
        time.sleep(0.5)  # the node hears of the writes (background announcements)
        os.kill(masters[leader].pid, signal.SIGKILL)
        masters[leader].wait(timeout=5)
        deadline = time.monotonic() + 15
        while True:  # master calls retry until the standby leads; space returns on remount
            try:
                client.put("ha/after", b"new leader")
                break
            except StoreError as e:
                assert e.code == MasterErrorCode.NO_AVAILABLE_HANDLE and time.monotonic() < deadline
                time.sleep(0.1)
        assert client.get("ha/after") == b"new leader"
        deadline = time.monotonic() + 15
        while not all(client.batch_exists(list(values))) and time.monotonic() < deadline:
            time.sleep(0.2)  # the node remounts with what it holds after its next heartbeat
        client.core.locations.clear()
        for k, v in values.items():
            assert client.get(k) == v
    finally:
        if client is not None:
            client.close()
        if node is not None:
            node.stop()
        for proc in masters.values():
            stop_process(proc)
