"""Proxy overhead and routing cost, measured in parts.

1. ``decide``: the Conductor's routing decision for a 32k-token prompt (16 prefill + 16 decode).
2. ``tokenize``: tokenizing + hashing that prompt into block keys (tiny model's tokenizer).
3. ``store_lookup``: one batched existence lookup of its block keys against a real master.
4. ``overhead`` (the target): the latency a request gains by going through the proxy. Open loop:
   ``--concurrency`` long streams stay in flight (tokens every ``--stream-interval`` s), and
   short probe requests arrive at a fixed ``--rate`` below saturation; added p50 = p50 through
   the proxy minus p50 direct to the engine, under the same background. Minimal real HTTP
   engines answer at once, so only the proxy's own cost is measured.
5. ``throughput``: closed loop, ``--concurrency`` clients back to back. Its latencies are queueing
   (Little's law: concurrency / throughput), so they measure capacity, not per-request cost.
Engines and the proxy run in processes of their own; the load generator in this one.

Usage: python benchmarks/proxy_bench.py [--json] [--requests 2000] [--concurrency 100]
       [--rate 100] [--duration 10] [--only overhead]
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


async def _closed_loop(url: str, n: int, concurrency: int, stream: bool) -> tuple[list[float], float]:
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
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - t0
    return times, n / elapsed


async def _open_loop(url: str, rate: float, duration: float, streams: int, interval: float,
                     stream: bool) -> list[float]:
    """Probe latencies at ``rate``/s while ``streams`` long streams stay in flight."""
    import aiohttp

    probe = {"model": "mini", "prompt": "hello " * 50, "max_tokens": 8, "stream": stream}
    long_body = {"model": "mini", "prompt": "hello " * 50, "max_tokens": 1_000_000,
                 "stream": True, "mini_token_interval": interval}
    times: list[float] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def background() -> None:
            while not stop.is_set():
                async with s.post(f"{url}/v1/completions", json=long_body) as r:
                    async for _ in r.content.iter_any():
                        if stop.is_set():
                            break

        async def one() -> None:
            t0 = time.perf_counter()
            async with s.post(f"{url}/v1/completions", json=probe) as r:
                await r.read()
                assert r.status == 200, r.status
            times.append(time.perf_counter() - t0)

        bg = [asyncio.create_task(background()) for _ in range(streams)]
        await asyncio.sleep(1.0)  # the streams are open and flowing
        probes = []
        start = time.perf_counter()
        for i in range(int(rate * duration)):  # a fixed schedule, whatever the answers do
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            probes.append(asyncio.create_task(one()))
        await asyncio.gather(*probes)
        stop.set()
        for t in bg:
            t.cancel()
        await asyncio.gather(*bg, return_exceptions=True)
    return times


def _row(direct: list[float], via: list[float]) -> dict[str, float]:
    return {"direct_p50_ms": _pct(direct, 50) * 1e3, "proxy_p50_ms": _pct(via, 50) * 1e3,
            "added_p50_ms": (_pct(via, 50) - _pct(direct, 50)) * 1e3,
            "direct_p99_ms": _pct(direct, 99) * 1e3, "proxy_p99_ms": _pct(via, 99) * 1e3,
            "added_p99_ms": (_pct(via, 99) - _pct(direct, 99)) * 1e3}


def bench_overhead(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    import uvloop

    ctx = mp.get_context("spawn")
    e_ports = [free_port(), free_port()]
    ready = ctx.Event()
    engines = ctx.Process(target=_engines_main, args=(e_ports, ready), daemon=True)
    engines.start()
    ready.wait(30)
    urls = [f"http://127.0.0.1:{p}" for p in e_ports]
    results: dict[str, dict[str, dict[str, float]]] = {"open_loop": {}, "closed_loop": {}}
    try:
        for mode, (prefill, decode) in {"mixed": (urls[0], ""), "pd": (urls[0], urls[1])}.items():
            port = free_port()
            pready = ctx.Event()
            proxy = ctx.Process(target=_proxy_main, args=(port, prefill, decode, pready), daemon=True)
            proxy.start()
            pready.wait(30)
            direct_url, via_url = urls[-1] if decode else urls[0], f"http://127.0.0.1:{port}"
            try:
                for stream in (False, True):
                    key = f"{mode}{'-stream' if stream else ''}"
                    ol = (args.rate, args.duration, args.concurrency, args.stream_interval, stream)
                    direct = uvloop.run(_open_loop(direct_url, *ol))
                    via = uvloop.run(_open_loop(via_url, *ol))
                    results["open_loop"][key] = _row(direct, via)
                    if args.only == "overhead":
                        continue
                    direct, d_rps = uvloop.run(_closed_loop(direct_url, args.requests,
                                                            args.concurrency, stream))
                    via, v_rps = uvloop.run(_closed_loop(via_url, args.requests,
                                                         args.concurrency, stream))
                    results["closed_loop"][key] = dict(_row(direct, via), direct_rps=d_rps,
                                                       proxy_rps=v_rps)
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
    ap.add_argument("--concurrency", type=int, default=100,
                    help="long streams in flight (open loop) / clients (closed loop)")
    ap.add_argument("--rate", type=float, default=100.0, help="open-loop probes per second")
    ap.add_argument("--duration", type=float, default=10.0, help="open-loop seconds per run")
    ap.add_argument("--stream-interval", type=float, default=0.1,
                    help="seconds between tokens of the long streams (the TBT SLO)")
    ap.add_argument("--only", choices=["overhead"], help="skip decide/tokenize/lookup/closed loop")
    args = ap.parse_args()
    out: dict = {"concurrency": args.concurrency, "rate": args.rate}
    if args.only != "overhead":
        out.update(decide_32k=bench_decide(), tokenize_32k=bench_tokenize(),
                   store_lookup=bench_store_lookup())
    out["overhead"] = bench_overhead(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    _print(out)


def _print(out: dict) -> None:
    for kind, rows in out["overhead"].items():
        if not rows:
            continue
        what = (f"open loop: {out['rate']:.0f} probes/s, {out['concurrency']} long streams in flight"
                if kind == "open_loop" else f"closed loop: {out['concurrency']} clients")
        print(what)
        print(f"{'mode':<14}{'direct p50':>12}{'proxy p50':>12}{'added p50':>12}{'added p99':>12}"
              f"{'proxy req/s':>13}")
        for mode, r in rows.items():
            print(f"{mode:<14}{r['direct_p50_ms']:>10.2f}ms{r['proxy_p50_ms']:>10.2f}ms"
                  f"{r['added_p50_ms']:>10.2f}ms{r['added_p99_ms']:>10.2f}ms"
                  f"{r.get('proxy_rps', float('nan')):>13.0f}")
    if "decide_32k" not in out:
        return
    d, t, s = out["decide_32k"], out["tokenize_32k"], out["store_lookup"]
    print(f"decide (32k tokens, 16P+16D): p50 {d['p50_ms']:.3f} ms  p99 {d['p99_ms']:.3f} ms")
    print(f"tokenize+hash ({t['tokens']} tokens, {t['blocks']} blocks): p50 "
          f"{t['tokenize_and_hash_p50_ms']:.1f} ms (hash only {t['hash_only_p50_ms']:.2f} ms)")
    print(f"store lookup (64 keys): p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms")


if __name__ == "__main__":
    main()
