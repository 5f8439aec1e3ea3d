"""HA with a real etcd and real master processes: election, kill -9 of the leader, takeover
within a bounded time, and a client that continues (rediscovery + remount rebuild)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from store.master import RemountObject, SegmentDesc, SyncMasterClient, find_master
from transfer.testing import EtcdServer, free_port, stop_process, wait_for_port

pytestmark = pytest.mark.timeout(60)

LEASE_TTL = 1.0
TAKEOVER_BOUND = 6.0  # lease TTL + keep-alive slack + polling, with headroom for a busy machine


def _start(etcd: EtcdServer) -> tuple[subprocess.Popen[bytes], str]:
    rpc = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "store.master", "--enable_ha", "--etcd_endpoints", etcd.endpoint,
         "--rpc_port", str(rpc), "--metrics_port", "0", "--enable_http_metadata_server",
         "false", "--leader_lease_ttl", str(LEASE_TTL), "--client_ttl", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", rpc, timeout=20)
    return proc, f"127.0.0.1:{rpc}"


@pytest.fixture
def masters(etcd_server: EtcdServer) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for _ in range(2):
            proc, address = _start(etcd_server)
            procs[address] = proc
        yield procs
    finally:
        for proc in procs.values():
            stop_process(proc)


def test_standby_takes_over_and_client_continues(
        etcd_server: EtcdServer, masters: dict[str, subprocess.Popen[bytes]]) -> None:
    leader = find_master(etcd_server.endpoint, timeout=15)
    assert leader in masters
    seg = SegmentDesc(name="node-1", base=1 << 30, size=1 << 24, client_id="c1")
    with SyncMasterClient(etcd_endpoints=etcd_server.endpoint, retry_timeout=15.0) as client:
        assert client.client.address is None  # found through etcd on first use
        client.mount_segment(seg)
        replicas = client.put_start("c1", "kv-block", 8192)
        client.put_end("c1", "kv-block")
        assert client.client.address == leader

        os.kill(masters[leader].pid, signal.SIGKILL)
        masters[leader].wait(timeout=5)
        t0 = time.monotonic()
        new = leader
        while new == leader:
            new = find_master(etcd_server.endpoint, timeout=15)
            time.sleep(0.05)
        takeover = time.monotonic() - t0
        print(f"takeover after kill -9: {takeover:.2f}s")
        assert new in masters and takeover < TAKEOVER_BOUND

        # The client retries onto the new leader, learns it must remount, and rebuilds.
        assert not client.ping("c1").known
        rebuilt = client.mount_segment(seg, [RemountObject("kv-block", replicas[0].address, 8192)])
        assert rebuilt == 1
        assert client.client.address == new
        assert client.get_replica_list("kv-block").replicas == replicas
        client.put_start("c1", "after-failover", 4096)
        client.put_end("c1", "after-failover")
        assert client.batch_exists(["kv-block", "after-failover"]) == [True, True]
