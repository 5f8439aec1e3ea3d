"""PyMooncakeConnector behind two real OpenAI-compatible vLLM servers, P/D over HTTP.

The prefill server names the connector the module-path way (``kv_connector_module_path``); the
decode server names it without a module path, which works only through the
``vllm.general_plugins`` entry point ``mooncake_connector`` (setup.py) registering it at
start-up. Requests go through the ``openai`` client with ``kv_transfer_params`` in the body and
the same ``X-Request-Id`` on both sides, as the proxy sends them. The decode server's own
Prometheus counter ``vllm:prompt_tokens_by_source{source="external_kv_transfer"}`` shows it loaded
the prompt from the store.
"""
from __future__ import annotations

import random
import re
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from mooncake_connector.testing import VllmServer
from mooncake_connector.testing.store_cluster import StoreCluster

BLOCK = 64
# func_only: engine start-up (fixtures) is bounded by OfflineEngine/VllmServer.start itself
# (240 s each), which a shared 2-core machine can need; the test bodies stay bounded here.
pytestmark = pytest.mark.timeout(300, func_only=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with StoreCluster(segment_size=256 << 20, workdir=tmp_path_factory.mktemp("store")) as c:
        yield c


def _server(model: Path, ktc: dict, log: Path) -> VllmServer:
    return VllmServer(model, log_path=log, engine_args={
        "served_model_name": "tiny", "kv_transfer_config": ktc})


@pytest.fixture(scope="module")
def servers(tiny_model: Path, cluster: StoreCluster, tmp_path_factory: pytest.TempPathFactory):
    extra = {"store_config_path": str(cluster.config_path)}
    logs = tmp_path_factory.mktemp("servers")
    prefill = _server(tiny_model, {
        "kv_connector": "PyMooncakeConnector", "kv_connector_module_path": "mooncake_connector",
        "kv_role": "kv_producer", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra}, logs / "prefill.log")
    decode = _server(tiny_model, {  # no module path: resolved through the general plugin
        "kv_connector": "PyMooncakeConnector", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra},
        logs / "decode.log")
    try:  # start-up bound: ~30 s on a quiet machine, minutes when the 2 cores are shared
        prefill.start(timeout=600.0)
        decode.start(timeout=600.0)
        yield prefill, decode
    finally:
        decode.stop()
        prefill.stop()


def _external_tokens(server: VllmServer) -> float:
    return server.external_kv_tokens()


def test_pd_over_http_with_openai_client(servers) -> None:
    import openai

    prefill, decode = servers
    rng = random.Random(11)
    prompt = [rng.randrange(10, 2000) for _ in range(4 * BLOCK + 7)]
    p_client = openai.OpenAI(base_url=f"{prefill.url}/v1", api_key="x", timeout=60, max_retries=0)
    d_client = openai.OpenAI(base_url=f"{decode.url}/v1", api_key="x", timeout=60, max_retries=0)
    rid = f"pd-{uuid.uuid4().hex}"

    pre = p_client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0,
        extra_body={"kv_transfer_params": {"do_remote_decode": True}},
        extra_headers={"X-Request-Id": rid})
    params = pre.model_extra["kv_transfer_params"]
    assert params["do_remote_prefill"] is True
    assert params["num_tokens"] == 4 * BLOCK
    assert isinstance(params["namespace"], str) and isinstance(params["last_block_key"], str)

    loaded_before = _external_tokens(decode)
    dec = d_client.completions.create(
        model="tiny", prompt=prompt, max_tokens=8, temperature=0,
        extra_body={"kv_transfer_params": params, "ignore_eos": True,
                    "return_token_ids": True},
        extra_headers={"X-Request-Id": rid})
    assert _external_tokens(decode) - loaded_before == 4 * BLOCK

    # Reference: the same greedy request computed by the prefill server (plain vLLM compute).
    ref = p_client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    assert dec.choices[0].text == ref.choices[0].text
    assert dec.choices[0].model_extra["token_ids"] == ref.choices[0].model_extra["token_ids"]


def test_decode_with_foreign_namespace_recomputes(servers) -> None:
    """Params from an incompatible engine are refused (logged) and the request is computed."""
    import openai

    _, decode = servers
    d_client = openai.OpenAI(base_url=f"{decode.url}/v1", api_key="x", timeout=60, max_retries=0)
    prompt = [random.Random(12).randrange(10, 2000) for _ in range(2 * BLOCK + 1)]
    bogus = {"do_remote_prefill": True, "namespace": "0" * 16, "num_tokens": 2 * BLOCK,
             "last_block_key": "nope"}
    before = _external_tokens(decode)
    out = d_client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body={"kv_transfer_params": bogus})
    assert out.choices[0].finish_reason == "length"
    assert _external_tokens(decode) == before


def _metrics(server: VllmServer) -> str:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
        return r.read().decode()


def _sample(text: str, name: str) -> float:
    """The value of ``name`` (summed over label sets); 0 when the series has no sample yet."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def _wait_for(server: VllmServer, name: str, at_least: float, timeout: float = 20.0) -> float:
    """Stats reach /metrics with the engine's next step after a transfer: poll, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = _sample(_metrics(server), name)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_connector_stats_on_prometheus(servers) -> None:
    """Our counters and histograms are on vLLM's /metrics and move with a save and a hit."""
    import openai

    prefill, decode = servers
    names = ["vllm:pymooncake_lookups_total", "vllm:pymooncake_lookup_hit_blocks_total",
             "vllm:pymooncake_loaded_blocks_total", "vllm:pymooncake_loaded_bytes_total",
             "vllm:pymooncake_saved_blocks_total", "vllm:pymooncake_saved_bytes_total",
             "vllm:pymooncake_load_time_seconds_count", "vllm:pymooncake_save_time_seconds_count"]
    # A series appears with its first observation (earlier tests may have made it): absent = 0.
    text_p, text_d = _metrics(prefill), _metrics(decode)
    before_p = {n: _sample(text_p, n) for n in names}
    before_d = {n: _sample(text_d, n) for n in names}

    rng = random.Random(13)
    prompt = [rng.randrange(10, 2000) for _ in range(3 * BLOCK + 9)]
    rid = f"prom-{uuid.uuid4().hex}"
    p_client = openai.OpenAI(base_url=f"{prefill.url}/v1", api_key="x", timeout=60, max_retries=0)
    d_client = openai.OpenAI(base_url=f"{decode.url}/v1", api_key="x", timeout=60, max_retries=0)
    pre = p_client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0,
        extra_body={"kv_transfer_params": {"do_remote_decode": True}},
        extra_headers={"X-Request-Id": rid})
    params = pre.model_extra["kv_transfer_params"]
    d_client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                extra_body={"kv_transfer_params": params},
                                extra_headers={"X-Request-Id": rid})

    saved = _wait_for(prefill, "vllm:pymooncake_saved_blocks_total",
                      before_p["vllm:pymooncake_saved_blocks_total"] + 3)
    assert saved - before_p["vllm:pymooncake_saved_blocks_total"] == 3
    loaded = _wait_for(decode, "vllm:pymooncake_loaded_blocks_total",
                       before_d["vllm:pymooncake_loaded_blocks_total"] + 3)
    assert loaded - before_d["vllm:pymooncake_loaded_blocks_total"] == 3
    after_p, after_d = _metrics(prefill), _metrics(decode)
    assert "# TYPE vllm:pymooncake_load_time_seconds histogram" in after_d
    assert "# TYPE vllm:pymooncake_save_time_seconds histogram" in after_p
    block_bytes = (_sample(after_d, "vllm:pymooncake_loaded_bytes_total")
                   - before_d["vllm:pymooncake_loaded_bytes_total"]) / 3
    assert block_bytes > 0
    assert (_sample(after_p, "vllm:pymooncake_saved_bytes_total")
            - before_p["vllm:pymooncake_saved_bytes_total"]) == 3 * block_bytes
    assert _sample(after_p, "vllm:pymooncake_save_time_seconds_count") > \
        before_p["vllm:pymooncake_save_time_seconds_count"]
    assert _sample(after_d, "vllm:pymooncake_load_time_seconds_count") == \
        before_d["vllm:pymooncake_load_time_seconds_count"] + 1
    # The decode scheduler's lookup found the three promised blocks.
    assert _sample(after_d, "vllm:pymooncake_lookups_total") > before_d["vllm:pymooncake_lookups_total"]
    assert (_sample(after_d, "vllm:pymooncake_lookup_hit_blocks_total")
            - before_d["vllm:pymooncake_lookup_hit_blocks_total"]) == 3
