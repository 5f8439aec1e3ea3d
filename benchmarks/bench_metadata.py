"""Latency and throughput of the metadata stores: HTTP server (a real subprocess) and etcd.

What the transfer engine pays per descriptor lookup when its cache misses, and how many
publish/lookup operations a single metadata server sustains.

    .venv/bin/python benchmarks/bench_metadata.py [--backends http,etcd] [--ops 2000]
        [--concurrency 16] [--value-size 1024] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Any

from transfer.metadata import MetadataStore, open_metadata_store, segment_key
from transfer.testing import EtcdServer, stop_process


def start_http_server(stack: ExitStack) -> str:
    """``python -m transfer.metadata --port 0`` in a subprocess; returns its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "transfer.metadata", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    stack.callback(stop_process, proc)
    assert proc.stdout is not None
    stack.callback(proc.stdout.close)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(30):
            raise TimeoutError("metadata server did not start")
    return proc.stdout.readline().decode().strip().rsplit(" ", 1)[1]


async def timed(
    op: Callable[[int], Awaitable[object]], ops: int, concurrency: int
) -> dict[str, Any]:
    """Run ``op(i)`` for i < ops with ``concurrency`` workers; latency percentiles in µs."""
    latencies: list[float] = []
    counter = iter(range(ops))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else latencies * 99
    return {
        "ops": ops,
        "concurrency": concurrency,
        "ops_per_s": round(ops / elapsed, 1),
        "p50_us": round(q[49] * 1e6, 1),
        "p99_us": round(q[98] * 1e6, 1),
        "max_us": round(latencies[-1] * 1e6, 1),
    }


async def bench_store(
    store: MetadataStore, ops: int, concurrency: int, value: bytes
) -> dict[str, Any]:
    keys = [segment_key(f"10.0.{i // 250}.{i % 250}:{12000 + i % 7}") for i in range(256)]
    results: dict[str, Any] = {}
    # Warm-up: connections, etcd channel, server code paths.
    await asyncio.gather(*(store.put(k, value) for k in keys))

    async def put(i: int) -> None:
        await store.put(keys[i % len(keys)], value)

    async def get(i: int) -> None:
        assert await store.get(keys[i % len(keys)]) is not None

    async def cas(i: int) -> None:
        key = keys[i % len(keys)]
        found = await store.get_with_version(key)
        assert found is not None
        await store.compare_and_set(key, value, found[1])

    for name, op in (("put", put), ("get", get), ("get+cas", cas)):
        results[f"{name}_serial"] = await timed(op, max(ops // 4, 10), 1)
        results[f"{name}_concurrent"] = await timed(op, ops, concurrency)
    t0 = time.perf_counter()
    listed = await store.list("mooncake/ram/")
    results["list_256_keys_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    assert len(listed) == len(keys)
    return results


async def run(args: argparse.Namespace, urls: dict[str, str]) -> dict[str, Any]:
    value = os.urandom(args.value_size)
    out: dict[str, Any] = {}
    for backend, url in urls.items():
        store = open_metadata_store(url)
        try:
            out[backend] = await bench_store(store, args.ops, args.concurrency, value)
        finally:
            await store.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="http,etcd")
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--value-size", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    with ExitStack() as stack:
        urls: dict[str, str] = {}
        for backend in backends:
            if backend == "http":
                urls["http"] = start_http_server(stack)
            elif backend == "etcd":
                if shutil.which("etcd") is None:
                    print("etcd not installed: skipping etcd", file=sys.stderr)
                    continue
                urls["etcd"] = "etcd://" + stack.enter_context(EtcdServer()).endpoint
            else:
                parser.error(f"unknown backend {backend!r}")
        results = asyncio.run(run(args, urls))
    report = {
        "benchmark": "metadata",
        "value_size": args.value_size,
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for backend, rows in results.items():
            print(f"== {backend} (value {args.value_size} B)")
            for name, row in rows.items():
                if isinstance(row, dict):
                    print(f"  {name:20s} {row['ops_per_s']:>9.1f} op/s"
                          f"  p50 {row['p50_us']:>8.1f} µs  p99 {row['p99_us']:>8.1f} µs"
                          f"  (x{row['concurrency']})")
                else:
                    print(f"  {name:20s} {row} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
