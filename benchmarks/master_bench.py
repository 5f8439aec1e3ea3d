"""Master metadata benchmark: put rate, batch_exists and get_replica_list latency, memory.

The master runs in its own process (``python -m store.master``); one async client drives it
over real TCP. At each level of stored objects (10k, 50k, 200k; 1M with ``--million``) it reports
the put rate of batch put_start+put_end of 256 x 4 KiB objects, batch_exists(256) p50/p99,
get_replica_list p50/p99, the master's RSS and the RSS growth per stored object.

    python benchmarks/master_bench.py [--json] [--million]

Targets (see the store spec): ~30k objects/s put, batch_exists(256) p50 <= ~300 us, flat in the
number of stored objects.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time

import psutil

from store.master import MasterClient, SegmentDesc
from transfer.testing import free_port, stop_process, wait_for_port

BATCH = 256
OBJ = 4096


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _fill(client: MasterClient, start: int, stop: int) -> float:
    """Put keys [start, stop) in batches; returns objects/s."""
    t0 = time.perf_counter()
    for lo in range(start, stop, BATCH):
        keys = [f"bench/{i:010d}" for i in range(lo, min(lo + BATCH, stop))]
        items = await client.batch_put_start("bench", keys, [OBJ] * len(keys))
        if any(item.code for item in items):
            raise RuntimeError(f"put_start failed: {[i.code for i in items if i.code][:3]}")
        codes = await client.batch_put_end("bench", keys)
        if any(codes):
            raise RuntimeError("put_end failed")
    return (stop - start) / (time.perf_counter() - t0)


async def _measure(client: MasterClient, stored: int, rounds: int) -> dict[str, float]:
    exists_us: list[float] = []
    for _ in range(rounds):
        keys = [f"bench/{random.randrange(stored):010d}" for _ in range(BATCH)]
        t0 = time.perf_counter()
        found = await client.batch_exists(keys)
        exists_us.append((time.perf_counter() - t0) * 1e6)
        assert all(found)
    get_us: list[float] = []
    for _ in range(rounds * 2):
        key = f"bench/{random.randrange(stored):010d}"
        t0 = time.perf_counter()
        await client.get_replica_list(key)
        get_us.append((time.perf_counter() - t0) * 1e6)
    return {
        "batch_exists_p50_us": _pct(exists_us, 0.5), "batch_exists_p99_us": _pct(exists_us, 0.99),
        "get_replica_list_p50_us": _pct(get_us, 0.5), "get_replica_list_p99_us": _pct(get_us, 0.99),
    }


async def run(levels: list[int], rounds: int) -> dict[str, object]:
    rpc, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "store.master", "--rpc_port", str(rpc), "--metrics_port",
         str(metrics), "--enable_http_metadata_server", "false", "--log_level", "WARNING",
         "--client_ttl", "3600"],
        stdout=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", rpc, timeout=30)
        master = psutil.Process(proc.pid)
        async with MasterClient(f"127.0.0.1:{rpc}", timeout=60.0) as client:
            await client.mount_segment(SegmentDesc(name="bench-seg", base=1 << 40,
                                                   size=1 << 43, client_id="bench"))
            await asyncio.sleep(0.2)
            rss0 = master.memory_info().rss
            results = []
            stored = 0
            for level in levels:
                rate = await _fill(client, stored, level)
                stored = level
                row: dict[str, float] = {"objects": level, "put_objects_per_s": rate}
                row.update(await _measure(client, stored, rounds))
                rss = master.memory_info().rss
                row["master_rss_mb"] = rss / 2**20
                row["bytes_per_object"] = (rss - rss0) / level
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
        return {"benchmark": "master", "batch": BATCH, "object_size": OBJ, "levels": results,
                "median_put_objects_per_s": statistics.median(r["put_objects_per_s"]
                                                              for r in results)}
    finally:
        stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--million", action="store_true", help="also measure at 1M objects")
    parser.add_argument("--rounds", type=int, default=300, help="latency samples per level")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10_000, 50_000, 200_000], help="comma-separated object counts")
    args = parser.parse_args(argv)
    levels = sorted(args.levels + ([1_000_000] if args.million else []))
    result = asyncio.run(run(levels, args.rounds))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in result["levels"]:  # type: ignore[union-attr]
            print(f"{row['objects']:>9,} objects: put {row['put_objects_per_s']:>8,.0f}/s  "
                  f"batch_exists p50 {row['batch_exists_p50_us']:.0f}us "
                  f"p99 {row['batch_exists_p99_us']:.0f}us  get p50 "
                  f"{row['get_replica_list_p50_us']:.0f}us  rss {row['master_rss_mb']:.0f}MB "
                  f"({row['bytes_per_object']:.0f} B/object)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
