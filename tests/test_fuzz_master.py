"""Property-based fuzzing of the master's RPC requests: every request type of
``store.master.messages`` through the real RPC server of a running master process, as valid
frames carrying hostile values (huge, negative and zero sizes, empty, 256+-byte and unicode keys,
batches past MAX_BATCH, unknown clients and segments, wrong types). Each gets a reply or a clear
error code, the master survives, a good client is served afterwards, memory stays bounded."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from _fuzz_master import MasterCase, master_cases, master_harness

pytestmark = pytest.mark.timeout(90)
CI = settings(max_examples=400, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
RSS_BOUND = 96 << 20


@pytest.fixture(scope="module")
def master():
    with master_harness() as h:
        yield h


def test_master_refuses_hostile_requests_with_clear_codes(master):
    master.healthy()
    before = master.rss()

    @CI
    @given(case=master_cases)
    def attack(case):
        master.check(case)

    attack()
    master.healthy()
    assert master.rss() - before < RSS_BOUND


@pytest.mark.parametrize("case", [
    MasterCase("batch_exists", {"keys": ["k"] * 65537}),
    MasterCase("batch_put_start", {"client_id": "fuzz-c", "keys": ["a", "b"], "sizes": [1]}),
    MasterCase("put_start", {"client_id": "fuzz-c", "key": "x" * 257, "size": 1}),
    MasterCase("put_start", {"client_id": "fuzz-c", "key": "k", "size": (1 << 64) - 1}),
    MasterCase("put_start", {"client_id": "fuzz-c", "key": "k", "size": -1}),
    MasterCase("mount_segment", {"segment": {"name": "s", "base": -1, "size": 1 << 63,
                                             "client_id": "x"}}),
    MasterCase("replica_start", {"client_id": "fuzz-c", "key": "k", "segment": "nowhere"}),
], ids=lambda c: c.method)
def test_known_hostile_requests(master, case):
    master.check(case)
