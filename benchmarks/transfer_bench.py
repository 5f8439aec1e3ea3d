"""Transfer-engine throughput on loopback, in the shape of Mooncake's ``transfer_engine_bench``.

Two processes: this one initiates, a ``--serve`` child owns the target segment. For each shape
(64 KiB x 128, 1 MiB x 64, 16 MiB x 8) and each direction it measures our tcp and shm paths and,
in the same run, the real Mooncake engine over TCP (P2PHANDSHAKE), plus two ceilings: ``iperf3``
on loopback and a single-thread ``numpy.copyto`` of the same bytes.

Mooncake is run as a subprocess with a Python that can ``import mooncake.engine``: the one given
by ``--mooncake-python``, else ``.venv-mooncake/bin/python``, else this interpreter. Install it
with ``pip install mooncake-transfer-engine-non-cuda`` (into either venv) plus its system
libraries ``apt-get install -y libibverbs1 librdmacm1 libnuma1``.

    .venv/bin/python benchmarks/transfer_bench.py            # table
    .venv/bin/python benchmarks/transfer_bench.py --json     # one JSON object
    .venv/bin/python benchmarks/transfer_bench.py --tls      # + tcp under mutual TLS

``--tls`` adds an ``ours-tls`` column: the tcp transport with mutual TLS (a throwaway CA made
by :func:`transfer.tls.make_test_pki`, the HMAC secret on too), so its cost is read side by side
with plain tcp in the same run (``tls_vs_tcp`` in the JSON: ratio of throughputs).

Targets (2-core box): tcp >= 2x Mooncake at 1 MiB and 16 MiB, tcp >= Mooncake at 64 KiB,
shm >= 50% of the single-thread memcpy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MOONCAKE_PY = ROOT / ".venv-mooncake" / "bin" / "python"
DRIVER = Path(__file__).with_name("_mooncake_driver.py")
SHAPES = [(64 << 10, 128), (1 << 20, 64), (16 << 20, 8)]
SIZE = max(b * n for b, n in SHAPES)


def _tls_overrides(mode: str, tls_dir: str | None) -> dict[str, Any]:
    """Mutual TLS with the PKI in ``tls_dir`` (both processes share it) for the tls mode."""
    if mode != "tls":
        return {}
    from transfer.tls import TestPki

    assert tls_dir is not None
    d = Path(tls_dir)
    pki = TestPki(str(d / "ca.pem"), str(d / "node.pem"), str(d / "node.key"))
    return {**pki.settings(), "auth_secret": "transfer-bench"}


def serve(args: argparse.Namespace) -> None:
    from transfer.config import load_config
    from transfer.engine import Engine

    cfg = load_config(overrides={"transfer.enable_shm": args.mode == "shm",
                                 "transfer.streams_per_peer": args.streams,
                                 **_tls_overrides(args.mode, args.tls_dir)})
    engine = Engine(cfg).start_in()
    if args.mode == "shm":
        addr = engine.run(engine.allocate_shared(SIZE)).address
    else:
        buf = np.zeros(SIZE, np.uint8)
        addr = engine.run(engine.register(buf))
    print(json.dumps({"name": engine.name, "addr": addr}), flush=True)
    sys.stdin.read()
    engine.close_in()


def _spawn(cmd: list[str]) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{cmd[:3]} failed to start")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _timed(fn: Any, seconds: float) -> float:
    fn()  # warm-up (connects, maps)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n


def bench_ours(mode: str, streams: int, seconds: float, slice_size: int) -> list[dict[str, Any]]:
    from transfer.batch import TransferRequest
    from transfer.config import load_config
    from transfer.engine import Engine
    from transfer.transports.base import Opcode

    from transfer.tls import make_test_pki

    tls_dir = tempfile.TemporaryDirectory(prefix="transfer-bench-tls-")
    if mode == "tls":
        make_test_pki(tls_dir.name, "node")
    proc, info = _spawn([sys.executable, __file__, "--serve", "--mode", mode,
                         "--streams", str(streams), "--tls-dir", tls_dir.name])
    cfg = load_config(overrides={"transfer.enable_shm": mode == "shm",
                                 "transfer.streams_per_peer": streams,
                                 "transfer.slice_size": slice_size,
                                 **_tls_overrides(mode, tls_dir.name)})
    engine = Engine(cfg).start_in()
    out = []
    try:
        local = engine.run(engine.allocate_shared(SIZE)).address if mode == "shm" else \
            engine.run(engine.register(np.ones(SIZE, np.uint8)))
        for block, batch in SHAPES:
            for op in (Opcode.WRITE, Opcode.READ):
                reqs = [TransferRequest(op, local + i * block, info["name"],
                                        info["addr"] + i * block, block) for i in range(batch)]
                per = _timed(lambda r=reqs: engine.transfer_blocking(r, timeout=60), seconds)
                out.append({"engine": f"ours-{mode}", "block": block, "batch": batch,
                            "op": op.name.lower(), "gbps": block * batch / per / 1e9})
        if mode == "shm":
            assert engine.stats()["tcp_connects"] == 0, "shm benchmark fell back to tcp"
    finally:
        engine.close_in()
        _stop(proc)
        tls_dir.cleanup()
    return out


def find_mooncake_python(explicit: str | None) -> str | None:
    """The first Python that can import ``mooncake.engine`` (see the module docstring)."""
    candidates = [explicit] if explicit else [str(MOONCAKE_PY), sys.executable]
    for python in candidates:
        if not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import mooncake.engine"], capture_output=True,
                               timeout=60, check=False)
        if probe.returncode == 0:
            return python
    where = explicit or " or ".join(candidates)
    print(f"mooncake not importable from {where}; skipping it (see --help to install)",
          file=sys.stderr)
    return None


def bench_mooncake(python: str, seconds: float) -> list[dict[str, Any]]:
    proc, info = _spawn([python, str(DRIVER), "serve", str(SIZE)])
    try:
        shapes = ",".join(f"{b}x{n}" for b, n in SHAPES)
        res = subprocess.run([python, str(DRIVER), "bench", info["name"],
                              str(info["addr"]), str(SIZE), shapes, str(seconds)],
                             capture_output=True, text=True, timeout=600, check=False)
        if res.returncode != 0:
            print(f"mooncake bench failed: {res.stderr[-500:]}", file=sys.stderr)
            return []
        rows = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        _stop(proc)
    return [{"engine": "mooncake-tcp", **r} for r in rows]


def bench_iperf(seconds: float) -> float | None:
    if shutil.which("iperf3") is None:
        return None
    from transfer.testing import free_port

    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        # Not wait_for_port: a probe connection would count as iperf3's test client.
        for _ in range(50):
            res = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-J",
                                  "-t", str(max(1, round(seconds * 2)))],
                                 capture_output=True, text=True, timeout=60, check=False)
            end = json.loads(res.stdout or "{}").get("end", {})
            if "sum_received" in end:
                return float(end["sum_received"]["bits_per_second"]) / 8e9
            time.sleep(0.1)
        return None
    finally:
        server.kill()
        server.wait()


def bench_memcpy(seconds: float) -> dict[int, float]:
    out = {}
    for block, batch in SHAPES:
        src = np.ones(block * batch, np.uint8)
        dst = np.zeros_like(src)
        per = _timed(lambda d=dst, s=src: np.copyto(d, s), seconds)
        out[block] = block * batch / per / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="The Mooncake column needs the real engine: pip install "
               "mooncake-transfer-engine-non-cuda (in .venv-mooncake or this venv) and "
               "apt-get install -y libibverbs1 librdmacm1 libnuma1.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    p.add_argument("--streams", type=int, default=4, help="transfer.streams_per_peer")
    p.add_argument("--slice-size", type=int, default=1 << 20)
    p.add_argument("--modes", default="tcp,shm", help="our transports to measure (tcp, shm, tls)")
    p.add_argument("--tls", action="store_true",
                   help="also measure tcp under mutual TLS (adds the tls mode)")
    p.add_argument("--no-mooncake", action="store_true")
    p.add_argument("--mooncake-python", metavar="PATH",
                   help="Python with mooncake-transfer-engine-non-cuda installed (default: "
                        ".venv-mooncake/bin/python, else this interpreter)")
    p.add_argument("--no-ceilings", action="store_true", help="skip iperf3 and memcpy")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="tcp", help=argparse.SUPPRESS)
    p.add_argument("--tls-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return
    modes = args.modes.split(",")
    if args.tls and "tls" not in modes:
        modes.append("tls")
    rows = []
    for mode in modes:
        rows += bench_ours(mode, args.streams, args.seconds, args.slice_size)
    if not args.no_mooncake:
        python = find_mooncake_python(args.mooncake_python)
        if python is not None:
            rows += bench_mooncake(python, args.seconds)
    memcpy = bench_memcpy(args.seconds) if not args.no_ceilings else {b: 0.0 for b, _ in SHAPES}
    iperf = bench_iperf(args.seconds) if not args.no_ceilings else None
    result = {"rows": rows, "memcpy_gbps": {str(k): v for k, v in memcpy.items()},
              "iperf3_gbps": iperf, "checks": _checks(rows, memcpy),
              "tls_vs_tcp": _tls_ratios(rows)}
    if args.json:
        print(json.dumps(result))
        return
    _table(rows, memcpy, iperf, result["checks"])


def _get(rows: list[dict[str, Any]], engine: str, block: int, op: str) -> float | None:
    for r in rows:
        if r["engine"] == engine and r["block"] == block and r["op"] == op:
            return float(r["gbps"])
    return None


def _tls_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """TLS throughput as a fraction of plain tcp's, per shape and direction (measured only)."""
    out = {}
    for block, _ in SHAPES:
        for op in ("write", "read"):
            tls, tcp = _get(rows, "ours-tls", block, op), _get(rows, "ours-tcp", block, op)
            if tls is not None and tcp:
                out[f"{block >> 10}KiB {op}"] = tls / tcp
    return out


def _checks(rows: list[dict[str, Any]], memcpy: dict[int, float]) -> dict[str, bool | None]:
    checks: dict[str, bool | None] = {}
    for block, _ in SHAPES:
        for op in ("write", "read"):
            ours, theirs = _get(rows, "ours-tcp", block, op), _get(rows, "mooncake-tcp", block, op)
            factor = 1.0 if block < (1 << 20) else 2.0
            checks[f"tcp>={factor:g}x mooncake {block >> 10}KiB {op}"] = (
                None if ours is None or theirs is None else ours >= factor * theirs)
            shm = _get(rows, "ours-shm", block, op)
            checks[f"shm>=50% memcpy {block >> 10}KiB {op}"] = (
                None if shm is None else shm >= 0.5 * memcpy[block])
    return checks


def _table(rows: list[dict[str, Any]], memcpy: dict[int, float], iperf: float | None,
           checks: dict[str, bool | None]) -> None:
    print(f"{'shape':>14} {'op':>5} {'ours-tcp':>9} {'ours-tls':>9} {'ours-shm':>9} "
          f"{'mooncake':>9} {'memcpy':>8}   (GB/s)")
    for block, batch in SHAPES:
        for op in ("write", "read"):
            cells = [_get(rows, e, block, op)
                     for e in ("ours-tcp", "ours-tls", "ours-shm", "mooncake-tcp")]
            text = " ".join(f"{c:9.2f}" if c is not None else f"{'-':>9}" for c in cells)
            print(f"{block >> 10:>7}KiBx{batch:<4} {op:>5} {text} {memcpy[block]:8.2f}")
    print(f"iperf3 loopback: {iperf:.2f} GB/s" if iperf else "iperf3: not measured")
    for shape, ratio in _tls_ratios(rows).items():
        print(f"  tls/tcp {shape}: {ratio:.2f}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else ('--' if ok is None else 'MISS')}] {name}")


if __name__ == "__main__":
    main()
