"""Hot-spot replication through the proxy: a real master, two store nodes, real HTTP engines."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from _store_util import NodeProcess, master_process, new_client
from scheduler.proxy import Proxy, ProxySettings
from scheduler.proxy.discovery import parse_record
from scheduler.proxy.instances import InstanceSpec
from scheduler.proxy.prompt import PromptHasher
from scheduler.proxy.replication import StoreReplicator
from scheduler.testing import MiniEngine
from store.keys import KeyNamespace, RequestExtras, block_keys
from store.master import MasterClient, ReplicateConfig
from transfer.config import MooncakeConfig

pytestmark = pytest.mark.timeout(60)

NS = KeyNamespace(model="mini", kv_dtype="float16", kv_layout="nhd", block_size=16)


def test_store_segment_travels_in_etcd_records_and_specs():
    from mooncake_connector.registry import InstanceRecord

    rec = InstanceRecord("http://10.0.0.1:8100", "prefill", {}, "p0", store_segment="10.0.0.1:9000")
    spec = parse_record(rec.key, rec.encode())
    assert spec.store_segment == "10.0.0.1:9000" and spec.id == "p0"
    assert "store_segment" not in InstanceRecord("http://h:1", "decode").encode().decode()
    with pytest.raises(ValueError):
        parse_record("mooncake/instances/prefill/x", b'{"url": "http://h:1", "store_segment": 5}')


async def test_decision_with_replicate_blocks_copies_them_next_to_the_chosen_instance():
    tokens = list(range(1, 65))  # 4 blocks of 16 tokens
    keys = block_keys(NS, tokens, RequestExtras(cache_salt=None, lora_name=None))
    assert len(keys) == 4
    with master_process() as master:
        a, b = NodeProcess(master), NodeProcess(master)
        try:
            seg_a, seg_b = a.segments[0], b.segments[0]
            values = {k: bytes([i + 1]) * 3000 for i, k in enumerate(keys)}
            writer = await asyncio.to_thread(new_client, master, global_segment_size=0)
            for k, v in values.items():
                await asyncio.to_thread(writer.put, k, v, ReplicateConfig(preferred_segment=seg_a))
            await asyncio.to_thread(writer.close)

            engine = await MiniEngine().start()
            mc = MasterClient(master)
            replicator = await StoreReplicator.create(master, MooncakeConfig().replace(
                local_hostname="127.0.0.1", metadata_server="P2PHANDSHAKE"))
            proxy = Proxy([InstanceSpec(engine.url, "mixed", store_segment=seg_b)],
                          settings=ProxySettings(port=0, health_interval=0.2),
                          hasher=PromptHasher(NS),
                          store_lookup=lambda ks: mc.batch_exists(list(ks)),
                          replicator=replicator)
            await proxy.start()
            try:
                async with httpx.AsyncClient(timeout=10) as http:
                    for _ in range(50):
                        if (await http.get(f"{proxy.url}/health")).status_code == 200:
                            break
                        await asyncio.sleep(0.1)
                    r = await http.post(f"{proxy.url}/v1/completions",
                                        json={"model": "mini", "prompt": tokens, "max_tokens": 2})
                    assert r.status_code == 200, r.text
                    for _ in range(100):
                        reply = await mc.batch_get_replica_list(list(keys))
                        if all(sorted(x.segment for x in it.replicas) == sorted([seg_a, seg_b])
                               for it in reply.items):
                            break
                        await asyncio.sleep(0.1)
                    else:
                        pytest.fail(f"not replicated to {seg_b}: {reply.items}")
                    metrics = (await http.get(f"{proxy.url}/metrics")).text
                    assert 'mooncake_proxy_replications_total{outcome="done"} 1.0' in metrics
            finally:
                await proxy.stop()
                await replicator.close()
                await mc.close()
                await engine.stop()
            # the replica alone serves the exact bytes once the original's node is gone
            a.kill9()
            reader = await asyncio.to_thread(new_client, master, global_segment_size=0)
            try:
                got = await asyncio.to_thread(reader.get_batch, list(keys))
                assert got == [values[k] for k in keys]
            finally:
                await asyncio.to_thread(reader.close)
        finally:
            a.stop()
            b.stop()
