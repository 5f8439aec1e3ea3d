"""Store benchmark: ours against the real Mooncake store, same script body, same machine.

Two processes on loopback besides the master: a *holder* that contributes the memory (our
``store.node``, or a Mooncake client with a global segment) and a *client* that contributes none
and runs ``put_from`` / ``get_into`` through the Mooncake-compatible API - so the exact same code
drives ``mooncake.store.MooncakeDistributedStore`` and ``store.MooncakeDistributedStore``.

Data path: values of 64 KiB, 1 MiB and 16 MiB; throughput (GB/s) and p50/p99 latency per op.
Ours runs twice: TCP only (``MOONCAKE_TRANSFER_ENABLE_SHM=0``) and with the same-host shm path.
Gets read each key ``--get-rounds`` times (our client caches replica locations under the lease,
so repeated gets skip the master hop; Mooncake asks the master every time).

Metadata path: ``batch_put_from`` of 4 KiB objects in batches of 256 until 10k / 50k / 200k
objects are stored, then ``batch_is_exist`` of 256 keys and ``get_into`` of 4 KiB at each level;
master RSS and RSS per object.

    python benchmarks/store_bench.py [--json] [--impl ours,mooncake] [--objects 10000,50000]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
SIZES = {"64KiB": 64 * KIB, "1MiB": MIB, "16MiB": 16 * MIB}
COUNTS = {64 * KIB: 400, MIB: 100, 16 * MIB: 16}
MOONCAKE_MASTER = shutil.which("mooncake_master") or os.path.join(
    os.path.dirname(sys.executable), "mooncake_master")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def _store_class(impl: str) -> Any:
    if impl == "mooncake":
        from mooncake.store import MooncakeDistributedStore
    else:
        sys.path.insert(0, REPO)
        from store import MooncakeDistributedStore
    return MooncakeDistributedStore


def _setup(impl: str, master: str, segment: int, local: int) -> Any:
    s = _store_class(impl)()
    rc = s.setup("127.0.0.1", "P2PHANDSHAKE", segment, local, "tcp", "", master)
    if rc != 0:
        raise SystemExit(f"{impl} setup failed: {rc}")
    return s


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


# -- roles run in subprocesses ---------------------------------------------------------------

def role_holder(impl: str, master: str, segment: int) -> None:
    s = _setup(impl, master, segment, 16 * MIB)
    print("READY", flush=True)
    sys.stdin.read()
    s.close()


def role_client(impl: str, master: str, get_rounds: int, objects: list[int],
                skip_data: bool) -> None:
    s = _setup(impl, master, 0, 64 * MIB)
    buf = (ctypes.c_char * (64 * MIB))()
    addr = ctypes.addressof(buf)
    ctypes.memset(addr, 0x5A, 64 * MIB)
    if s.register_buffer(addr, 64 * MIB) != 0:
        raise SystemExit("register_buffer failed")
    out: dict[str, Any] = {"data": [], "metadata": []}
    if not skip_data:
        for label, size in SIZES.items():
            n = COUNTS[size]
            keys = [f"d/{label}/{i}" for i in range(n)]
            lat_put = []
            t0 = time.perf_counter()
            for k in keys:
                t = time.perf_counter()
                if s.put_from(k, addr, size) != 0:
                    raise SystemExit(f"{impl} put_from {k} failed")
                lat_put.append(time.perf_counter() - t)
            put_s = time.perf_counter() - t0
            lat_get = []
            t0 = time.perf_counter()
            for _ in range(get_rounds):
                for k in keys:
                    t = time.perf_counter()
                    if s.get_into(k, addr + 32 * MIB, size) != size:
                        raise SystemExit(f"{impl} get_into {k} failed")
                    lat_get.append(time.perf_counter() - t)
            get_s = time.perf_counter() - t0
            for op, lat, secs, count in (("put_from", lat_put, put_s, n),
                                         ("get_into", lat_get, get_s, n * get_rounds)):
                out["data"].append({"size": label, "op": op, "gbps": count * size / secs / 1e9,
                                    "p50_us": _pct(lat, 0.5) * 1e6,
                                    "p99_us": _pct(lat, 0.99) * 1e6})
            s.remove_all(True)
    stored = 0
    batch = 256
    sz = 4 * KIB
    ptrs = [addr + i * sz for i in range(batch)]
    sizes = [sz] * batch
    for level in objects:
        t0 = time.perf_counter()
        added = 0
        while stored < level:
            keys = [f"m/{stored + i}" for i in range(batch)]
            codes = s.batch_put_from(keys, ptrs, sizes)
            if any(c != 0 for c in codes):
                raise SystemExit(f"{impl} batch_put_from failed: {set(codes)}")
            stored += batch
            added += batch
        put_rate = added / (time.perf_counter() - t0)
        lat_exist, lat_get = [], []
        for r in range(200):
            keys = [f"m/{(r * 997 + i * 31) % stored}" for i in range(batch)]
            t = time.perf_counter()
            res = s.batch_is_exist(keys)
            lat_exist.append(time.perf_counter() - t)
            if not all(x == 1 for x in res):
                raise SystemExit(f"{impl} batch_is_exist wrong")
        for r in range(500):
            k = f"m/{(r * 7919) % stored}"
            t = time.perf_counter()
            if s.get_into(k, addr + 32 * MIB, sz) != sz:
                raise SystemExit(f"{impl} get_into {k} failed")
            lat_get.append(time.perf_counter() - t)
        out["metadata"].append({"objects": stored, "put_objects_per_s": put_rate,
                                "batch_is_exist_p50_us": statistics.median(lat_exist) * 1e6,
                                "get_4k_p50_us": statistics.median(lat_get) * 1e6})
        print("LEVEL " + json.dumps(out["metadata"][-1]), flush=True)
        input()  # the orchestrator samples the master's RSS, then lets us go on
    s.unregister_buffer(addr)
    print("RESULT " + json.dumps(out), flush=True)
    s.close()


# -- orchestration ---------------------------------------------------------------------------

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_impl(impl: str, variant: str, args: argparse.Namespace, objects: list[int]) -> dict[str, Any]:
    port = _free_port()
    if impl == "mooncake":
        master = subprocess.Popen([MOONCAKE_MASTER, f"--rpc_port={port}",
                                   f"--metrics_port={_free_port()}",
                                   "--enable_http_metadata_server=false"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        master = subprocess.Popen([sys.executable, "-m", "store.master", "--rpc-port", str(port),
                                   "--metrics-port", "0", "--enable-http-metadata-server",
                                   "false"], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    procs = [master]
    env = dict(os.environ, MOONCAKE_TRANSFER_ENABLE_SHM="1" if variant == "shm" else "0",
               PYTHONPATH=REPO, GLOG_minloglevel="2")
    try:
        _wait_port(port)
        addr = f"127.0.0.1:{port}"
        seg = str(args.segment_mib * MIB)
        if impl == "mooncake":
            holder_cmd = [sys.executable, __file__, "--role", "holder", "--impl", impl,
                          "--master", addr, "--segment-mib", str(args.segment_mib)]
        else:
            holder_cmd = [sys.executable, "-m", "store.node", "--local-hostname", "127.0.0.1",
                          "--master-server-address", addr, "--global-segment-size", seg,
                          "--log-level", "WARNING"]
        holder = subprocess.Popen(holder_cmd, cwd=REPO, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(holder)
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"{impl} holder failed to start")
        client = subprocess.Popen(
            [sys.executable, __file__, "--role", "client", "--impl", impl, "--master", addr,
             "--get-rounds", str(args.get_rounds), "--objects",
             ",".join(map(str, objects)) or "0", *(["--skip-data"] if args.skip_data else [])],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        procs.append(client)
        assert client.stdout is not None and client.stdin is not None
        rss: list[int] = []
        for line in client.stdout:
            if line.startswith("LEVEL "):
                rss.append(_rss(master.pid))
                client.stdin.write("\n")
                client.stdin.flush()
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
                for row, r in zip(result["metadata"], rss):
                    row["master_rss_mb"] = r / MIB
                    row["master_bytes_per_object"] = r / max(row["objects"], 1)
                return result
        raise SystemExit(f"{impl}/{variant} client failed (rc {client.wait()})")
    finally:
        for p in reversed(procs):
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--impl", default="ours,mooncake")
    parser.add_argument("--objects", default="10000,50000,200000")
    parser.add_argument("--get-rounds", type=int, default=2)
    parser.add_argument("--segment-mib", type=int, default=2048)
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--role", choices=["holder", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    objects = [int(x) for x in args.objects.split(",") if x and int(x) > 0]
    if args.role == "holder":
        role_holder(args.impl, args.master, args.segment_mib * MIB)
        return 0
    if args.role == "client":
        role_client(args.impl, args.master, args.get_rounds, objects, args.skip_data)
        return 0
    runs = []
    for impl in args.impl.split(","):
        if impl == "mooncake" and not os.path.exists(MOONCAKE_MASTER):
            print("mooncake not installed: skipping it", file=sys.stderr)
            continue
        for variant in (("tcp", "shm") if impl == "ours" else ("tcp",)):
            result = run_impl(impl, variant, args, objects if variant == "tcp" else [])
            runs.append({"impl": impl, "path": variant, **result})
    if args.json:
        print(json.dumps({"runs": runs}, indent=1))
        return 0
    print(f"{'impl':10} {'path':4} {'size':6} {'op':9} {'GB/s':>7} {'p50 us':>9} {'p99 us':>9}")
    for run in runs:
        for r in run["data"]:
            print(f"{run['impl']:10} {run['path']:4} {r['size']:6} {r['op']:9} {r['gbps']:7.2f} "
                  f"{r['p50_us']:9.0f} {r['p99_us']:9.0f}")
    print(f"\n{'impl':10} {'objects':>8} {'put obj/s':>10} {'exist256 p50':>13} "
          f"{'get4k p50':>10} {'master MB':>10} {'B/object':>9}")
    for run in runs:
        for r in run["metadata"]:
            print(f"{run['impl']:10} {r['objects']:8} {r['put_objects_per_s']:10.0f} "
                  f"{r['batch_is_exist_p50_us']:13.0f} {r['get_4k_p50_us']:10.0f} "
                  f"{r.get('master_rss_mb', 0):10.0f} {r.get('master_bytes_per_object', 0):9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
