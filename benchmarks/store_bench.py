"""Store benchmark: ours against the real Mooncake store, same script body, same machine.

Two processes on loopback besides the master: a *holder* that contributes the memory (our
``store.node``, or a Mooncake client with a global segment) and a *client* that contributes none
and runs ``put_from`` / ``get_into`` through the Mooncake-compatible API - so the exact same code
drives ``mooncake.store.MooncakeDistributedStore`` and ``store.MooncakeDistributedStore``.

Data path: values of 64 KiB, 1 MiB and 16 MiB; throughput (GB/s) and p50/p99 latency per op.
Ours runs twice: TCP only (``MOONCAKE_TRANSFER_ENABLE_SHM=0``) and with the same-host shm path.
Gets read each key ``--get-rounds`` times (our client caches replica locations under the lease,
so repeated gets skip the master hop; Mooncake asks the master every time). All stores run at
once and take turns: each size is ``--rounds`` rounds, and inside a round every store does its
share in a rotating order, so a busy spell of the machine falls on all of them alike (the
``rnd med`` column is the median of the per-round rates; ``GB/s`` is over all rounds). The
``floor`` rows are bare Python sockets writing the same sizes (split over streams as our client
splits them) into fresh, pre-populated ``/dev/shm`` pages of another process: the loopback TCP
and memory cost any store's put pays on this machine, before its metadata round trips.

Metadata path: ``batch_put_from`` of 4 KiB objects in batches of 256 until 10k / 50k / 200k
objects are stored, then ``batch_is_exist`` of 256 keys and ``get_into`` of 4 KiB at each level;
master RSS and RSS per object (store after store).

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


def python_path() -> str:
    """This repository first, then whatever ``PYTHONPATH`` already holds (packages installed
    with ``pip --target``, as on a host where pip cannot reach an index)."""
    return os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)


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

def role_floor_receiver(segment: int) -> None:
    """The floor's holder: bare sockets writing into fresh, pre-populated /dev/shm pages - what a
    holder's memory is - at a new offset for every message, as a store's allocator does."""
    import mmap
    import socket
    import threading

    fd = os.open(f"/dev/shm/store-bench-floor-{os.getpid()}", os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink(f"/dev/shm/store-bench-floor-{os.getpid()}")
    os.ftruncate(fd, segment)
    mem = mmap.mmap(fd, segment)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(ctypes.addressof(ctypes.c_char.from_buffer(mem)), segment, 23)  # POPULATE_WRITE
    view = memoryview(mem)
    cursor = [0]
    lock = threading.Lock()
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"READY {listener.getsockname()[1]}", flush=True)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = bytearray(8)
        while conn.recv_into(head, 8, socket.MSG_WAITALL) == 8:
            n = int.from_bytes(head, "big")
            with lock:
                at = cursor[0] if cursor[0] + n <= segment else 0
                cursor[0] = at + n
            dst = view[at:at + n]
            while dst:
                dst = dst[conn.recv_into(dst):]
            conn.sendall(b"k")

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _floor_streams(size: int) -> int:
    """How many streams our client splits a write of ``size`` over on this host."""
    sys.path.insert(0, REPO)
    from store.client.direct import one_stream_bytes

    if one_stream_bytes(size) >= size:  # one exchange (hosts with few cores)
        return 1
    return 1 if size <= 512 * KIB else (2 if size <= 4 * MIB else 4)


def run_floor(segment_mib: int) -> list[dict[str, Any]]:
    """Bare-socket writes of each size (split over streams as our client splits them), into a
    receiver like a holder: the loopback TCP + memory floor any store's put pays here."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    recv = subprocess.Popen([sys.executable, __file__, "--role", "floor",
                             "--segment-mib", str(segment_mib)], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        line = recv.stdout.readline()
        if not line.startswith("READY "):
            raise SystemExit("floor receiver failed to start")
        port = int(line.split()[1])
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for so in socks:
            so.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        src = memoryview(bytearray(b"\x5a") * (16 * MIB))
        pool = ThreadPoolExecutor(3)

        def send(so: socket.socket, n: int) -> None:
            so.sendmsg([n.to_bytes(8, "big"), src[:n]])
            if so.recv(1) != b"k":
                raise ConnectionError("floor receiver closed")

        rows = []
        for label, size in SIZES.items():
            streams = _floor_streams(size)
            piece = size // streams
            lat = []
            t0 = time.perf_counter()
            for _ in range(COUNTS[size]):
                t = time.perf_counter()
                futures = [pool.submit(send, so, piece) for so in socks[1:streams]]
                send(socks[0], piece)
                for f in futures:
                    f.result()
                lat.append(time.perf_counter() - t)
            secs = time.perf_counter() - t0
            rows.append({"size": label, "op": "write", "gbps": COUNTS[size] * size / secs / 1e9,
                         "p50_us": _pct(lat, 0.5) * 1e6, "streams": streams})
        pool.shutdown()
        for so in socks:
            so.close()
        return rows
    finally:
        recv.kill()
        recv.wait()


def role_holder(impl: str, master: str, segment: int) -> None:
    s = _setup(impl, master, segment, 16 * MIB)
    print("READY", flush=True)
    sys.stdin.read()
    s.close()


def _data_round(s: Any, tag: str, size: int, n: int, get_rounds: int, addr: int) -> dict[str, Any]:
    """``n`` put_from of ``size`` bytes, then ``get_rounds`` get_into of each; latencies in s."""
    keys = [f"d/{tag}/{i}" for i in range(n)]
    lat_put: list[float] = []
    t0 = time.perf_counter()
    for k in keys:
        t = time.perf_counter()
        if s.put_from(k, addr, size) != 0:
            raise SystemExit(f"put_from {k} failed")
        lat_put.append(time.perf_counter() - t)
    put_s = time.perf_counter() - t0
    lat_get: list[float] = []
    t0 = time.perf_counter()
    for _ in range(get_rounds):
        for k in keys:
            t = time.perf_counter()
            if s.get_into(k, addr + 32 * MIB, size) != size:
                raise SystemExit(f"get_into {k} failed")
            lat_get.append(time.perf_counter() - t)
    get_s = time.perf_counter() - t0
    s.remove_all(True)
    return {"put_from": [put_s, n * size, lat_put], "get_into": [get_s, n * size * get_rounds, lat_get]}


def _metadata(s: Any, impl: str, objects: list[int], addr: int) -> list[dict[str, Any]]:
    rows = []
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
        rows.append({"objects": stored, "put_objects_per_s": put_rate,
                     "batch_is_exist_p50_us": statistics.median(lat_exist) * 1e6,
                     "get_4k_p50_us": statistics.median(lat_get) * 1e6})
        print("LEVEL " + json.dumps(rows[-1]), flush=True)
        input()  # the orchestrator samples the master's RSS, then lets us go on
    return rows


def role_client(impl: str, master: str) -> None:
    """Serve the orchestrator's commands, one per stdin line, answering on stdout:
    ``data <tag> <size> <count> <get_rounds>``, ``metadata <levels>``, ``quit``."""
    s = _setup(impl, master, 0, 64 * MIB)
    buf = (ctypes.c_char * (64 * MIB))()
    addr = ctypes.addressof(buf)
    ctypes.memset(addr, 0x5A, 64 * MIB)
    if s.register_buffer(addr, 64 * MIB) != 0:
        raise SystemExit("register_buffer failed")
    print("READY", flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "data":
            tag, size, n, rounds = rest[0], int(rest[1]), int(rest[2]), int(rest[3])
            print("ROUND " + json.dumps(_data_round(s, tag, size, n, rounds, addr)), flush=True)
        elif cmd == "metadata":
            levels = [int(x) for x in rest[0].split(",") if int(x) > 0]
            print("RESULT " + json.dumps(_metadata(s, impl, levels, addr)), flush=True)
        else:
            break
    s.unregister_buffer(addr)
    s.close()


# -- orchestration ---------------------------------------------------------------------------

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Stack:
    """One store under test: master, holder and a command-driven client process."""

    def __init__(self, impl: str, variant: str, segment_mib: int) -> None:
        self.impl, self.variant = impl, variant
        self.procs: list[subprocess.Popen[str]] = []
        port = _free_port()
        if impl == "mooncake":
            cmd = [MOONCAKE_MASTER, f"--rpc_port={port}", f"--metrics_port={_free_port()}",
                   "--enable_http_metadata_server=false"]
        else:
            cmd = [sys.executable, "-m", "store.master", "--rpc-port", str(port),
                   "--metrics-port", "0", "--enable-http-metadata-server", "false"]
        self.master = self._spawn(cmd, stdin=False)
        env = dict(os.environ, MOONCAKE_TRANSFER_ENABLE_SHM="1" if variant == "shm" else "0",
                   PYTHONPATH=python_path(), GLOG_minloglevel="2")
        _wait_port(port)
        addr = f"127.0.0.1:{port}"
        if impl == "mooncake":
            holder = [sys.executable, __file__, "--role", "holder", "--impl", impl,
                      "--master", addr, "--segment-mib", str(segment_mib)]
        else:
            holder = [sys.executable, "-m", "store.node", "--local-hostname", "127.0.0.1",
                      "--master-server-address", addr, "--global-segment-size",
                      str(segment_mib * MIB), "--log-level", "WARNING"]
        self._ready(self._spawn(holder, env=env), "holder")
        self.client = self._spawn([sys.executable, __file__, "--role", "client", "--impl", impl,
                                   "--master", addr], env=env)
        self._ready(self.client, "client")

    @property
    def name(self) -> str:
        return f"{self.impl}/{self.variant}"

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None,
               stdin: bool = True) -> subprocess.Popen[str]:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                             stdin=subprocess.PIPE if stdin else None,
                             stdout=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def _ready(self, p: subprocess.Popen[str], what: str) -> None:
        assert p.stdout is not None
        if not p.stdout.readline().startswith("READY"):
            raise SystemExit(f"{self.name} {what} failed to start (rc {p.poll()})")

    def _ask(self, line: str) -> str:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(line + "\n")
        self.client.stdin.flush()
        answer = self.client.stdout.readline()
        if not answer:
            raise SystemExit(f"{self.name} client died (rc {self.client.wait()})")
        return answer

    def data(self, tag: str, size: int, n: int, get_rounds: int) -> dict[str, Any]:
        answer = self._ask(f"data {tag} {size} {n} {get_rounds}")
        if not answer.startswith("ROUND "):
            raise SystemExit(f"{self.name}: unexpected answer {answer!r}")
        return json.loads(answer[6:])

    def metadata(self, levels: list[int]) -> list[dict[str, Any]]:
        answer = self._ask("metadata " + ",".join(map(str, levels)))
        rss: list[int] = []
        assert self.client.stdout is not None and self.client.stdin is not None
        while answer.startswith("LEVEL "):
            rss.append(_rss(self.master.pid))
            self.client.stdin.write("\n")
            self.client.stdin.flush()
            answer = self.client.stdout.readline()
        if not answer.startswith("RESULT "):
            raise SystemExit(f"{self.name} metadata run failed (rc {self.client.poll()})")
        rows: list[dict[str, Any]] = json.loads(answer[7:])
        for row, r in zip(rows, rss):
            row["master_rss_mb"] = r / MIB
            row["master_bytes_per_object"] = r / max(row["objects"], 1)
        return rows

    def close(self) -> None:
        for p in reversed(self.procs):
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


def _summary(rounds: list[dict[str, Any]], op: str, label: str) -> dict[str, Any]:
    secs = sum(r[op][0] for r in rounds)
    nbytes = sum(r[op][1] for r in rounds)
    lat = [x for r in rounds for x in r[op][2]]
    per_round = [r[op][1] / r[op][0] / 1e9 for r in rounds]
    return {"size": label, "op": op, "gbps": nbytes / secs / 1e9,
            "gbps_round_median": statistics.median(per_round),
            "p50_us": _pct(lat, 0.5) * 1e6, "p99_us": _pct(lat, 0.99) * 1e6}


def run_data(stacks: list[Stack], rounds: int, get_rounds: int,
             ops_scale: float = 1.0) -> dict[str, list[dict[str, Any]]]:
    """Every size, ``rounds`` rounds, the stacks taking turns inside each round (in a rotating
    order), so that a busy spell of the machine falls on all of them alike.

    Each summary row of ours also carries ``vs_mooncake_round_median``: the median over rounds
    of ours / Mooncake within the same round. On a machine whose speed drifts (this VM moves by
    2x within minutes) that is the steadiest comparison: both sides of a ratio ran seconds
    apart."""
    out: dict[str, list[dict[str, Any]]] = {s.name: [] for s in stacks}
    for label, size in SIZES.items():
        n = max(1, int(COUNTS[size] * ops_scale) // rounds)
        got: dict[str, list[dict[str, Any]]] = {s.name: [] for s in stacks}
        for r in range(rounds):
            for k in range(len(stacks)):
                stack = stacks[(r + k) % len(stacks)]
                got[stack.name].append(stack.data(f"{label}/{r}", size, n, get_rounds))
        theirs = got.get("mooncake/tcp")
        for name, rs in got.items():
            for op in ("put_from", "get_into"):
                row = _summary(rs, op, label)
                if theirs is not None and name.startswith("ours/"):
                    row["vs_mooncake_round_median"] = statistics.median(
                        (a[op][1] / a[op][0]) / (b[op][1] / b[op][0]) for a, b in zip(rs, theirs))
                out[name].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--impl", default="ours,mooncake")
    parser.add_argument("--objects", default="10000,50000,200000")
    parser.add_argument("--get-rounds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4,
                        help="data-path rounds per size, stacks alternating within each")
    parser.add_argument("--ops-scale", type=float, default=1.0,
                        help="multiply the ops per size (400 / 100 / 16) by this")
    parser.add_argument("--segment-mib", type=int, default=2048)
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--warm-up", type=float, default=0.0, metavar="SECONDS",
                        help="wait after starting the stores (a holder may still be faulting in "
                        "its segment in the background)")
    parser.add_argument("--no-shm", action="store_true", help="leave out our shm-path run")
    parser.add_argument("--no-floor", action="store_true",
                        help="leave out the bare-socket floor of the data path")
    parser.add_argument("--role", choices=["holder", "client", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    objects = [int(x) for x in args.objects.split(",") if x and int(x) > 0]
    if args.role == "holder":
        role_holder(args.impl, args.master, args.segment_mib * MIB)
        return 0
    if args.role == "floor":
        role_floor_receiver(args.segment_mib * MIB)
        return 0
    if args.role == "client":
        role_client(args.impl, args.master)
        return 0
    wanted = []
    for impl in args.impl.split(","):
        if impl == "mooncake" and not os.path.exists(MOONCAKE_MASTER):
            print("mooncake not installed: skipping it", file=sys.stderr)
            continue
        variants = ("tcp",) if impl != "ours" or args.no_shm else ("tcp", "shm")
        wanted += [(impl, v) for v in variants]
    stacks: list[Stack] = []
    runs = []
    try:
        for impl, variant in wanted:
            stacks.append(Stack(impl, variant, args.segment_mib))
        time.sleep(args.warm_up)
        data = {} if args.skip_data else run_data(stacks, args.rounds, args.get_rounds,
                                                  args.ops_scale)
        for stack in stacks:
            meta = stack.metadata(objects) if objects and stack.variant == "tcp" else []
            runs.append({"impl": stack.impl, "path": stack.variant,
                         "data": data.get(stack.name, []), "metadata": meta})
    finally:
        for stack in stacks:
            stack.close()
    floor = [] if args.skip_data or args.no_floor else run_floor(min(args.segment_mib, 1024))
    if args.json:
        print(json.dumps({"runs": runs, "floor": floor}, indent=1))
        return 0
    print(f"{'impl':10} {'path':4} {'size':6} {'op':9} {'GB/s':>7} {'rnd med':>8} {'p50 us':>9} "
          f"{'p99 us':>9} {'vs Mooncake':>11}")
    for run in runs:
        for r in run["data"]:
            vs = r.get("vs_mooncake_round_median")
            print(f"{run['impl']:10} {run['path']:4} {r['size']:6} {r['op']:9} {r['gbps']:7.2f} "
                  f"{r['gbps_round_median']:8.2f} {r['p50_us']:9.0f} {r['p99_us']:9.0f} "
                  f"{'' if vs is None else f'{vs:.2f}x':>11}")
    for r in floor:
        print(f"{'floor':10} {'tcp':4} {r['size']:6} {'write':9} {r['gbps']:7.2f} {'':8} "
              f"{r['p50_us']:9.0f}")
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
