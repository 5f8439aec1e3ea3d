"""Instances found in etcd (registered with the connector's own code, followed by the proxy),
and hot-spot replication run off the request path."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from mooncake_connector.registry import InstanceRecord, Registration
from scheduler.proxy import Proxy, ProxySettings
from scheduler.proxy.discovery import EtcdDiscovery, parse_record
from scheduler.testing import MiniEngine
from store.keys import KeyNamespace
from transfer.metadata.etcd import EtcdMetadataStore

pytestmark = pytest.mark.timeout(30)
NS = KeyNamespace(model="mini", kv_dtype="bfloat16", kv_layout="cpu", block_size=16)


async def _until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_proxy_follows_instances_registered_in_etcd(etcd_server):
    prefill, decode = await MiniEngine().start(), await MiniEngine().start()
    prefix = "mooncake/instances/"
    regs = [await Registration(etcd_server.endpoint,
                               InstanceRecord(e.url, role, NS.to_dict(), f"{role}-{e.port}"),
                               ttl=2).start()
            for e, role in ((prefill, "prefill"), (decode, "decode"))]
    proxy = Proxy([], settings=ProxySettings(port=0, health_interval=0.3,
                                             etcd_endpoints=etcd_server.endpoint,
                                             discovery_interval=0.2))
    await proxy.start()
    try:
        await _until(lambda: len(proxy.pool.healthy("prefill", "decode")) == 2)
        assert proxy.pd
        assert proxy.hasher.namespace == NS  # learned from the record, not configured
        assert proxy.conductor.config.block_tokens == NS.block_size
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{proxy.url}/v1/completions",
                                  json={"model": "mini", "prompt": list(range(40)), "max_tokens": 2})
            assert r.status_code == 200, r.text
        assert prefill.requests[-1]["kv_transfer_params"] == {"do_remote_decode": True}
        assert decode.requests[-1]["max_tokens"] == 2
        # Deregistration (engine shut down): the instance leaves the pool.
        await regs[1].close()
        await _until(lambda: proxy.pool.get(f"decode-{decode.port}") is None)
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{proxy.url}/v1/completions",
                                  json={"model": "mini", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503
        # A re-registered engine comes back.
        regs[1] = await Registration(etcd_server.endpoint, InstanceRecord(
            decode.url, "decode", NS.to_dict(), f"decode-{decode.port}"), ttl=2).start()
        await _until(lambda: len(proxy.pool.healthy("decode")) == 1)
        # Garbage under the prefix is ignored, not fatal.
        async with EtcdMetadataStore(etcd_server.endpoint) as raw:
            await raw.put(f"{prefix}decode/bogus", b"not json")
            await asyncio.sleep(0.5)
            assert proxy.pool.get("bogus") is None and len(proxy.pool.healthy("decode")) == 1
            await raw.delete(f"{prefix}decode/bogus")
    finally:
        await proxy.stop()
        for reg in regs:
            await reg.close()
        await prefill.stop()
        await decode.stop()


async def test_a_dead_engines_lease_expires(etcd_server):
    """No close (the process died): the record goes when the lease's TTL runs out."""
    engine = await MiniEngine().start()
    seen: dict[str, object] = {}
    discovery = EtcdDiscovery(etcd_server.endpoint, on_add=lambda s: seen.__setitem__(s.id, s),
                              on_remove=lambda i: seen.pop(i, None), interval=0.2)
    reg = await Registration(etcd_server.endpoint,
                             InstanceRecord(engine.url, "mixed", {}, "dying"), ttl=1).start()
    await discovery.start()
    try:
        assert "dying" in seen
        await reg._store._keepalive.close()  # keep-alives stop, as when the process dies
        await _until(lambda: "dying" not in seen, timeout=10)
    finally:
        await discovery.stop()
        await reg.close()
        await engine.stop()


@pytest.mark.parametrize("key,value,fragment", [
    ("mooncake/instances/prefill/a", b"{", "not JSON"),
    ("mooncake/instances/prefill/a", b'{"role": "prefill"}', "'url'"),
    ("mooncake/instances/prefill/a", b'{"url": "http://h:1", "role": "decode"}', "role"),
    ("mooncake/instances/prefill", b'{"url": "http://h:1"}', "<role>/<id>"),
    ("mooncake/instances/chef/a", b'{"url": "http://h:1"}', "role"),
    ("mooncake/instances/prefill/a", b'{"url": "ftp://h:1"}', "http"),
    ("mooncake/instances/prefill/a", b'{"url": "http://h:1", "namespace": 3}', "namespace"),
    ("mooncake/instances/prefill/a", b" " * (65 << 10), "bytes"),
])
def test_bad_records_are_refused_with_a_reason(key, value, fragment):
    with pytest.raises(ValueError, match=None) as err:
        parse_record(key, value)
    assert fragment in str(err.value)


async def test_hot_blocks_are_replicated_next_to_the_chosen_prefill_off_the_request_path():
    """Blocks only the store holds: the Conductor asks for a replica next to the chosen prefill
    instance; the proxy runs the replicator in the background, bounded, and answers at once."""
    from scheduler.proxy.instances import InstanceSpec
    from scheduler.proxy.prompt import PromptHasher

    prefill, decode = await MiniEngine().start(), await MiniEngine().start()
    release = asyncio.Event()
    calls: list[tuple[list[str], str]] = []

    async def replicator(keys, inst) -> None:  # type: ignore[no-untyped-def]
        calls.append((list(keys), inst.id))
        await release.wait()

    proxy = Proxy([InstanceSpec(prefill.url, "prefill"), InstanceSpec(decode.url, "decode")],
                  settings=ProxySettings(port=0, health_interval=0.3, max_replications=1),
                  hasher=PromptHasher(NS), replicator=replicator)
    await proxy.start()
    try:
        prompts = [list(range(start, start + 64 * NS.block_size)) for start in (100, 5000)]
        keys = [proxy.hasher.analyze({"prompt": p}, chat=False).block_keys for p in prompts]
        for k in keys:  # held by the store only, as a store lookup reports it
            proxy.conductor.on_blocks_cached("store", list(k))
        async with httpx.AsyncClient(timeout=10) as client:
            for prompt in prompts:
                r = await client.post(f"{proxy.url}/v1/completions",
                                      json={"model": "mini", "prompt": prompt, "max_tokens": 2})
                assert r.status_code == 200, r.text  # not held up by the pending replication
            metrics = (await client.get(f"{proxy.url}/metrics")).text
        # The first is replicating (and blocks); the second is dropped: at most 1 at once.
        assert calls == [(list(keys[0]), f"prefill@127.0.0.1:{prefill.port}")]
        assert 'mooncake_proxy_replications_total{outcome="dropped"} 1.0' in metrics
        release.set()
        await _until(lambda: not proxy._replicating)
    finally:
        await proxy.stop()
        await prefill.stop()
        await decode.stop()


def test_connector_registration_settings_are_validated():
    from mooncake_connector.registry import instance_key, role_of_kv_role
    from mooncake_connector.vllm.config import ConnectorSettings

    s = ConnectorSettings.from_extra_config({"etcd_endpoints": "127.0.0.1:2379",
                                             "advertise_url": "http://10.0.0.1:8100",
                                             "registration_ttl_s": 5})
    assert s.registration_ttl_s == 5.0 and s.instance_role is None
    for bad, fragment in [({"etcd_endpoints": "h:1"}, "go together"),
                          ({"etcd_endpoints": 3, "advertise_url": "http://h:1"}, "etcd_endpoints"),
                          ({"etcd_endpoints": "h:1", "advertise_url": "http://h:1",
                            "instance_role": "chef"}, "instance_role"),
                          ({"registration_ttl_s": 0}, "registration_ttl_s")]:
        with pytest.raises(ValueError) as err:
            ConnectorSettings.from_extra_config(bad)
        assert fragment in str(err.value)
    assert [role_of_kv_role(r) for r in ("kv_producer", "kv_consumer", "kv_both", None)] == \
        ["prefill", "decode", "mixed", "mixed"]
    assert instance_key("decode", "d-0") == "mooncake/instances/decode/d-0"
    with pytest.raises(ValueError):
        instance_key("decode", "a/b")  # an id cannot escape its role's prefix
    with pytest.raises(ValueError):
        InstanceRecord("not a url", "prefill")


def test_cli_accepts_etcd_discovery_without_static_instances():
    from scheduler.proxy.cli import _instances, build_parser

    args = build_parser().parse_args(["--etcd-endpoints", "127.0.0.1:2379"])
    assert _instances(args) == [] and args.etcd_endpoints == "127.0.0.1:2379"
    with pytest.raises(ValueError, match="no instances"):
        _instances(build_parser().parse_args([]))
