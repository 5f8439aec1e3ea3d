"""Tenant isolation and quotas on a real master process with a real store node.

Two tenants use the same key names; each reads its own bytes, neither can see, test, remove or
list the other's objects, quotas refuse puts with QUOTA_EXCEEDED, and a wrong tenant secret gets
nothing. The cluster secret (infrastructure) still sees the raw, namespaced key space.
"""
from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _store_util import MIB, NodeProcess, master_process, new_client

from store.client import StoreClient
from store.client.errors import StoreError
from store.master import MasterErrorCode
from store.master.client import SyncMasterClient
from store.master.messages import (
    KeyRequest,
    MountSegmentReply,
    MountSegmentRequest,
    SegmentDesc,
    StatsReply,
    StatsRequest,
)
from store.master.tenants import Tenancy, load_tenants
from transfer.config import split_address
from transfer.rpc import BlockingRpcClient, RpcAuthError, RpcError
from transfer.testing import free_port

pytestmark = pytest.mark.timeout(120)

CLUSTER = "cluster-secret"
SECRETS = {"team-a": "secret-of-a", "team-b": "secret-of-b"}
B_QUOTA = 256 << 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A multi-tenant master (and its metrics port) plus one store node lending 32 MiB."""
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(json.dumps({"tenants": {
        "team-a": {"secret": SECRETS["team-a"], "quota": "8MiB"},
        "team-b": {"secret": SECRETS["team-b"], "quota": B_QUOTA}}}))
    with pytest.MonkeyPatch.context() as mp:  # the children inherit these
        mp.setenv("MOONCAKE_AUTH_SECRET", CLUSTER)
        mp.setenv("MOONCAKE_MASTER_TENANTS_FILE", str(tenants))
        metrics = free_port()
        with master_process("--metrics-port", str(metrics)) as master:
            node = NodeProcess(master)
            try:
                yield master, metrics
            finally:
                node.stop()


def tenant(master: str, tid: str, secret: str | None = None) -> StoreClient:
    return new_client(master, auth_secret=CLUSTER, global_segment_size=0,
                      local_buffer_size=4 * MIB, store={"tenant_id": tid,
                                                        "tenant_secret": secret or SECRETS[tid]})


@pytest.fixture(scope="module")
def a(cluster: tuple[str, int]) -> Iterator[StoreClient]:
    with tenant(cluster[0], "team-a") as client:
        yield client


@pytest.fixture(scope="module")
def b(cluster: tuple[str, int]) -> Iterator[StoreClient]:
    with tenant(cluster[0], "team-b") as client:
        yield client


def code_of(call: Any, *args: Any) -> int:
    with pytest.raises(StoreError) as info:
        call(*args)
    return info.value.code


def test_same_key_names_each_tenant_reads_its_own_bytes(a: StoreClient, b: StoreClient) -> None:
    a.put("shared-name", b"A" * 5000)
    b.put("shared-name", b"B" * 3000)
    assert a.get("shared-name") == b"A" * 5000
    assert b.get("shared-name") == b"B" * 3000
    a.put_batch(["k1", "k2"], [b"a1", b"a2"])
    assert b.get_batch(["k1", "k2"])[0].not_found  # type: ignore[union-attr]
    assert a.get_batch(["k1", "k2"]) == [b"a1", b"a2"]
    assert a.get_size("shared-name") == 5000 and b.get_size("shared-name") == 3000


def test_a_tenant_cannot_get_test_remove_or_list_anothers_keys(a: StoreClient,
                                                               b: StoreClient) -> None:
    a.put("only-a", b"private")
    assert code_of(b.get, "only-a") == MasterErrorCode.OBJECT_NOT_FOUND
    assert not b.exists("only-a") and b.batch_exists(["only-a", "k1"]) == [False, False]
    assert code_of(b.remove, "only-a") == MasterErrorCode.OBJECT_NOT_FOUND
    assert b.batch_remove(["only-a"]) == [MasterErrorCode.OBJECT_NOT_FOUND]
    b.put("b-junk", b"x")
    assert b.remove_all() >= 1  # its own objects only
    assert a.get("only-a") == b"private" and a.get("shared-name") == b"A" * 5000
    # Nor can it reach them by spelling out the namespace.
    assert code_of(b.get, "team-a/only-a") == MasterErrorCode.OBJECT_NOT_FOUND
    # Replica locations (the data plane's addresses) are only handed to the owner.
    rpc = tenant_rpc(a, "team-b")
    try:
        with pytest.raises(RpcError) as info:
            rpc.call("get_replica_list", KeyRequest("only-a"), StatsReply)
        assert info.value.code == MasterErrorCode.OBJECT_NOT_FOUND
        assert "team-a" not in info.value.message
    finally:
        rpc.close()


def tenant_rpc(client: StoreClient, tid: str, secret: str | None = None) -> BlockingRpcClient:
    host, port = split_address(client.core.master.address or "")
    return BlockingRpcClient(host, port, secret=(secret or SECRETS[tid]).encode(), identity=tid)


def test_quota_exceeded_is_a_clear_error_and_removal_makes_room(b: StoreClient,
                                                                cluster: tuple[str, int]) -> None:
    b.remove_all(force=True)
    b.put("big", b"1" * (200 << 10))
    assert code_of(b.put, "more", b"2" * (100 << 10)) == MasterErrorCode.QUOTA_EXCEEDED
    with pytest.raises(StoreError, match="QUOTA_EXCEEDED"):
        b.put("more", b"2" * (100 << 10))
    codes = b.put_batch(["s1", "s2", "s3"], [b"3" * (20 << 10), b"4" * (20 << 10),
                                            b"5" * (20 << 10)])
    assert [c is None for c in codes] == [True, True, False]
    assert codes[2].code == MasterErrorCode.QUOTA_EXCEEDED  # type: ignore[union-attr]
    assert not b.exists("more") and not b.exists("s3")
    b.remove("big")
    b.put("more", b"2" * (100 << 10))
    assert b.get("more") == b"2" * (100 << 10)
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster[1]}/metrics", timeout=5).read()
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.decode().splitlines()
               if line.startswith("mooncake_master_tenant_")}
    assert metrics['mooncake_master_tenant_quota_rejections_total{tenant="team-b"}'] == 3
    assert metrics['mooncake_master_tenant_bytes{tenant="team-b"}'] == (140 << 10)
    assert metrics['mooncake_master_tenant_objects{tenant="team-b"}'] == 3
    assert metrics['mooncake_master_tenant_quota_bytes{tenant="team-b"}'] == B_QUOTA
    rpc = tenant_rpc(b, "team-b")
    try:
        stats = rpc.call("stats", StatsRequest(), StatsReply)
        assert (stats.objects, stats.bytes, stats.capacity) == (3, 140 << 10, B_QUOTA)
    finally:
        rpc.close()


def test_wrong_tenant_secret_gets_nothing(a: StoreClient, cluster: tuple[str, int]) -> None:
    a.put("guarded", b"g")
    for tid, secret in (("team-a", "secret-of-b"), ("team-a", "wrong"), ("nobody", "x")):
        rpc = tenant_rpc(a, tid, secret)
        with pytest.raises(RpcAuthError):
            rpc.call("get_replica_list", KeyRequest("guarded"), StatsReply)
        rpc.close()
    intruder = tenant(cluster[0], "team-a", "not-the-secret")
    try:
        intruder.core.master.retry_timeout = 1.0
        with pytest.raises(StoreError):
            intruder.get("guarded")
        try:
            found = intruder.exists("guarded")
        except StoreError:
            found = False
        assert not found
        with pytest.raises(StoreError):
            intruder.put("planted", b"p")
    finally:
        intruder.close()
    assert not a.exists("planted")


def test_tenants_cannot_mount_segments_and_infrastructure_sees_namespaces(
        a: StoreClient, cluster: tuple[str, int]) -> None:
    rpc = tenant_rpc(a, "team-a")
    try:
        with pytest.raises(RpcError) as info:
            rpc.call("mount_segment", MountSegmentRequest(segment=SegmentDesc(
                name="127.0.0.1:1", base=1 << 30, size=1 << 20, client_id="x", host_id="h")),
                MountSegmentReply)
        assert info.value.code == MasterErrorCode.PERMISSION_DENIED
    finally:
        rpc.close()
    a.put("seen-by-infra", b"i")
    with SyncMasterClient(cluster[0], secret=CLUSTER.encode()) as infra:
        assert infra.exists(Tenancy.key_of("team-a", "seen-by-infra"))
        assert not infra.exists("seen-by-infra")


def test_tenants_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    for text, match in (("tenants: {}", "non-empty"), ("tenants: {'bad id': {secret: x}}", "ids"),
                        ("tenants: {a: {secret: ''}}", "secret"),
                        ("tenants: {a: {secret: s, quota: lots}}", "quota"),
                        ("tenants: {a: {secret: s, extra: 1}}", "mapping")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_tenants(path)
    path.write_text("tenants:\n  a: {secret: s3, quota: 1MiB}\n  b: {secret: s4}\n")
    got = load_tenants(path)
    assert (got["a"].quota, got["b"].quota, got["a"].secret) == (1 << 20, 0, b"s3")
    assert "s3" not in repr(got["a"])


async def test_rpc_identities_are_proven_and_reach_sync_and_async_handlers() -> None:
    from transfer.rpc import RpcClient, RpcServer, peer_identity
    from transfer.rpc.testing import Echo

    secrets = {"t1": b"one", "t2": b"two"}
    server = RpcServer("127.0.0.1", 0, secret=b"cluster", identities=secrets.get)

    def who(req: Echo) -> Echo:
        return Echo(req.seq, (peer_identity() or "-").encode())

    async def who_async(req: Echo) -> Echo:
        return Echo(req.seq, (peer_identity() or "-").encode())

    server.register("who", Echo, Echo, who)
    server.register("who_async", Echo, Echo, who_async)
    await server.start()
    try:
        for identity, secret, expected in (("t1", b"one", b"t1"), ("t2", b"two", b"t2"),
                                           (None, b"cluster", b"-")):
            async with RpcClient("127.0.0.1", server.port, secret=secret,
                                 identity=identity) as c:
                assert (await c.call("who", Echo(1), Echo)).payload == expected
                assert (await c.call("who_async", Echo(2), Echo)).payload == expected
        for identity, secret in (("t1", b"two"), ("t3", b"one"), ("t1", b"cluster"),
                                 (None, b"one")):
            async with RpcClient("127.0.0.1", server.port, secret=secret,
                                 identity=identity) as c:
                with pytest.raises(RpcAuthError):
                    await c.call("who", Echo(3), Echo)
        assert server.stats().requests == 6
        with pytest.raises(ValueError, match="needs its secret"):
            RpcClient("127.0.0.1", server.port, identity="t1")
    finally:
        await server.stop()
