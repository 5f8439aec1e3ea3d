"""Proxy overhead and routing cost, measured in parts.

1. ``decide``: the Conductor's routing decision for a 32k-token prompt (16 prefill + 16 decode).
2. ``tokenize``: tokenizing + hashing that prompt into block keys (tiny model's tokenizer).
3. ``store_lookup``: one batched existence lookup of its block keys against a real master.
4. ``overhead``: p50/p99 latency of requests through the proxy minus direct to the engine, at
   ``--concurrency`` streams, against minimal real HTTP engines that answer at once (so only the
   proxy's own cost is measured). Engines and the proxy run in their own processes.

Usage: python benchmarks/proxy_bench.py [--json] [--requests 2000] [--concurrency 100]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer.testing import free_port, wait_for_port  # noqa: E402


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def bench_decide(n: int = 2000) -> dict[str, float]:
    import random

    from scheduler.policy import Conductor, ConductorConfig, InstanceInfo, RequestInfo, Role

    c = Conductor(ConductorConfig(block_tokens=512, rejection="none"))
    for i in range(16):
        c.add_instance(InstanceInfo(f"p{i}", Role.PREFILL, cache_capacity_blocks=50_000))
        c.add_instance(InstanceInfo(f"d{i}", Role.DECODE))
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(64)]
    for i in range(16):  # every instance holds some prefix of the hot prompt
        c.on_blocks_cached(f"p{i}", base[: rng.randint(0, 64)])
    times = []
    for k in range(n):
        blocks = base[:32] + [rng.getrandbits(64) for _ in range(32)]
        t0 = time.perf_counter()
        d = c.decide(RequestInfo(f"r{k}", blocks, 32768, 64))
        times.append(time.perf_counter() - t0)
        c.on_request_dropped(d.request_id)
    return {"p50_ms": _pct(times, 50) * 1e3, "p99_ms": _pct(times, 99) * 1e3}


def bench_tokenize(n: int = 20) -> dict[str, float]:
    from mooncake_connector.testing import build_tiny_model
    from scheduler.proxy.prompt import PromptHasher
    from store.keys import KeyNamespace

    ns = KeyNamespace(model="tiny", kv_dtype="bfloat16", kv_layout="cpu", block_size=64)
    hasher = PromptHasher(ns, str(build_tiny_model("tiny")))
    words = "the moon cake cache keeps every block of the prompt ".split()
    prompt = " ".join(words[i % len(words)] for i in range(13_600))  # ~32k tokens
    tokens = len(hasher.token_ids({"prompt": prompt}, chat=False) or [])
    times, hash_times = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        info = hasher.analyze({"prompt": prompt}, chat=False)
        times.append(time.perf_counter() - t0)
    ids = hasher.token_ids({"prompt": prompt}, chat=False) or []
    from store.keys import block_keys

    for _ in range(n):
        t0 = time.perf_counter()
        block_keys(ns, ids)
        hash_times.append(time.perf_counter() - t0)
    return {"tokens": tokens, "blocks": len(info.block_keys),
            "tokenize_and_hash_p50_ms": _pct(times, 50) * 1e3,
            "hash_only_p50_ms": _pct(hash_times, 50) * 1e3}


def bench_store_lookup(n: int = 500) -> dict[str, float]:
    import subprocess

    from store.master.client import MasterClient

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "store.master", "--rpc_port", str(port),
                             "--enable_http_metadata_server", "false", "--metrics_port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 30)

        async def run() -> list[float]:
            client = MasterClient(f"127.0.0.1:{port}")
            keys = [f"mc1/_/bench/{i:064x}" for i in range(64)]
            await client.batch_exists(keys)
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                await client.batch_exists(keys)
                out.append(time.perf_counter() - t0)
            await client.close()
            return out

        times = asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(10)
    return {"keys": 64, "p50_ms": _pct(times, 50) * 1e3, "p99_ms": _pct(times, 99) * 1e3}


def _engines_main(ports: list[int], ready) -> None:  # type: ignore[no-untyped-def]
    import uvloop

    from scheduler.testing import MiniEngine

    async def run() -> None:
        for p in ports:
            await MiniEngine(port=p, tokens=8).start()
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(run())


def _proxy_main(port: int, prefill: str, decode: str, ready) -> None:  # type: ignore[no-untyped-def]
    import uvloop

    from scheduler.policy import ConductorConfig
    from scheduler.proxy import Proxy, ProxySettings
    from scheduler.proxy.instances import InstanceSpec

    async def run() -> None:
        specs = [InstanceSpec(prefill, "prefill"), InstanceSpec(decode, "decode")] if decode \
            else [InstanceSpec(prefill, "mixed")]
        proxy = Proxy(specs, settings=ProxySettings(port=port, health_interval=5),
                      conductor=ConductorConfig(rejection="none"))
        await proxy.start()
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(run())


async def _load(url: str, n: int, concurrency: int, stream: bool) -> list[float]:
    import aiohttp

    body = {"model": "mini", "prompt": "hello " * 50, "max_tokens": 8, "stream": stream}
    times: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def one() -> None:
            async with sem:
                t0 = time.perf_counter()
                async with s.post(f"{url}/v1/completions", json=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                times.append(time.perf_counter() - t0)

        await asyncio.gather(*(one() for _ in range(min(200, n))))  # warm-up
        times.clear()
        await asyncio.gather(*(one() for _ in range(n)))
    return times


def bench_overhead(n: int, concurrency: int) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    e_ports = [free_port(), free_port()]
    ready = ctx.Event()
    engines = ctx.Process(target=_engines_main, args=(e_ports, ready), daemon=True)
    engines.start()
    ready.wait(30)
    urls = [f"http://127.0.0.1:{p}" for p in e_ports]
    results: dict[str, dict[str, float]] = {}
    try:
        for mode, (prefill, decode) in {"mixed": (urls[0], ""), "pd": (urls[0], urls[1])}.items():
            port = free_port()
            pready = ctx.Event()
            proxy = ctx.Process(target=_proxy_main, args=(port, prefill, decode, pready), daemon=True)
            proxy.start()
            pready.wait(30)
            try:
                for stream in (False, True):
                    direct = asyncio.run(_load(urls[-1] if decode else urls[0], n, concurrency, stream))
                    via = asyncio.run(_load(f"http://127.0.0.1:{port}", n, concurrency, stream))
                    key = f"{mode}{'-stream' if stream else ''}"
                    results[key] = {
                        "direct_p50_ms": _pct(direct, 50) * 1e3, "proxy_p50_ms": _pct(via, 50) * 1e3,
                        "added_p50_ms": (_pct(via, 50) - _pct(direct, 50)) * 1e3,
                        "direct_p99_ms": _pct(direct, 99) * 1e3, "proxy_p99_ms": _pct(via, 99) * 1e3,
                    }
            finally:
                proxy.terminate()
                proxy.join(10)
    finally:
        engines.terminate()
        engines.join(10)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=100)
    args = ap.parse_args()
    out = {
        "decide_32k": bench_decide(),
        "tokenize_32k": bench_tokenize(),
        "store_lookup": bench_store_lookup(),
        "overhead": bench_overhead(args.requests, args.concurrency),
        "concurrency": args.concurrency,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    d, t, s = out["decide_32k"], out["tokenize_32k"], out["store_lookup"]
    print(f"decide (32k tokens, 16P+16D): p50 {d['p50_ms']:.3f} ms  p99 {d['p99_ms']:.3f} ms")
    print(f"tokenize+hash ({t['tokens']} tokens, {t['blocks']} blocks): p50 "
          f"{t['tokenize_and_hash_p50_ms']:.1f} ms (hash only {t['hash_only_p50_ms']:.2f} ms)")
    print(f"store lookup (64 keys): p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms")
    print(f"{'mode':<14}{'direct p50':>12}{'proxy p50':>12}{'added p50':>12}{'proxy p99':>12}")
    for mode, r in out["overhead"].items():
        print(f"{mode:<14}{r['direct_p50_ms']:>10.2f}ms{r['proxy_p50_ms']:>10.2f}ms"
              f"{r['added_p50_ms']:>10.2f}ms{r['proxy_p99_ms']:>10.2f}ms")


if __name__ == "__main__":
    main()
