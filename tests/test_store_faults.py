"""Faults with real processes: kill -9 of a store node holding replicas during a workload."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from _store_util import NodeProcess, master_process, new_client
from store.client import StoreError
from store.master import ReplicateConfig, SyncMasterClient

pytestmark = pytest.mark.timeout(90)
TTL = 2.0


def test_kill9_holder_during_mixed_workload_replica_num_2():
    with master_process() as master:
        nodes = [NodeProcess(master, ttl=TTL) for _ in range(3)]
        client = new_client(master, global_segment_size=0)
        try:
            rc = ReplicateConfig(replica_num=2)
            stored: dict[str, bytes] = {}
            failures: list[str] = []
            stop = threading.Event()
            rng = random.Random(7)

            def workload() -> None:
                i = 0
                while not stop.is_set():
                    key, value = f"f/{i}", os.urandom(rng.choice([100, 2000, 8000]))
                    i += 1
                    try:
                        client.put(key, value, rc)
                        stored[key] = value
                    except StoreError:
                        pass  # a put that raced the kill may fail, clearly; it is not stored
                    if stored:
                        k = rng.choice(list(stored))
                        try:
                            got = client.get(k)
                        except StoreError as e:
                            failures.append(f"get {k}: {e}")
                            continue
                        if got != stored[k]:
                            failures.append(f"get {k}: wrong bytes")

            worker = threading.Thread(target=workload)
            worker.start()
            time.sleep(1.0)
            nodes[0].kill9()
            time.sleep(1.0)
            stop.set()
            worker.join(30)
            assert not worker.is_alive()
            assert failures == []
            assert len(stored) > 20
            # Every key has a replica on a surviving node: every get returns the exact bytes.
            client.core.locations.clear()
            for key, value in stored.items():
                assert client.get(key) == value
            # The master reclaims the dead node's segment within its TTL (plus a sweep).
            with SyncMasterClient(master) as admin:
                deadline = time.monotonic() + TTL + 3.0
                while admin.stats().segments > 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
                stats = admin.stats()
                assert stats.evicted_objects == 0  # else a missing key could be an eviction
                assert stats.segments == 2 and stats.capacity == 2 * 32 * (1 << 20)
        finally:
            client.close()
            for node in nodes:
                node.stop()
