"""Many clients, one holder: aggregate put/get throughput of ours and the real Mooncake store.

``store_bench.py`` measures one client's latency. A store node serves many engines at once, and
what matters there is what they move together, and whether tricks that cut one client's
latency (polling instead of sleeping) cost the others their CPU. Here ``K`` client processes
put ``--ops`` values of ``--size`` bytes each (``put_from``) into one holder's segment, then read
them all back (``get_into``), all starting together; the figure is total bytes over the slowest
client's time. Stores alternate per round (``--rounds``), the median is reported.

    python benchmarks/store_clients_bench.py [--clients 1,2,4] [--size-kib 1024] [--json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
from typing import Any

import store_bench as sb

MIB = 1 << 20


def _client(impl: str, master: str, size: int, ops: int, tag: str, barrier: Any,
            out: Any) -> None:
    os.environ["MOONCAKE_TRANSFER_ENABLE_SHM"] = "0"  # tcp, like the Mooncake side
    s = sb._setup(impl, master, 0, 64 * MIB)
    buf = (ctypes.c_char * size)()
    addr = ctypes.addressof(buf)
    ctypes.memset(addr, 0x5A, size)
    if s.register_buffer(addr, size) != 0:
        raise SystemExit("register_buffer failed")
    keys = [f"m/{tag}/{i}" for i in range(ops)]
    barrier.wait()
    t0 = sb.time.perf_counter()
    for k in keys:
        if s.put_from(k, addr, size) != 0:
            raise SystemExit(f"{impl}: put_from {k} failed")
    put_s = sb.time.perf_counter() - t0
    barrier.wait()
    t0 = sb.time.perf_counter()
    for k in keys:
        got = s.get_into(k, addr, size)
        if got != size:
            raise SystemExit(f"{impl}: get_into {k} failed ({got})")
    get_s = sb.time.perf_counter() - t0
    for k in keys:  # forced: the gets just took leases on them (as store_bench does)
        if s.remove(k, True) != 0:
            raise SystemExit(f"{impl}: remove {k} failed")
    out.put((put_s, get_s))
    s.close()


class _Store:
    """A master and one holder of ``impl``, up for the whole run."""

    def __init__(self, impl: str, segment_mib: int) -> None:
        self.impl = impl
        port = sb._free_port()
        if impl == "mooncake":
            cmd = [sb.MOONCAKE_MASTER, f"--rpc_port={port}", f"--metrics_port={sb._free_port()}",
                   "--enable_http_metadata_server=false"]
        else:
            cmd = [sys.executable, "-m", "store.master", "--rpc-port", str(port),
                   "--metrics-port", "0", "--enable-http-metadata-server", "false"]
        env = dict(os.environ, MOONCAKE_TRANSFER_ENABLE_SHM="0", PYTHONPATH=sb.python_path(),
                   GLOG_minloglevel="2")
        self.procs = [subprocess.Popen(cmd, cwd=sb.REPO, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)]
        sb._wait_port(port)
        self.master = f"127.0.0.1:{port}"
        if impl == "mooncake":
            holder = [sys.executable, sb.__file__, "--role", "holder", "--impl", impl,
                      "--master", self.master, "--segment-mib", str(segment_mib)]
        else:
            holder = [sys.executable, "-m", "store.node", "--local-hostname", "127.0.0.1",
                      "--master-server-address", self.master, "--global-segment-size",
                      str(segment_mib * MIB), "--log-level", "WARNING"]
        p = subprocess.Popen(holder, cwd=sb.REPO, env=env, text=True, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        assert p.stdout is not None
        if not p.stdout.readline().startswith("READY"):
            self.close()
            raise SystemExit(f"{impl} holder failed to start")

    def round(self, clients: int, size: int, ops: int, tag: str) -> tuple[float, float]:
        """(put GB/s, get GB/s) of ``clients`` processes together."""
        ctx = mp.get_context("spawn")  # no inherited engine threads or sockets
        barrier, out = ctx.Barrier(clients), ctx.Queue()
        procs = [ctx.Process(target=_client, args=(self.impl, self.master, size, ops,
                                                   f"{tag}/{i}", barrier, out))
                 for i in range(clients)]
        for p in procs:
            p.start()
        times: list[tuple[float, float]] = []
        try:
            while len(times) < clients:
                try:
                    times.append(out.get(timeout=1.0))
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise SystemExit(f"{self.impl}: a client failed (exit {dead[0]})")
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
        total = clients * ops * size
        return (total / max(t[0] for t in times) / 1e9, total / max(t[1] for t in times) / 1e9)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,2,4", help="client counts, comma-separated")
    parser.add_argument("--size-kib", type=int, default=1024)
    parser.add_argument("--ops", type=int, default=200, help="values each client puts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--impl", default="ours,mooncake")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    impls = [i for i in args.impl.split(",") if i]
    if "mooncake" in impls and not os.path.exists(sb.MOONCAKE_MASTER):
        print("mooncake_master not found: running ours only", file=sys.stderr)
        impls.remove("mooncake")
    counts = [int(c) for c in args.clients.split(",")]
    size = args.size_kib * 1024
    need = max(counts) * args.ops * size
    # Room for every value three times over: a round's values go before the next round's come,
    # but the store evicts (LRU) above 90% use, and that is not what this measures.
    segment_mib = max(512, 3 * need // MIB)
    stores = [_Store(impl, segment_mib) for impl in impls]
    rows: list[dict[str, Any]] = []
    try:
        for k in counts:
            got: dict[str, list[tuple[float, float]]] = {s.impl: [] for s in stores}
            for r in range(args.rounds):
                for s in stores[r % len(stores):] + stores[:r % len(stores)]:
                    got[s.impl].append(s.round(k, size, args.ops, f"{k}/{r}"))
            for impl, vals in got.items():
                rows.append({"impl": impl, "clients": k, "size": size,
                             "put_gbps": statistics.median(v[0] for v in vals),
                             "get_gbps": statistics.median(v[1] for v in vals),
                             "rounds": [list(v) for v in vals]})
    finally:
        for s in stores:
            s.close()
    if args.json:
        print(json.dumps({"rows": rows}, indent=1))
        return
    print(f"{'impl':10} {'clients':>7} {'size':>8} {'put GB/s':>9} {'get GB/s':>9}")
    for r in rows:
        print(f"{r['impl']:10} {r['clients']:>7} {r['size'] // 1024:>6}KiB "
              f"{r['put_gbps']:9.2f} {r['get_gbps']:9.2f}")


if __name__ == "__main__":
    main()
