"""RPC latency and throughput on loopback, against the floor of a bare uvloop + msgspec echo.

Measures, with each server in its own process:

* ``floor``: an ``asyncio.Protocol`` echo (4-byte length prefix, msgspec decode + encode of
  the same small struct, no envelope, no request ids: replies matched in FIFO order). This is
  the best a Python asyncio RPC can do here, so the RPC layer is judged relative to it.
* ``rpc_async``: :class:`transfer.rpc.RpcClient` calling the sync ``echo`` handler of
  :mod:`transfer.rpc.testing`'s server: sequential round trips (p50/p99) and calls/s with
  ``--inflight`` calls outstanding.
* ``rpc_sync``: :class:`transfer.rpc.SyncRpcClient` called from a plain (non-loop) thread.
* ``rpc_blocking``: :class:`transfer.rpc.BlockingRpcClient` (same protocol on the caller's own
  socket, no loop hop), called from a plain thread.
* ``sync_via_run_coroutine_threadsafe``: the naive sync wrapper
  (``BackgroundLoop.run(client.call(...))``), for comparison with the path we chose.

Floor and RPC are measured in alternating rounds and the median round is reported, so a noisy
neighbour hurts both alike. Targets: ``rpc_async`` p50 within 1.3x of the floor's p50;
``rpc_sync`` p50 below 100 us.

    python benchmarks/rpc_bench.py            # table
    python benchmarks/rpc_bench.py --json     # one JSON object on stdout
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

import msgspec

from transfer.rpc import BackgroundLoop, BlockingRpcClient, RpcClient, SyncRpcClient, new_event_loop
from transfer.rpc.testing import Echo, RpcServerProcess
from transfer.testing import stop_process

_HEADER = struct.Struct(">I")
TARGET_ASYNC_RATIO = 1.3
TARGET_SYNC_P50_US = 100.0


# -- the floor: bare length-prefixed msgspec echo -----------------------------------------------


class _FloorServer(asyncio.Protocol):
    def __init__(self) -> None:
        self.dec = msgspec.msgpack.Decoder(Echo)
        self.enc = msgspec.msgpack.Encoder()
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 4:
            n = _HEADER.unpack_from(buf, pos)[0]
            if len(buf) - pos - 4 < n:
                break
            msg = self.dec.decode(memoryview(buf)[pos + 4:pos + 4 + n])
            out = bytearray(4)
            self.enc.encode_into(msg, out, 4)
            _HEADER.pack_into(out, 0, len(out) - 4)
            self.transport.write(out)  # type: ignore[attr-defined]
            pos += 4 + n
        del buf[:pos]


def serve_floor() -> None:
    loop = new_event_loop()

    async def main() -> None:
        server = await loop.create_server(_FloorServer, "127.0.0.1", 0)
        sys.stdout.write(f"PORT {server.sockets[0].getsockname()[1]}\n")
        sys.stdout.flush()
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin

    loop.run_until_complete(main())


class _FloorClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.dec = msgspec.msgpack.Decoder(Echo)
        self.enc = msgspec.msgpack.Encoder()
        self.waiters: collections.deque[asyncio.Future[Echo]] = collections.deque()
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 4:
            n = _HEADER.unpack_from(buf, pos)[0]
            if len(buf) - pos - 4 < n:
                break
            self.waiters.popleft().set_result(
                self.dec.decode(memoryview(buf)[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]

    async def call(self, msg: Echo) -> Echo:
        out = bytearray(4)
        self.enc.encode_into(msg, out, 4)
        _HEADER.pack_into(out, 0, len(out) - 4)
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.transport.write(out)  # type: ignore[attr-defined]
        return await fut


def start_floor_process() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-floor"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"PORT "):
        stop_process(proc)
        raise RuntimeError(f"floor server failed to start: {line!r}")
    return proc, int(line.split()[1])


# -- measurement --------------------------------------------------------------------------------


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))] / 1000.0
    return {"p50_us": pct(0.50), "p99_us": pct(0.99), "mean_us": statistics.fmean(s) / 1000.0}


async def _sequential(call: Any, n: int, warmup: int, payload: bytes) -> dict[str, float]:
    clock = time.perf_counter_ns
    for i in range(warmup):
        await call(Echo(i, payload))
    samples = []
    for i in range(n):
        t0 = clock()
        await call(Echo(i, payload))
        samples.append(clock() - t0)
    return _percentiles(samples)


async def _throughput(call: Any, total: int, inflight: int, payload: bytes) -> float:
    per_worker = total // inflight

    async def worker(k: int) -> None:
        for i in range(per_worker):
            await call(Echo(k * per_worker + i, payload))

    await asyncio.gather(*(worker(k) for k in range(inflight)))  # warm-up pass
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(inflight)))
    return per_worker * inflight / (time.perf_counter() - t0)


def _sync_sequential(call: Any, n: int, warmup: int, payload: bytes) -> dict[str, float]:
    clock = time.perf_counter_ns
    for i in range(warmup):
        call(Echo(i, payload))
    samples = []
    for i in range(n):
        t0 = clock()
        call(Echo(i, payload))
        samples.append(clock() - t0)
    return _percentiles(samples)


def _median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    payload = b"x" * args.payload
    floor_proc, floor_port = start_floor_process()
    rpc_proc = RpcServerProcess().start()
    loop = new_event_loop()
    background = BackgroundLoop(name="bench-sync-loop")
    results: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    try:
        async def connect_floor() -> _FloorClient:
            _, proto = await loop.create_connection(_FloorClient, "127.0.0.1", floor_port)
            return proto

        floor = loop.run_until_complete(connect_floor())
        client = RpcClient("127.0.0.1", rpc_proc.port)
        sync = SyncRpcClient("127.0.0.1", rpc_proc.port, loop=background)
        sync.connect()
        naive = RpcClient("127.0.0.1", rpc_proc.port)
        blocking = BlockingRpcClient("127.0.0.1", rpc_proc.port)

        async def rpc_call(msg: Echo) -> Echo:
            return await client.call("echo", msg, Echo)

        def sync_call(msg: Echo) -> Echo:
            return sync.call("echo", msg, Echo)

        def blocking_call(msg: Echo) -> Echo:
            return blocking.call("echo", msg, Echo)

        def naive_call(msg: Echo) -> Echo:
            return background.run(naive.call("echo", msg, Echo))

        for _ in range(args.rounds):
            for name, call in (("floor", floor.call), ("rpc_async", rpc_call)):
                lat = loop.run_until_complete(_sequential(call, args.calls, args.warmup, payload))
                tput = loop.run_until_complete(
                    _throughput(call, args.throughput_calls, args.inflight, payload))
                results[name].append({**lat, "calls_per_s": tput})
            results["rpc_sync"].append(
                _sync_sequential(sync_call, args.calls, args.warmup, payload))
            results["rpc_blocking"].append(
                _sync_sequential(blocking_call, args.calls, args.warmup, payload))
            results["sync_via_run_coroutine_threadsafe"].append(
                _sync_sequential(naive_call, args.calls // 2, args.warmup, payload))
        sync.close()
        blocking.close()
        background.run(naive.close())
        loop.run_until_complete(client.close())
    finally:
        background.stop()
        loop.close()
        rpc_proc.stop()
        if floor_proc.stdin is not None:
            floor_proc.stdin.close()
        stop_process(floor_proc)
        if floor_proc.stdout is not None:
            floor_proc.stdout.close()

    out: dict[str, Any] = {name: _median_round(rounds) for name, rounds in results.items()}
    floor_p50 = out["floor"]["p50_us"]
    async_ratio = out["rpc_async"]["p50_us"] / floor_p50
    out["ratios"] = {
        "rpc_async_p50_vs_floor": round(async_ratio, 3),
        "rpc_async_p99_vs_floor": round(out["rpc_async"]["p99_us"] / out["floor"]["p99_us"], 3),
        "rpc_async_throughput_vs_floor": round(
            out["rpc_async"]["calls_per_s"] / out["floor"]["calls_per_s"], 3),
    }
    out["targets"] = {
        f"rpc_async_p50_within_{TARGET_ASYNC_RATIO}x_floor": async_ratio <= TARGET_ASYNC_RATIO,
        f"rpc_sync_p50_below_{TARGET_SYNC_P50_US:g}us":
            out["rpc_sync"]["p50_us"] < TARGET_SYNC_P50_US,
        f"rpc_blocking_p50_below_{TARGET_SYNC_P50_US:g}us":
            out["rpc_blocking"]["p50_us"] < TARGET_SYNC_P50_US,
    }
    out["config"] = {
        "calls": args.calls, "warmup": args.warmup, "rounds": args.rounds,
        "inflight": args.inflight, "throughput_calls": args.throughput_calls,
        "payload_bytes": args.payload,
    }
    out["machine"] = {
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0], "loop": type(loop).__module__.split(".")[0],
    }
    return out


def print_table(out: dict[str, Any]) -> None:
    print(f"{'':36} {'p50 us':>9} {'p99 us':>9} {'calls/s':>10}")
    for name in ("floor", "rpc_async", "rpc_sync", "rpc_blocking",
                 "sync_via_run_coroutine_threadsafe"):
        r = out[name]
        tput = f"{r['calls_per_s']:>10.0f}" if "calls_per_s" in r else f"{'':>10}"
        print(f"{name:36} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {tput}")
    print()
    for k, v in out["ratios"].items():
        print(f"{k:36} {v:>9.2f}")
    for k, v in out["targets"].items():
        print(f"{k:36} {'met' if v else 'MISSED':>9}")
    m = out["machine"]
    print(f"\n{out['config']['rounds']} rounds, median shown; {m['cpus']} CPUs, "
          f"load {m['loadavg_1m']:.2f}, Python {m['python']}, {m['loop']} loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--calls", type=int, default=20000, help="sequential calls per round")
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--throughput-calls", type=int, default=64 * 1000)
    parser.add_argument("--payload", type=int, default=16, help="bytes field size")
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor()
        return
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)


if __name__ == "__main__":
    main()
