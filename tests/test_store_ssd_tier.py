"""SSD tier with real processes: a store node with an SSD directory, DRAM filled past the
watermark, evicted objects demoted by the node to its file segment and still readable exactly."""
from __future__ import annotations

import time
import urllib.request

import pytest

from _store_util import MIB, NodeProcess, master_process, new_client
from store.client import MasterErrorCode, StoreError
from transfer.testing import free_port

pytestmark = pytest.mark.timeout(90)


def _value(i: int, size: int) -> bytes:
    return bytes([i % 251]) * (size - 8) + i.to_bytes(8, "little")


def _put_retrying(client, key: str, value: bytes) -> None:
    """A full memory tier answers "no space" while demotions free it: retry briefly."""
    deadline = time.monotonic() + 10
    while True:
        try:
            client.put(key, value)
            return
        except StoreError as e:
            if e.code != MasterErrorCode.NO_AVAILABLE_HANDLE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_evicted_objects_are_demoted_to_ssd_and_read_back(tmp_path):
    metrics_port = free_port()
    with master_process("--eviction-high-watermark-ratio", "0.6", "--eviction-ratio", "0.25",
                        "--metrics-port", str(metrics_port)) as master:
        node = NodeProcess(master, "--ssd-dir", str(tmp_path), "--ssd-size", "64MB")
        c = None
        try:
            dram, ssd = node.segments
            c = new_client(master, global_segment_size=0, checksum=True)
            size = MIB
            n = 48  # 48 MiB through 32 MiB of DRAM
            for i in range(n):
                _put_retrying(c, f"ssd/{i}", _value(i, size))
            deadline = time.monotonic() + 20
            while _metric(metrics_port, "mooncake_master_demoted_objects_total") < n - 32:
                assert time.monotonic() < deadline, "objects were not demoted"
                time.sleep(0.1)
            assert _metric(metrics_port, "mooncake_master_demotions_in_flight") >= 0
            # Every object is still there, exact bytes, from whichever tier holds it.
            tiers = set()
            for i in range(n):
                key = f"ssd/{i}"
                assert c.get(key) == _value(i, size), key
                reps = c.engine.run(c.core.replicas([key]))[0]
                tiers.update((r.segment, r.tier) for r in reps)
            assert (ssd, "file") in tiers and (dram, "memory") in tiers
            assert _metric(metrics_port, "mooncake_master_demotions_abandoned_total") == 0
            assert _metric(metrics_port, "mooncake_master_demoted_bytes_total") >= (n - 32) * size
        finally:
            if c is not None:
                c.close()
            node.stop()


def test_without_offload_evicted_objects_are_gone(tmp_path):
    with master_process("--eviction-high-watermark-ratio", "0.6", "--eviction-ratio", "0.25",
                        "--enable-offload", "false") as master:
        node = NodeProcess(master, "--ssd-dir", str(tmp_path), "--ssd-size", "64MB")
        c = None
        try:
            c = new_client(master, global_segment_size=0)
            for i in range(40):
                _put_retrying(c, f"gone/{i}", _value(i, MIB))
            found = c.batch_exists([f"gone/{i}" for i in range(40)])
            assert not all(found) and found[-1]
        finally:
            if c is not None:
                c.close()
            node.stop()
