"""P2P store fan-out: N concurrent getters vs N sequential downloads from the single origin.

Every node is a real ``mooncake-p2p`` process on loopback. Getters reach their peers through
:mod:`store.p2p.throttle` relays that cap each peer's upload (loopback has no NIC limit), so
the sequential baseline is bounded by the origin's cap and the concurrent run by the sum of the
caps of every node that already holds chunks - the point of a P2P store.

    python benchmarks/p2p_bench.py --getters 4 --size-mib 128 --rate-mib 40 [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from store.p2p.throttle import ThrottledMetadataProxy
from transfer.metadata import HttpMetadataServer

MiB = 1 << 20


async def _node(url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "store.p2p", "--metadata-server", url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not raw:
        raise RuntimeError(f"node failed: {(await proc.stderr.read()).decode()[-2000:]}")
    return json.loads(raw)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    size = args.size_mib * MiB
    src = tmp / "object.bin"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    timeout = 30 + 3 * size * args.getters / (args.rate_mib * MiB)
    procs: list[asyncio.subprocess.Process] = []
    async with HttpMetadataServer(port=0) as srv, \
            ThrottledMetadataProxy(srv.url, args.rate_mib * MiB) as proxy:
        try:
            origin = await _node(srv.url, "register", "bench/obj", str(src),
                                 "--chunk-size", str(args.chunk_mib * MiB))
            procs.append(origin)
            await _line(origin, 60)
            # Sequential: each getter exits (and delists itself) before the next starts, so
            # every download comes from the origin alone.
            seq: list[float] = []
            seq_wall = time.perf_counter()
            for i in range(args.getters):
                p = await _node(proxy.url, "get", "bench/obj", str(tmp / f"s{i}"), "--json")
                procs.append(p)
                seq.append((await _line(p, timeout))["seconds"])
                await p.wait()
            seq_wall = time.perf_counter() - seq_wall
            # Concurrent: all at once, each serving (whole and partial copies) to the others.
            start = time.perf_counter()
            getters = [await _node(proxy.url, "get", "bench/obj", str(tmp / f"c{i}"), "--json",
                                   "--serve") for i in range(args.getters)]
            procs += getters
            results = await asyncio.gather(*(_line(p, timeout) for p in getters))
            conc_wall = time.perf_counter() - start
        finally:
            for p in procs:
                await _stop(p)
    total = size * args.getters
    conc_span = max(r["seconds"] for r in results)
    from_peers = sum(s["bytes"] for r in results for seg, s in r["sources"].items()
                     if not s.get("origin") and seg != _origin_of(results)) if results else 0
    return {
        "getters": args.getters, "size_mib": args.size_mib, "chunk_mib": args.chunk_mib,
        "upload_cap_mib_s": args.rate_mib,
        "sequential": {"seconds": seq, "sum_s": sum(seq), "wall_s": seq_wall,
                       "aggregate_mib_s": total / MiB / sum(seq)},
        "concurrent": {"seconds": [r["seconds"] for r in results], "span_s": conc_span,
                       "wall_s": conc_wall, "aggregate_mib_s": total / MiB / conc_span,
                       "bytes_from_non_origin_mib": from_peers / MiB,
                       "per_getter_sources": [
                           {seg: s["bytes"] // MiB for seg, s in r["sources"].items()}
                           for r in results]},
        "speedup": sum(seq) / conc_span,
    }


def _origin_of(results: list[dict[str, Any]]) -> str:
    # The origin is the one source every getter knew from the start; getters are the others.
    getters = {r["segment"] for r in results}
    common = set.intersection(*(set(r["sources"]) for r in results)) - getters
    return next(iter(common), "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--getters", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--chunk-mib", type=int, default=2)
    ap.add_argument("--rate-mib", type=float, default=40.0, help="per-peer upload cap, MiB/s")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="p2p-bench-") as tmp:
        out = asyncio.run(_bench(args, Path(tmp)))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        s, c = out["sequential"], out["concurrent"]
        print(f"{args.getters} getters x {args.size_mib} MiB, upload cap {args.rate_mib} MiB/s "
              f"per peer")
        print(f"  sequential from origin: {s['aggregate_mib_s']:.1f} MiB/s aggregate "
              f"({s['sum_s']:.2f} s)")
        print(f"  concurrent P2P:         {c['aggregate_mib_s']:.1f} MiB/s aggregate "
              f"({c['span_s']:.2f} s), {c['bytes_from_non_origin_mib']:.0f} MiB from peers")
        print(f"  speedup {out['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
